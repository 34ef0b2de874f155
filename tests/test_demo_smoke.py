"""The embedded demo at minimum sizes: every stage runs, every output appears, every number is finite,
and PPO's invariants hold on the real pipeline (ratio 1 and KL 0 before the first update)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from rlhfstack.runtime import read_jsonl


def _finite(x) -> bool:
    if isinstance(x, dict):
        return all(_finite(v) for v in x.values())
    if isinstance(x, list):
        return all(_finite(v) for v in x)
    if isinstance(x, float):
        return math.isfinite(x)
    return True


def test_every_output_appears(smoke: Path):
    for rel in [
        "results.json",
        "EVAL_REPORT.md",
        "samples/sft.jsonl",
        "samples/dpo.jsonl",
        "samples/ppo.jsonl",
        "base_model/config.json",
        "sft/model/config.json",
        "rm/model/reward_config.json",
        "rm/calibration.png",
        "ppo/model/config.json",
        "dpo/model/config.json",
    ]:
        assert (smoke / rel).exists(), rel
    for stage in ("sft", "rm", "ppo", "dpo"):
        d = smoke / stage
        assert (d / "config.yaml").exists()
        assert list((d / "tb").glob("events.out.tfevents.*")), stage
        rows = read_jsonl(d / "metrics.jsonl")
        assert rows and all("step" in r and "loss" in r for r in rows), stage
        assert all(_finite(r) for r in rows), stage
        # one dashboard image per stage (the RM's calibration diagrams beside it)
        pngs = {p.name for p in d.rglob("*.png") if not p.name.startswith("calibration")}
        assert pngs == {"dashboard.png"}, (stage, pngs)
    assert "![PPO dashboard](ppo/dashboard.png)" in (smoke / "EVAL_REPORT.md").read_text()


def test_results_keys_and_finite(smoke: Path):
    res = json.loads((smoke / "results.json").read_text())
    for k in ("ppo_vs_sft", "dpo_vs_sft", "ppo_vs_dpo"):
        w = res["winrate"][k]
        assert 0.0 <= w["rate"] <= 1.0 and len(w["ci95"]) == 2 and w["n"] >= 256
    assert 0.0 <= res["rm"]["heldout_accuracy_gold"] <= 1.0
    for stage in ("data", "sft", "rm", "ppo", "dpo", "eval"):
        assert res["cost"][stage]["cpu_seconds"] > 0
    assert _finite(res)


def test_samples_cover_the_same_test_prompts(smoke: Path):
    rows = {n: read_jsonl(smoke / "samples" / f"{n}.jsonl") for n in ("sft", "dpo", "ppo")}
    assert all(len(r) >= 256 for r in rows.values())
    prompts = [[r["prompt"] for r in rs] for rs in rows.values()]
    test = [r["prompt"] for r in read_jsonl(smoke / "data" / "prompts_test.jsonl")]
    assert prompts[0] == prompts[1] == prompts[2] == test


def test_dev_winrates_beside_the_test_ones(smoke: Path):
    res = json.loads((smoke / "results.json").read_text())
    dev = [r["prompt"] for r in read_jsonl(smoke / "data" / "prompts_dev.jsonl")]
    assert res["n_prompts_dev"] == len(dev) > 0
    assert res["winrate_dev"].keys() == res["winrate"].keys()
    assert all(w["n"] == len(dev) for w in res["winrate_dev"].values())
    assert res["n_prompts"] == res["winrate"]["ppo_vs_sft"]["n"]
    report = (smoke / "EVAL_REPORT.md").read_text()
    assert f"Dev split ({len(dev)} prompts" in report


def test_eval_scores_exactly_the_sampled_tokens(smoke: Path):
    """No EOS that was not sampled: a response cut by the budget ends without one, and the
    length is the number of sampled tokens."""
    from rlhfstack.models.core import load_tokenizer

    eos = load_tokenizer(str(smoke / "sft" / "model")).eos_token_id
    res = json.loads((smoke / "results.json").read_text())
    for name in ("sft", "dpo", "ppo"):
        rows = read_jsonl(smoke / "samples" / f"{name}.jsonl")
        assert not all(r["ended"] for r in rows)  # 8 new tokens: most do not end
        for r in rows:
            assert (r["response_ids"][-1] == eos) == r["ended"]
            assert eos not in r["response_ids"][:-1] and 1 <= len(r["response_ids"]) <= 8
        n_sampled = sum(len(r["response_ids"]) for r in rows) / len(rows)
        assert res["policies"][name]["length_tokens"] == pytest.approx(n_sampled)
        assert res["policies"][name]["ended_frac"] == pytest.approx(
            sum(r["ended"] for r in rows) / len(rows)
        )
    assert res["policies"]["sft"]["kl_to_sft"]["mean"] == 0.0


def test_ppo_first_minibatch_ratio_is_one_and_kl_zero(smoke: Path):
    first = read_jsonl(smoke / "ppo" / "metrics.jsonl")[0]
    assert first["step"] == 1
    assert first["first_minibatch_ratio"] == pytest.approx(1.0, abs=1e-6)
    assert abs(first["first_minibatch_approx_kl"]) < 1e-6
    # policy == reference before any update; the old log-probs come from the rollout's KV-cache
    # passes and the reference's from a full forward: equal up to float rounding (~1e-7 a token)
    assert first["kl/seq_k1"] == pytest.approx(0.0, abs=1e-5)
