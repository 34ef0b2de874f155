"""RL-CAI / RLAIF preference data (Bai et al. 2022, section 4; Lee et al. 2023, "RLAIF").

Pairs of responses sampled from the policy (``model.path``: the SL-CAI policy) on the training
prompts, labeled by the AI feedback model: each pair is compared in both answer orders under
the constitution's principles and gets the debiased probability as a soft label
(``feedback.principles=ensemble``: the mean over all principles; ``sample``: one principle drawn
at random per pair). No simulated human labeler is called.

Writes into ``run_dir`` (``runs/demo_rlaif/ai_labels``):
    prefs_train.jsonl / prefs_val.jsonl   ``{prompt, chosen, rejected, p_chosen, principle}``:
                                          ``chosen`` is the response the labeler prefers,
                                          ``p_chosen`` >= 0.5 its soft label (the RM's target)
    labeler.json                          the labeler's order disagreement on these pairs and,
                                          where ``measure_path`` exists, its agreement with gold
                                          and with the simulated humans there, per principle
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from rlhfstack.configs import AILabelsConfig
from rlhfstack.data import map_records, require_field
from rlhfstack.feedback import (
    FeedbackModel,
    Principle,
    build_feedback_model,
    compare_principles,
    label_pairs_with_feedback,
    load_constitution,
    preference_rows,
)
from rlhfstack.models.core import load_causal_lm, load_tokenizer
from rlhfstack.runtime import atomic_write_json, atomic_write_jsonl, read_jsonl, write_stage_done
from rlhfstack.tasks.demo import sample_story_candidates
from rlhfstack.tasks.stories import best_of_k_pairs
from rlhfstack.training import setup_run

log = logging.getLogger("rlhfstack.ai_labels")


def agreement(p_a_N: np.ndarray, target_N: np.ndarray) -> float:
    """Fraction of pairs where the labeler's side of 0.5 matches ``target`` (1: A, 0: B, 0.5:
    tie); a label of exactly 0.5, or a tied target, counts half."""
    pick = np.where(p_a_N > 0.5, 1.0, np.where(p_a_N < 0.5, 0.0, 0.5))
    t = np.asarray(target_N, dtype=np.float64)
    score = np.where((pick == 0.5) | (t == 0.5), 0.5, (pick == t).astype(np.float64))
    return float(np.mean(score)) if len(score) else float("nan")


def measure_agreement(
    fb: FeedbackModel, rows: list[dict], principles: Sequence[Principle]
) -> dict[str, Any]:
    """The labeler on pairs with a human label and a gold margin (A = the human's chosen)."""
    prompts = [r["prompt"] for r in rows]
    a, b = [r["chosen"] for r in rows], [r["rejected"] for r in rows]
    gold = np.array([r["gold_margin"] for r in rows], dtype=np.float64)
    gold_t = np.where(gold > 0, 1.0, np.where(gold < 0, 0.0, 0.5))
    ens, per = compare_principles(fb, prompts, a, b, principles)
    out: dict[str, Any] = {"n": len(rows)}
    for name, c in [("ensemble", ens), *per.items()]:
        out[name] = {
            "agreement_gold": agreement(c.p_a_N, gold_t),
            "agreement_human": agreement(c.p_a_N, np.ones(len(rows))),
            "order_disagreement": c.order_disagreement,
        }
    out["humans_agreement_gold"] = agreement(np.ones(len(rows)), gold_t)
    return out


def train(cfg: AILabelsConfig) -> Path:
    run = setup_run(cfg)
    out = run.run_dir
    constitution = load_constitution(cfg.feedback.constitution)
    principles = list(constitution.principles)
    prompts = map_records(
        cfg.data.train_path,
        lambda r: require_field(r, "prompt", str),
        fmt="jsonl",
        data_root=cfg.data_root,
    )[: cfg.n_prompts]
    fb = build_feedback_model(cfg.feedback, run.device)
    tok = load_tokenizer(cfg.model.path)
    policy = load_causal_lm(cfg.model.path, trainable=False, device=run.device)
    # seed + 1: other samples than the SL-CAI stage drew from the base model on these prompts
    per_prompt, n_tok = sample_story_candidates(
        policy, tok, prompts, cfg.completions_per_prompt, max_new_tokens=cfg.max_new_tokens,
        temperature=cfg.temperature, seed=cfg.seed + 1, device=run.device,
    )  # fmt: skip
    run.cost.add_tokens(n_tok)
    pa_p, pa_a, pa_b = best_of_k_pairs(
        prompts, per_prompt, pairs_per_prompt=cfg.pairs_per_prompt, seed=cfg.seed
    )
    keep = [i for i in range(len(pa_p)) if pa_a[i].strip() and pa_b[i].strip()]
    pa_p, pa_a, pa_b = ([x[i] for i in keep] for x in (pa_p, pa_a, pa_b))
    rng = np.random.default_rng(cfg.seed)
    cmp, names, per = label_pairs_with_feedback(
        fb, pa_p, pa_a, pa_b, principles, cfg.feedback.principles, rng
    )
    rows = preference_rows(pa_p, pa_a, pa_b, cmp, names)
    perm = rng.permutation(len(rows))
    n_val = int(round(cfg.val_fraction * len(rows)))
    atomic_write_jsonl(out / "prefs_train.jsonl", [rows[i] for i in sorted(perm[n_val:])])
    atomic_write_jsonl(out / "prefs_val.jsonl", [rows[i] for i in sorted(perm[:n_val])])
    label_cpu = fb.cpu_seconds
    report: dict[str, Any] = {
        "feedback_model": fb.name,
        "constitution": constitution.path,
        "principles": cfg.feedback.principles,
        "n_pairs": len(rows),
        "order_disagreement": cmp.order_disagreement,
        "mean_p_chosen": float(np.mean([r["p_chosen"] for r in rows])) if rows else None,
        "per_principle_order_disagreement": {k: c.order_disagreement for k, c in per.items()},
        "labeling_cpu_seconds": round(label_cpu, 3),
    }
    if cfg.measure_path and Path(cfg.measure_path).is_file():
        t0 = time.process_time()
        report["measured"] = measure_agreement(fb, read_jsonl(cfg.measure_path), principles)
        report["measured"]["path"] = str(cfg.measure_path)
        report["measured"]["cpu_seconds"] = round(time.process_time() - t0, 3)
        m = report["measured"]
        log.info(
            "ai_labels: agreement with gold %.3f (humans %.3f), with the humans %.3f on %d "
            "measured pairs; per principle %s",
            m["ensemble"]["agreement_gold"],
            m["humans_agreement_gold"],
            m["ensemble"]["agreement_human"],
            m["n"],
            {p.name: round(m[p.name]["agreement_gold"], 3) for p in principles},
        )
    else:
        log.info("ai_labels: measure_path %s missing: agreement not measured", cfg.measure_path)
    atomic_write_json(out / "labeler.json", report)
    log.info(
        "ai_labels: %d pairs labeled by %s (order disagreement %.3f, %.1f CPU s)",
        len(rows),
        fb.name,
        cmp.order_disagreement,
        label_cpu,
    )
    run.logger.log(0, {"pairs": len(rows), "order_disagreement": cmp.order_disagreement})
    run.logger.close()
    write_stage_done(
        out,
        {
            "stage": "ai_labels",
            "cost": run.cost.summary(),
            "feedback_model": {
                "name": fb.name,
                "cpu_seconds": round(fb.cpu_seconds, 3),
                "queries": fb.n_queries,
            },
            "pairs": len(rows),
        },
    )
    return out
