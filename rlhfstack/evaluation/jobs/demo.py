"""Evaluate pi_sft, pi_dpo and pi_ppo on the test prompts; write results.json and EVAL_REPORT.md.

For each policy: one sample per test prompt (same prompts, same sampling settings), kept as the
sampled token ids, scored by the hidden gold reward, the noiseless judge pool and the proxy RM
(read at the last sampled token, as PPO's rollout scoring reads it); KL to the SFT policy on the
policy's own sampled tokens (k1, an unbiased estimate of KL(pi || pi_sft) per sequence; an EOS
counts only where it was sampled); length in sampled tokens, distinct-n, repetition; the
alignment tax as NLL per token of held-out base-model text. The dev prompts (PPO's periodic gold
evaluation, any tuning) get gold win-rates only (``winrate_dev``): the test split is the one
nothing was tuned on.
"""

from __future__ import annotations

import json
import logging
import subprocess
from pathlib import Path
from typing import Any

import numpy as np
import torch

from rlhfstack.configs import EvalConfig
from rlhfstack.data import map_records, require_field
from rlhfstack.data.collate import collate_sft, tokenize_sft
from rlhfstack.data.schemas import SFTExample
from rlhfstack.data.text_stats import repetition_rate
from rlhfstack.evaluation.metrics import (
    bootstrap_mean_ci,
    distinct_n,
    winrate_from_outcomes,
)
from rlhfstack.evaluation.report import results_table, task_facts, write_eval_report
from rlhfstack.logs import close_stage_log
from rlhfstack.models.core import load_causal_lm, load_tokenizer, sequence_logprob_sums
from rlhfstack.rewards import load_reward, score_samples
from rlhfstack.rollout.generate import sample_tokens, sampled_logprob_sums
from rlhfstack.runtime import atomic_write_json, atomic_write_jsonl, read_jsonl, write_stage_done
from rlhfstack.tasks.demo import load_gold
from rlhfstack.tasks.stories import judge_outcomes
from rlhfstack.training import log_stage_summary, setup_run

log = logging.getLogger("rlhfstack.eval")

PAIRS = (("ppo", "sft"), ("dpo", "sft"), ("ppo", "dpo"))


@torch.no_grad()
def _seq_logprobs(
    model, tok, prompts, completions, device, max_len=160
) -> tuple[np.ndarray, np.ndarray]:
    """Sum of completion-token log-probs (EOS appended) and the token counts, per example: for
    texts that were not sampled by ``model`` (the alignment tax's base-model text)."""
    ex = [
        SFTExample(prompt=p, completion=c if c.strip() else ".")
        for p, c in zip(prompts, completions)
    ]
    items = tokenize_sft(ex, tok, max_len)
    sums, counts = [], []
    for i in range(0, len(items), 64):
        b = collate_sft(items[i : i + 64], tok.pad_token_id)
        mask = (b["labels"] != -100).long()
        s = sequence_logprob_sums(
            model, b["input_ids"].to(device), b["attention_mask"].to(device), mask.to(device)
        )
        sums.append(s.cpu().numpy())
        counts.append(mask[:, 1:].sum(-1).numpy())
    return np.concatenate(sums), np.concatenate(counts)


#: what the demo targets write into the checkout (the published report): not a code change
REPORT_OUTPUTS = ("EVAL_REPORT.md", "docs/eval_report")


def git_commit() -> str:
    """Short HEAD hash, with " + uncommitted changes" when tracked files other than the
    published report (:data:`REPORT_OUTPUTS`, rewritten by ``make demo``) differ from it."""
    try:
        head = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True
        ).stdout.strip()
        top = subprocess.run(
            ["git", "rev-parse", "--show-toplevel"], capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            [
                "git",
                "-C",
                top,
                "status",
                "--porcelain",
                "--untracked-files=no",
                "--",
                ".",
                *(f":!{p}" for p in REPORT_OUTPUTS),
            ],  # fmt: skip
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except Exception:
        return "unknown"
    return f"{head} + uncommitted changes" if dirty else head


def _winrates(
    prompts: list[str], samples: dict[str, list[str]], gold, n_bootstrap: int, seed: int
) -> tuple[dict, dict]:
    """Gold and noiseless-judge-pool win-rates of each pair in :data:`PAIRS` that was sampled."""
    winrate, judge_winrate = {}, {}
    for a, b in PAIRS:
        if a in samples and b in samples:
            out = judge_outcomes(prompts, samples[a], samples[b], gold)
            winrate[f"{a}_vs_{b}"] = winrate_from_outcomes(out["gold"], n_bootstrap, seed)
            judge_winrate[f"{a}_vs_{b}"] = winrate_from_outcomes(out["judge"], n_bootstrap, seed)
    return winrate, judge_winrate


def _prompt_of(row: Any) -> str:
    return require_field(row, "prompt", str)


def _read_prompts(path: str | Path) -> list[str]:
    """The ``prompt`` of each row of a jsonl file; errors name file, line and field."""
    return map_records(path, _prompt_of, fmt="jsonl", data_root=".")


def run_demo_eval(cfg: EvalConfig, command: str = "") -> Path:
    """The demo pipeline's ``eval`` stage (``eval/evaluate_demo.py``): ``run_dir`` holds its
    config and ``done.json``; ``artifacts_dir`` gets ``results.json``, ``samples/`` and the report."""
    run = setup_run(cfg)
    art = Path(cfg.artifacts_dir)
    device = run.device
    prompts = _read_prompts(cfg.test_prompts_path)
    dev_prompts = _read_prompts(cfg.dev_prompts_path) if cfg.dev_prompts_path else []
    gold = load_gold(art, device)
    held_text = read_jsonl(art / "data" / "heldout_text.jsonl")
    sft_model = load_causal_lm(str(art / "sft" / "model"), trainable=False, device=device)
    tok = load_tokenizer(str(art / "sft" / "model"))
    reward = load_reward(art / "rm" / "model", tok, device=device)  # the proxy, as PPO reads it
    pad = tok.pad_token_id
    sample_kw = dict(max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature, device=device)

    samples: dict[str, list[str]] = {}
    dev_samples: dict[str, list[str]] = {}
    per: dict[str, dict] = {}
    for name in cfg.policies:
        mdir = art / name / "model"
        model = (
            sft_model
            if name == "sft"
            else load_causal_lm(str(mdir), trainable=False, device=device)
        )
        # one sampling seed for both splits (they hold different prompts)
        sampled = sample_tokens(
            model, tok, prompts, seed=cfg.seed + 4242, progress=f"{name} sample", **sample_kw
        )
        run.cost.add_tokens(sampled.n_tokens)
        texts = sampled.texts
        samples[name] = texts
        atomic_write_jsonl(
            art / "samples" / f"{name}.jsonl",
            [
                {"prompt": p, "completion": t, "ended": e, "prompt_ids": pi, "response_ids": ri}
                for p, t, e, pi, ri in zip(
                    prompts, texts, sampled.ended, sampled.prompt_ids, sampled.response_ids
                )
            ],
        )
        if dev_prompts:
            dev = sample_tokens(
                model,
                tok,
                dev_prompts,
                seed=cfg.seed + 4242,
                progress=f"{name} dev sample",
                **sample_kw,
            )
            run.cost.add_tokens(dev.n_tokens)
            dev_samples[name] = dev.texts
        feats = gold.features(prompts, texts)
        proxy = score_samples(reward, prompts, sampled, pad, device=device).numpy()
        lp_pi, n_pi = (x.numpy() for x in sampled_logprob_sums(model, sampled, pad, device=device))
        lp_sft, _ = sampled_logprob_sums(sft_model, sampled, pad, device=device)
        tax_lp, tax_n = _seq_logprobs(
            model,
            tok,
            [r["prompt"] for r in held_text],
            [r["completion"] for r in held_text],
            device,
        )
        per[name] = {
            "gold_reward": bootstrap_mean_ci(feats["gold"], cfg.n_bootstrap, cfg.seed),
            "sentiment": float(np.mean(feats["sentiment"])),
            "fluency": float(np.mean(feats["fluency"])),
            "proxy_reward": bootstrap_mean_ci(proxy, cfg.n_bootstrap, cfg.seed),
            "kl_to_sft": bootstrap_mean_ci(lp_pi - lp_sft.numpy(), cfg.n_bootstrap, cfg.seed),
            "length_tokens": float(np.mean(n_pi)),
            "length_words": float(np.mean(feats["length_words"])),
            "ended_frac": float(np.mean(sampled.ended)),
            "distinct_1": distinct_n(texts, 1),
            "distinct_2": distinct_n(texts, 2),
            "repetition_3gram": float(np.mean([repetition_rate(t, 3) for t in texts])),
            "heldout_nll_per_token": float(-tax_lp.sum() / max(1, tax_n.sum())),
        }
        log.info(
            "%s: gold %.3f proxy %.3f kl %.2f len %.1f",
            name,
            per[name]["gold_reward"]["mean"],
            per[name]["proxy_reward"]["mean"],
            per[name]["kl_to_sft"]["mean"],
            per[name]["length_tokens"],
        )

    winrate, judge_winrate = _winrates(prompts, samples, gold, cfg.n_bootstrap, cfg.seed)
    winrate_dev, judge_winrate_dev = _winrates(
        dev_prompts, dev_samples, gold, cfg.n_bootstrap, cfg.seed
    )
    sft_nll = per.get("sft", {}).get("heldout_nll_per_token")
    for name in per:
        if sft_nll is not None:
            per[name]["alignment_tax_nll"] = per[name]["heldout_nll_per_token"] - sft_nll

    rm_results = json.loads((art / "rm" / "rm_results.json").read_text())
    labelers = json.loads((art / "data" / "labelers.json").read_text())
    cost = {}
    for stage in ("data", "sft", "rm", "ppo", "dpo"):
        done = art / stage / "done.json"
        if done.exists():
            cost[stage] = json.loads(done.read_text())["cost"]
    cost["eval"] = run.cost.summary()
    results = {
        "commit": git_commit(),
        "command": command,
        "n_prompts": len(prompts),
        "n_prompts_dev": len(dev_prompts),
        "task": task_facts(art),
        "winrate": winrate,
        "judge_winrate": judge_winrate,
        "winrate_dev": winrate_dev,
        "judge_winrate_dev": judge_winrate_dev,
        "policies": per,
        "rm": {
            "heldout_accuracy": rm_results["heldout_accuracy"],
            "heldout_accuracy_gold": rm_results.get("heldout_accuracy_gold"),
            "heldout_ece": rm_results["heldout"]["ece"],
            "normalization": rm_results["normalization"],
        },
        "labelers": labelers,
        "cost": cost,
        "targets": _targets(winrate, per),
    }
    atomic_write_json(art / "results.json", results)
    report = write_eval_report(art, results)
    run.logger.log(0, {"loss": 0.0})
    run.logger.close()
    write_stage_done(run.run_dir, {"stage": "eval", "cost": cost["eval"]})
    for line in [*results_table(results), f"report: {report}"]:
        log.info("%s", line)
    log_stage_summary("eval", run.run_dir, cost=cost["eval"], headline={})
    close_stage_log()
    return art


def _targets(winrate: dict, per: dict) -> dict:
    """The demo's targets (issue: PPO vs SFT >= 0.65 with CI low > 0.5; DPO vs SFT >= 0.60;
    PPO distinct-2 within 20% of SFT's), each with ``met``."""
    t = {}
    if "ppo_vs_sft" in winrate:
        w = winrate["ppo_vs_sft"]
        t["ppo_vs_sft_rate_ge_0.65_ci_lo_gt_0.5"] = {
            "value": w["rate"],
            "ci95": w["ci95"],
            "met": bool(w["rate"] >= 0.65 and w["ci95"][0] > 0.5),
        }
    if "dpo_vs_sft" in winrate:
        w = winrate["dpo_vs_sft"]
        t["dpo_vs_sft_rate_ge_0.60"] = {"value": w["rate"], "met": bool(w["rate"] >= 0.60)}
    if "ppo" in per and "sft" in per:
        r = per["ppo"]["distinct_2"] / max(1e-9, per["sft"]["distinct_2"])
        t["ppo_distinct2_within_20pct_of_sft"] = {"value": r, "met": bool(abs(r - 1) <= 0.2)}
    return t
