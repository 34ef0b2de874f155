"""Gao et al. over-optimization fit: parameter recovery, peak location, report files."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from rlhfstack.evaluation.jobs.overopt import overoptimization_report
from rlhfstack.evaluation.overopt import fit_gao, gao_curve, read_kl_rewards

REPO = Path(__file__).resolve().parent.parent


def test_gao_curve_limits_and_peak():
    assert gao_curve(0.0, 1.0, 0.5, offset=0.3) == pytest.approx(0.3)
    alpha, beta = 1.0, 0.5
    d_star = math.exp(alpha / beta - 1)
    eps = 1e-4
    # zero slope at d*, maximum there, value beta * d*
    assert gao_curve(d_star - eps, alpha, beta) < gao_curve(d_star, alpha, beta)
    assert gao_curve(d_star + eps, alpha, beta) < gao_curve(d_star, alpha, beta)
    assert gao_curve(d_star, alpha, beta) == pytest.approx(beta * d_star)


@pytest.mark.parametrize("offset", [True, False])
def test_fit_recovers_parameters(offset):
    rng = np.random.default_rng(0)
    alpha, beta, r0 = 0.8, 0.4, (0.25 if offset else 0.0)
    d = np.concatenate([[0.0], np.linspace(0.05, 6.0, 40)])
    y = gao_curve(d, alpha, beta, r0) + rng.normal(0, 0.005, d.size)
    fit = fit_gao(d, y, offset=offset)
    assert fit["alpha"] == pytest.approx(alpha, abs=0.02)
    assert fit["beta"] == pytest.approx(beta, abs=0.01)
    if offset:
        assert fit["offset"] == pytest.approx(r0, abs=0.02)
    assert fit["peaked"] and fit["peak_in_range"]
    d_star = math.exp(alpha / beta - 1)
    assert fit["d_star"] == pytest.approx(d_star, rel=0.05)
    assert fit["kl_star"] == pytest.approx(d_star**2, rel=0.1)
    assert fit["r2"] > 0.99


def test_monotone_reward_has_no_peak():
    d = np.linspace(0.1, 3.0, 20)
    fit = fit_gao(d, 0.5 * d + 0.1 * d * np.log(d))  # beta = -0.1 < 0
    assert not fit["peaked"] and fit["kl_star"] is None and fit["d_star"] is None


def test_fit_needs_enough_points():
    with pytest.raises(ValueError, match=">= 3 points"):
        fit_gao([0.1, 0.2], [0.0, 1.0])
    fit = fit_gao([0.1, 0.2, np.nan, 0.5], [0.0, 0.3, 1.0, 0.4])  # NaN dropped -> 3 points
    assert fit["n"] == 3


def _write_run(run_dir: Path, alpha=1.0, beta=0.5, n=30, seed=0) -> None:
    """A PPO-like metrics.jsonl: training rows carry kl/seq_k1; gold eval every 3rd step."""
    rng = np.random.default_rng(seed)
    run_dir.mkdir(parents=True, exist_ok=True)
    with open(run_dir / "metrics.jsonl", "w") as f:
        for step in range(1, n + 1):
            kl = (0.15 * step) ** 2
            row = {"step": step, "kl/seq_k1": kl, "loss": 1.0}
            if step % 3 == 0 or step == 1:
                d = math.sqrt(kl)
                row["eval/gold_reward"] = float(gao_curve(d, alpha, beta) + rng.normal(0, 0.01))
                row["eval/proxy_reward"] = float(0.9 * d + rng.normal(0, 0.01))
            f.write(json.dumps(row) + "\n")


def test_read_kl_rewards_keeps_eval_rows(tmp_path):
    _write_run(tmp_path / "run")
    data = read_kl_rewards(tmp_path / "run")
    assert data["step"].tolist() == [1] + list(range(3, 31, 3))
    assert np.isfinite(data["gold"]).all() and np.isfinite(data["proxy"]).all()


def test_report_writes_json_and_png(tmp_path):
    _write_run(tmp_path / "run", alpha=1.0, beta=0.5)
    res = overoptimization_report(tmp_path / "run", tmp_path / "out")
    written = json.loads((tmp_path / "out" / "overoptimization.json").read_text())
    assert written["kl_star"] == pytest.approx(res["kl_star"])
    assert (tmp_path / "out" / "overoptimization.png").stat().st_size > 1000
    # true d* = e^(1/0.5 - 1) = e, KL* = e^2 ~ 7.39; observed d spans 0.15..4.5
    assert res["d_star"] == pytest.approx(math.e, rel=0.1)
    assert res["kl_star"] == pytest.approx(math.e**2, rel=0.2)
    assert res["gold_fit"]["peak_in_range"]
    assert not res["proxy_fit"]["peaked"] or res["proxy_fit"]["d_star"] > 4.5
    assert res["observed_gold_peak"]["d"] == pytest.approx(math.e, abs=0.5)


def test_missing_file_and_empty_rows(tmp_path):
    with pytest.raises(FileNotFoundError):
        read_kl_rewards(tmp_path / "nope")
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "metrics.jsonl").write_text(json.dumps({"step": 1, "loss": 1}) + "\n")
    with pytest.raises(ValueError, match="no rows"):
        overoptimization_report(tmp_path / "run", tmp_path / "out")


def test_cli_entry_point(tmp_path):
    _write_run(tmp_path / "run")
    out = tmp_path / "out"
    proc = subprocess.run(
        [
            sys.executable,
            str(REPO / "eval" / "overoptimization.py"),
            f"run_dir={tmp_path / 'run'}",
            f"output_dir={out}",
        ],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert (out / "overoptimization.json").exists() and (out / "overoptimization.png").exists()
    assert (out / "config.yaml").exists()


def test_rows_of_one_step_are_merged(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    with open(run / "metrics.jsonl", "w") as f:
        for step in range(1, 6):
            f.write(json.dumps({"step": step, "kl/seq_k1": 0.1 * step}) + "\n")
            f.write(json.dumps({"step": step, "eval/gold_reward": float(step)}) + "\n")
    data = read_kl_rewards(run)
    assert data["step"].tolist() == [1, 2, 3, 4, 5]
    assert data["kl"].tolist() == pytest.approx([0.1, 0.2, 0.3, 0.4, 0.5])
    assert np.isnan(data["proxy"]).all()
