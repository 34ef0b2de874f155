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
        ["--algo", "rm", "--shared-prompt"],
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
