"""The embedded task's data: story openings, base-model samples, simulated labels.

Writes into ``run_dir`` (``runs/demo/data``):
    prompts_train.jsonl                           story openings PPO trains on
    prompts_dev.jsonl                             dev openings: PPO's periodic gold evaluation, tuning
    prompts_test.jsonl                            test openings: the evaluation report only
    prefs_train.jsonl / prefs_val.jsonl           pairs labeled by the noisy annotator pool
    prefs_val_gold.jsonl                          the same validation pairs ordered by the gold reward
    sft_train.jsonl / sft_val.jsonl               chosen completions (SFT targets, as in the DPO paper)
    heldout_text.jsonl                            base-model text on the test prompts (alignment tax)
    gold.json                                     the gold reward's fluency calibration
    labelers.json                                 each labeler's agreement with gold
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from rlhfstack.configs import DemoDataConfig
from rlhfstack.logs import close_stage_log
from rlhfstack.models.core import load_causal_lm, load_tokenizer
from rlhfstack.progress import Progress
from rlhfstack.rollout.generate import sample_texts
from rlhfstack.runtime import atomic_write_json, atomic_write_jsonl, write_stage_done
from rlhfstack.tasks.demo import cut_at_sentence, ensure_base_model, save_gold_params
from rlhfstack.tasks.stories import (
    GoldReward,
    best_of_k_pairs,
    calibrate_fluency,
    default_labeler_pool,
    label_pairs,
    labeler_agreement_with_gold,
    make_story_prompts,
    split_prompts,
)
from rlhfstack.training import log_stage_summary, setup_run

log = logging.getLogger("rlhfstack.data")


def train(cfg: DemoDataConfig) -> Path:
    run = setup_run(cfg)
    out = run.run_dir
    ensure_base_model(cfg.model.path, cfg.data_root)
    tok = load_tokenizer(cfg.model.path)
    base = load_causal_lm(cfg.model.path, trainable=False, device=run.device)

    # three disjoint prompt sets (the generator never repeats a prompt): train and dev split the
    # first n_prompts, test is the next n_test of the same stream, so train and dev are the same
    # whatever n_test is
    prompts = make_story_prompts(cfg.n_prompts + cfg.n_test, seed=cfg.seed)
    train_p, dev_p = split_prompts(prompts[: cfg.n_prompts], cfg.n_dev, seed=cfg.seed)
    test_p = prompts[cfg.n_prompts :]
    atomic_write_jsonl(out / "prompts_train.jsonl", [{"prompt": p} for p in train_p])
    atomic_write_jsonl(out / "prompts_dev.jsonl", [{"prompt": p} for p in dev_p])
    atomic_write_jsonl(out / "prompts_test.jsonl", [{"prompt": p} for p in test_p])

    # ---- k base-model samples per labeled prompt (stop at EOS or BOS: TinyStories separates
    # stories with BOS), cut at the last sentence end
    pref_p = train_p[: cfg.n_pref_prompts]
    stop = (tok.eos_token_id, tok.bos_token_id)
    per_prompt: list[list[str]] = [[] for _ in pref_p]
    log.info(
        "sampling %d completions for each of %d prompts, and one for each of %d test prompts",
        cfg.completions_per_prompt,
        len(pref_p),
        len(test_p),
    )
    bar = Progress(cfg.completions_per_prompt * len(pref_p) + len(test_p), "sample", unit="sample")
    for k in range(cfg.completions_per_prompt):
        texts, _, n_tok = sample_texts(
            base,
            tok,
            pref_p,
            max_new_tokens=cfg.max_new_tokens,
            temperature=cfg.temperature,
            seed=cfg.seed * 1000 + k,
            device=run.device,
            batch_size=256,
            stop_ids=stop,
            progress=bar,
        )
        run.cost.add_tokens(n_tok)
        for i, t in enumerate(texts):
            per_prompt[i].append(cut_at_sentence(t))
    # held-out base text (on the test prompts) for the alignment-tax NLL
    held_texts, _, _ = sample_texts(
        base,
        tok,
        test_p,
        max_new_tokens=cfg.max_new_tokens,
        temperature=1.0,
        seed=cfg.seed + 777,
        device=run.device,
        batch_size=256,
        stop_ids=stop,
        progress=bar,
    )
    bar.close()
    atomic_write_jsonl(
        out / "heldout_text.jsonl",
        [{"prompt": p, "completion": cut_at_sentence(t)} for p, t in zip(test_p, held_texts)],
    )

    # ---- gold reward, calibrated on the base samples
    gold = GoldReward(base, tok)
    flat_p = [p for p, cs in zip(pref_p, per_prompt) for _ in cs]
    flat_c = [c for cs in per_prompt for c in cs]
    f0, f_scale = calibrate_fluency(gold.features(flat_p[:1024], flat_c[:1024])["fluency"])
    save_gold_params(
        out / "gold.json",
        {
            "f0": f0,
            "f_scale": f_scale,
            "w_sentiment": 1.0,
            "w_fluency": 0.5,
            "w_repetition": 2.0,
            "note": "gold = w_sentiment*VADER + w_fluency*clip((fluency-f0)/f_scale,-3,1) - w_repetition*repetition",
        },
    )
    gold = GoldReward(base, tok, f0=f0, f_scale=f_scale, batch_size=128)

    # ---- pairs, labeled by the noisy pool (features computed once per distinct sample)
    pa_p, pa_a, pa_b = best_of_k_pairs(
        pref_p, per_prompt, pairs_per_prompt=cfg.pairs_per_prompt, seed=cfg.seed
    )
    uniq = sorted(set(zip(pa_p, pa_a)) | set(zip(pa_p, pa_b)))
    log.info("gold features of %d distinct samples, then labels of %d pairs", len(uniq), len(pa_p))
    uf = gold.features([u[0] for u in uniq], [u[1] for u in uniq])
    row_of = {u: i for i, u in enumerate(uniq)}

    def lookup(ps, cs):
        idx = np.array([row_of[(p, c)] for p, c in zip(ps, cs)], dtype=int)
        return {k: np.asarray(v)[idx] for k, v in uf.items()}

    pool = default_labeler_pool(cfg.flip_prob)
    labels = [
        r
        for r in label_pairs(pa_p, pa_a, pa_b, gold, pool, seed=cfg.seed, features_fn=lookup)
        if r["chosen"].strip() and r["rejected"].strip()
    ]
    rng = np.random.default_rng(cfg.seed)
    perm = rng.permutation(len(labels))
    n_val = max(16, len(labels) // 10)
    val = [labels[i] for i in perm[:n_val]]
    tr = [labels[i] for i in perm[n_val:]]
    keys = ("prompt", "chosen", "rejected", "labeler", "gold_margin")
    atomic_write_jsonl(out / "prefs_train.jsonl", [{k: r[k] for k in keys} for r in tr])
    atomic_write_jsonl(out / "prefs_val.jsonl", [{k: r[k] for k in keys} for r in val])
    atomic_write_jsonl(
        out / "prefs_val_gold.jsonl",
        [
            {
                "prompt": r["prompt"],
                "chosen": r["chosen"] if r["gold_margin"] >= 0 else r["rejected"],
                "rejected": r["rejected"] if r["gold_margin"] >= 0 else r["chosen"],
            }
            for r in val
            if r["gold_margin"] != 0
        ],
    )
    atomic_write_jsonl(
        out / "sft_train.jsonl", [{"prompt": r["prompt"], "completion": r["chosen"]} for r in tr]
    )
    atomic_write_jsonl(
        out / "sft_val.jsonl", [{"prompt": r["prompt"], "completion": r["chosen"]} for r in val]
    )
    agree = labeler_agreement_with_gold(labels)
    overall = float(np.mean([r["agrees_with_gold"] for r in labels]))
    atomic_write_json(
        out / "labelers.json",
        {
            "agreement_with_gold": agree,
            "overall_agreement": overall,
            "n_pairs": len(labels),
            "flip_prob": cfg.flip_prob,
            "pool": [vars(lab) for lab in pool],
        },
    )
    log.info(
        "data: %d train / %d dev / %d test prompts, %d labeled pairs; label/gold agreement %.3f %s",
        len(train_p),
        len(dev_p),
        len(test_p),
        len(labels),
        overall,
        {k: round(v, 3) for k, v in agree.items()},
    )
    run.logger.log(0, {"loss": 0.0, "pairs": len(labels), "label_gold_agreement": overall})
    run.logger.close()
    cost = run.cost.summary()
    write_stage_done(out, {"stage": "data", "cost": cost, "pairs": len(labels)})
    log_stage_summary(
        "data",
        out,
        cost=cost,
        headline={"pairs": len(labels), "label/gold agreement": overall},
    )
    close_stage_log()
    return out
