"""Smoke test of the benchmark's "ours" side (``bench/ours.py``) on a tiny random Llama.

The TRL side needs its own venvs (``make bench`` creates them) and is not run here.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "bench"


@pytest.fixture(scope="module")
def bench_mod(data_root):
    sys.path.insert(0, str(BENCH))
    import common
    import ours

    if not common.TOKENIZER_MODEL.exists():
        pytest.skip(f"{common.TOKENIZER_MODEL} not found")
    yield common, ours
    sys.path.remove(str(BENCH))


@pytest.fixture(scope="module")
def tiny_dir(bench_mod, tmp_path_factory):
    common, _ = bench_mod
    return common.build_model_dir("tiny", tmp_path_factory.mktemp("bench") / "tiny")


@pytest.mark.parametrize(
    "args",
    [
        ["--algo", "rm"],
        ["--algo", "grpo", "--shared-prompt"],
        ["--algo", "ppo", "--logprobs-from-rollout"],
        ["--algo", "gen"],
        pytest.param(["--algo", "dpo"], marks=pytest.mark.slow),
        pytest.param(["--algo", "ppo", "--value-model", "separate"], marks=pytest.mark.slow),
    ],
    ids=lambda a: "-".join(x.lstrip("-") for x in a[1:]),
)
def test_ours_child_reports_a_step_time(bench_mod, tiny_dir, tmp_path, args):
    _, ours = bench_mod
    out = tmp_path / "r.json"
    res = ours.main(
        [
            *args,
            "--model-dir",
            str(tiny_dir),
            "--warmup",
            "0",
            "--steps",
            "1",
            "--threads",
            "1",
            "--out",
            str(out),
        ]
    )
    assert json.loads(out.read_text()) == res
    assert res["s_per_step"] > 0 and res["steps_timed"] == 1 and res["peak_rss_mb"] > 0
    if args[1] == "gen":
        assert res["tok_s"] > 0


def test_tiny_model_shape(bench_mod, tiny_dir):
    common, _ = bench_mod
    cfg = json.loads((tiny_dir / "config.json").read_text())
    assert cfg["vocab_size"] == 32000 and cfg["tie_word_embeddings"] is True
    assert common.n_params(tiny_dir) == 32000 * 32 + 2 * (4 * 32 * 32 + 3 * 32 * 64 + 2 * 32) + 32


def test_report_renders_targets_from_bench_json():
    """``bench/report.py`` turns bench.json into the docs/performance.md tables, judging each target."""
    sys.path.insert(0, str(BENCH))
    try:
        import report
    finally:
        sys.path.remove(str(BENCH))
    row = {"ours_s_per_step": 4.0, "trl_s_per_step": 10.0, "ratio": 0.4}
    rss = {"ours_peak_rss_mb": 700.0, "trl_peak_rss_mb": 1000.0, "rss_ratio": 0.7}
    bench = {
        "ppo": {"35m": {**row, **rss}},
        "dpo": {"35m": {**row, "ratio": 0.65, **rss}},
        "generation": {"35m": {"ours_tok_s": 300.0, "hf_tok_s": 100.0, "speedup": 3.0}},
        "meta": {
            "targets": {"ppo": 0.5, "ppo_rss": 0.6, "dpo": 0.6, "generation": 2.0},
            "models": {"35m": {"params": 35_690_000}},
        },
    }
    text = report.render(bench)
    assert "**35m** (35.7M parameters)" in text
    assert "| ppo | 4.00 | 10.00 | 0.40 | ≤ 0.5: met; RSS ≤ 0.6: **missed** (0.70) |" in text
    assert "| dpo | 4.00 | 10.00 | 0.65 | ≤ 0.6: **missed** |" in text
    assert "| 3.00x | ≥ 2.0x: met |" in text
