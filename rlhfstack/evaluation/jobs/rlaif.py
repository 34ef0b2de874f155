"""RLHF vs RLAIF on the demo's test prompts: the ``rlaif_eval`` stage of ``+experiment=demo_rlaif``.

The RLAIF policy (and the SL-CAI policy) sample one continuation per test prompt with the demo
eval's sampling settings and seed; the demo's own SFT and PPO (RLHF) samples are read from its
``samples/``. Verdicts come from the hidden gold reward only (the noiseless judge pool of the demo
report is made of the simulated labelers, which this run never calls).

Writes into ``artifacts_dir`` (``runs/demo_rlaif``):
    results.json            winrate.{rlaif_vs_sft, rlaif_vs_rlhf, sl_cai_vs_sft}: {rate, ci95, n};
                            reference.winrate.rlhf_vs_sft (the demo's); gold per policy;
                            ai_labeler.{agreement_gold, agreement_human, order_disagreement,
                            per_principle}; cost.<stage>.cpu_seconds and cost.feedback_model
    samples/rlaif.jsonl     {prompt, completion} over the test prompts (and samples/sl_cai.jsonl)
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from rlhfstack.configs import RLAIFEvalConfig
from rlhfstack.data import map_records, require_field
from rlhfstack.evaluation.jobs.demo import git_commit
from rlhfstack.evaluation.metrics import bootstrap_mean_ci, winrate_from_outcomes
from rlhfstack.models.core import load_causal_lm, load_tokenizer
from rlhfstack.rollout.generate import sample_tokens
from rlhfstack.runtime import atomic_write_json, atomic_write_jsonl, read_jsonl, write_stage_done
from rlhfstack.tasks.demo import load_gold
from rlhfstack.tasks.stories import gold_judge
from rlhfstack.training import setup_run

log = logging.getLogger("rlhfstack.eval.rlaif")

#: stages of the RLAIF pipeline whose cost is reported (those that ran)
COST_STAGES = ("rlaif_data", "cai_sl", "sft", "ai_labels", "rm", "ppo")


def _reference_samples(ref: Path, name: str, prompts: list[str]) -> list[str]:
    path = ref / "samples" / f"{name}.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: the demo's {name} samples (run `make demo` first)")
    rows = read_jsonl(path)
    got = [r["prompt"] for r in rows]
    if got != prompts:
        raise ValueError(f"{path}: its prompts are not this run's test prompts (another demo run?)")
    return [r["completion"] for r in rows]


def _stage_costs(art: Path, sl_dir: Path | None) -> dict[str, Any]:
    cost: dict[str, Any] = {}
    dirs = {s: art / ("data" if s == "rlaif_data" else s) for s in COST_STAGES}
    if sl_dir is not None:
        dirs["sft"] = sl_dir  # the SL-CAI fine-tune (the sft stage, run_dir inside cai_sl/)
    fb_cpu = 0.0
    for stage, d in dirs.items():
        done = d / "done.json"
        if done.is_file():
            info = json.loads(done.read_text())
            cost[stage] = info.get("cost", {})
            fb_cpu += float(info.get("feedback_model", {}).get("cpu_seconds", 0.0))
    cost["feedback_model"] = {"cpu_seconds": round(fb_cpu, 3)}
    return cost


def run_rlaif_eval(cfg: RLAIFEvalConfig, command: str = "") -> Path:
    """Sample the RLAIF (and SL-CAI) policy on the test prompts, compare with the demo's SFT and
    PPO samples by gold, write ``results.json`` and ``samples/``."""
    run = setup_run(cfg)
    art, ref = Path(cfg.artifacts_dir), Path(cfg.reference_dir)
    prompts = map_records(
        art / "data" / "prompts_test.jsonl",
        lambda r: require_field(r, "prompt", str),
        fmt="jsonl",
        data_root=".",
    )
    gold = load_gold(art, run.device)
    texts = {name: _reference_samples(ref, name, prompts) for name in ("sft", "ppo")}
    policies = {"rlaif": cfg.policy_path}
    if cfg.sl_policy_path:
        policies["sl_cai"] = cfg.sl_policy_path
    for name, path in policies.items():
        model = load_causal_lm(str(path), trainable=False, device=run.device)
        tok = load_tokenizer(str(path))
        sampled = sample_tokens(
            model,
            tok,
            prompts,
            seed=cfg.seed + cfg.sample_seed_offset,
            max_new_tokens=cfg.max_new_tokens,
            temperature=cfg.temperature,
            device=run.device,
        )
        run.cost.add_tokens(sampled.n_tokens)
        texts[name] = sampled.texts
        atomic_write_jsonl(
            art / "samples" / f"{name}.jsonl",
            [{"prompt": p, "completion": t} for p, t in zip(prompts, sampled.texts)],
        )
    feats = {name: gold.features(prompts, t) for name, t in texts.items()}

    def winrate(a: str, b: str) -> dict:
        out = gold_judge(feats[a], feats[b])
        return winrate_from_outcomes(out, cfg.n_bootstrap, cfg.seed)

    winrates = {"rlaif_vs_sft": winrate("rlaif", "sft"), "rlaif_vs_rlhf": winrate("rlaif", "ppo")}
    winrates["rlhf_vs_sft"] = winrate("ppo", "sft")
    if "sl_cai" in texts:
        winrates["sl_cai_vs_sft"] = winrate("sl_cai", "sft")
        winrates["rlaif_vs_sl_cai"] = winrate("rlaif", "sl_cai")
    labeler = json.loads((art / "ai_labels" / "labeler.json").read_text())
    measured = labeler.get("measured", {})
    principle_names = [k for k in measured if isinstance(measured.get(k), dict)]
    sl_dir = Path(cfg.sl_policy_path).parent if cfg.sl_policy_path else None
    results = {
        "commit": git_commit(),
        "command": command,
        "n_prompts": len(prompts),
        "reference_dir": str(ref.resolve()),
        "winrate": winrates,
        "gold_reward": {
            name: bootstrap_mean_ci(f["gold"], cfg.n_bootstrap, cfg.seed)
            for name, f in feats.items()
        },
        "ai_labeler": {
            "model": labeler.get("feedback_model"),
            "principles": labeler.get("principles"),
            "agreement_gold": measured.get("ensemble", {}).get("agreement_gold"),
            "agreement_human": measured.get("ensemble", {}).get("agreement_human"),
            "humans_agreement_gold": measured.get("humans_agreement_gold"),
            "order_disagreement": labeler.get("order_disagreement"),
            "n_measured": measured.get("n"),
            "n_labeled_pairs": labeler.get("n_pairs"),
            "per_principle": {k: measured[k] for k in principle_names if k != "ensemble"},
        },
        "cost": _stage_costs(art, sl_dir),
        "samples": {name: f"samples/{name}.jsonl" for name in policies},
    }
    results["cost"]["rlaif_eval"] = run.cost.summary()  # this stage, up to here
    atomic_write_json(art / "results.json", results)
    log.info(
        "RLAIF vs SFT %.3f %s, vs RLHF %.3f %s (gold, %d test prompts)",
        winrates["rlaif_vs_sft"]["rate"],
        winrates["rlaif_vs_sft"]["ci95"],
        winrates["rlaif_vs_rlhf"]["rate"],
        winrates["rlaif_vs_rlhf"]["ci95"],
        len(prompts),
    )
    run.logger.close()
    write_stage_done(run.run_dir, {"stage": "rlaif_eval", "cost": run.cost.summary()})
    return art
