"""Offline vs iterative online DPO on the demo (``+experiment=demo_online_dpo``).

Each arm (``arms``: name -> run under ``artifacts_dir``) and the demo's SFT policy are sampled on
the demo's test prompts exactly as the demo's evaluation samples them (one sample per prompt,
the same seed, length cap and temperature), so the SFT samples are the demo's own. Per arm: the
gold win-rate against SFT (ties count half, paired bootstrap CI), the gold reward, KL to SFT on
the arm's own sampled tokens (k1), the labels it trained on and its training cost; plus the
online arm's rounds and the arms against each other. Writes ``artifacts_dir/results.json``,
``samples/<arm>.jsonl`` and ``EVAL_REPORT.md`` (the section :func:`render_online_dpo_section`).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from rlhfstack.configs import OnlineDPOEvalConfig
from rlhfstack.evaluation.jobs.demo import _read_prompts, git_commit
from rlhfstack.evaluation.metrics import bootstrap_mean_ci, winrate_from_outcomes
from rlhfstack.evaluation.report import render_online_dpo_section
from rlhfstack.models.core import load_causal_lm, load_tokenizer
from rlhfstack.rollout.generate import sample_tokens, sampled_logprob_sums
from rlhfstack.runtime import (
    atomic_write_json,
    atomic_write_jsonl,
    atomic_write_text,
    write_stage_done,
)
from rlhfstack.tasks.demo import load_gold
from rlhfstack.tasks.stories import judge_outcomes
from rlhfstack.training import setup_run

log = logging.getLogger("rlhfstack.eval")

SAMPLE_SEED_OFFSET = 4242
"""The demo evaluation's sampling seed is ``seed + 4242`` (``evaluation/jobs/demo.py``)."""


def run_online_dpo_eval(cfg: OnlineDPOEvalConfig, command: str = "") -> Path:
    """The ``online_dpo_eval`` pipeline stage; returns ``artifacts_dir``."""
    run = setup_run(cfg)
    art, demo = Path(cfg.artifacts_dir), Path(cfg.demo_dir)
    device = run.device
    prompts = _read_prompts(cfg.test_prompts_path)
    gold = load_gold(demo, device)
    sft = load_causal_lm(str(demo / "sft" / "model"), trainable=False, device=device)
    tok = load_tokenizer(str(demo / "sft" / "model"))
    pad = tok.pad_token_id
    kw = dict(max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature, device=device)
    seed = cfg.seed + SAMPLE_SEED_OFFSET

    texts: dict[str, list[str]] = {}
    per: dict[str, dict[str, Any]] = {}
    for name, source in {"sft": None, **cfg.arms}.items():
        model = (
            sft
            if source is None
            else load_causal_lm(str(art / source / "model"), trainable=False, device=device)
        )
        sampled = sample_tokens(model, tok, prompts, seed=seed, **kw)
        run.cost.add_tokens(sampled.n_tokens)
        texts[name] = sampled.texts
        atomic_write_jsonl(
            art / "samples" / f"{name}.jsonl",
            [{"prompt": p, "completion": t} for p, t in zip(prompts, sampled.texts)],
        )
        lp_pi, _ = sampled_logprob_sums(model, sampled, pad, device=device)
        lp_sft, _ = sampled_logprob_sums(sft, sampled, pad, device=device)
        feats = gold.features(prompts, sampled.texts)
        per[name] = {
            "gold_reward": bootstrap_mean_ci(feats["gold"], cfg.n_bootstrap, cfg.seed),
            "kl_to_sft": bootstrap_mean_ci((lp_pi - lp_sft).numpy(), cfg.n_bootstrap, cfg.seed),
        }
        if source is not None:
            done = json.loads((art / source / "done.json").read_text())
            per[name].update(
                labels=done["labels"]
                if "labels" in done
                else sum(r["labels"] for r in done.get("rounds", [])),
                steps=done["steps"],
                cost=done["cost"],
                rounds=done.get("rounds"),
            )
        log.info(
            "%s: gold %.3f kl %.2f",
            name,
            per[name]["gold_reward"]["mean"],
            per[name]["kl_to_sft"]["mean"],
        )

    def winrate(a: str, b: str) -> dict[str, Any]:
        out = judge_outcomes(prompts, texts[a], texts[b], gold)["gold"]
        return winrate_from_outcomes(out, cfg.n_bootstrap, cfg.seed)

    arms = list(cfg.arms)
    rates = {f"{a}_vs_sft": winrate(a, "sft") for a in arms}
    rates.update({f"{a}_vs_{b}": winrate(a, b) for i, a in enumerate(arms) for b in arms[:i]})
    results = {
        "commit": git_commit(),
        "command": command,
        "n_prompts": len(prompts),
        "demo_dir": str(demo),
        "winrate": rates,
        "policies": per,
        "cost": {a: per[a]["cost"] for a in arms} | {"eval": run.cost.summary()},
    }
    atomic_write_json(art / "results.json", results)
    atomic_write_text(art / "EVAL_REPORT.md", render_online_dpo_section(results))
    run.logger.log(0, {f"winrate/{k}": v["rate"] for k, v in rates.items()})
    run.logger.close()
    write_stage_done(run.run_dir, {"stage": "online_dpo_eval", "cost": results["cost"]["eval"]})
    return art
