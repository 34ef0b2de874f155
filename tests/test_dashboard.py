"""Plots people read: PPO's KL panel has its target line, gold and proxy against sqrt(KL) are
points with Gao et al.'s fitted curves (no line joining them in step order), and every stage
draws one dashboard image, redrawn at each evaluation while it runs."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

from rlhfstack.configs import load_config, to_object  # noqa: E402
from rlhfstack.dashboard import TRAINING_PANELS, Panel, draw_dashboard  # noqa: E402
from rlhfstack.evaluation.jobs.plots import ppo_dashboard_panels  # noqa: E402
from rlhfstack.evaluation.overopt import fit_gao, gao_curve, plot_gao_fits  # noqa: E402
from rlhfstack.runtime import read_jsonl  # noqa: E402


def _ppo_rows() -> list[dict]:
    """12 PPO iterations; gold / proxy every 3rd, with KL that goes down as well as up, so step
    order is not d order (a line joined in step order would zigzag)."""
    kl = [0.0, 0.5, 1.2, 2.0, 1.6, 2.4, 3.1, 2.7, 3.6, 4.2, 3.9, 4.5]
    rows = []
    for i, k in enumerate(kl, start=1):
        d = np.sqrt(k)
        row = {"step": i, "kl/seq_k1": k, "reward/rm_score": 0.1 * i, "entropy": 1.5 - 0.01 * i}
        if i % 3 == 0 or i == 1:
            row["eval/gold_reward"] = float(gao_curve(d, 0.6, 0.4, 0.2))
            row["eval/proxy_reward"] = float(0.3 + 0.8 * d)
        rows.append(row)
    return rows


def _axes(fig, title: str):
    (ax,) = [a for a in fig.axes if a.get_title() == title]
    return ax


def test_kl_panel_has_a_line_at_the_kl_target():
    fig = draw_dashboard(_ppo_rows(), ppo_dashboard_panels(kl_target=4.0))
    ax = _axes(fig, "KL to reference (nats / sequence)")
    flat = [ln for ln in ax.get_lines() if np.all(np.asarray(ln.get_ydata()) == 4.0)]
    assert len(flat) == 1 and flat[0].get_label() == "KL target 4"
    # axhline: spans the axes whatever the x range (x in axes coordinates 0..1)
    assert list(flat[0].get_xdata()) == [0, 1]
    plt.close(fig)
    # the fixed controller has no target: no line
    fig = draw_dashboard(_ppo_rows(), ppo_dashboard_panels(kl_target=None))
    ax = _axes(fig, "KL to reference (nats / sequence)")
    assert [ln.get_label() for ln in ax.get_lines()] == ["kl/seq_k1"]
    plt.close(fig)


def test_gold_and_proxy_vs_sqrt_kl_are_points_with_fitted_curves():
    rows = [r for r in _ppo_rows() if "eval/gold_reward" in r]
    kl_C = np.array([r["kl/seq_k1"] for r in rows])
    gold_C = np.array([r["eval/gold_reward"] for r in rows])
    proxy_C = np.array([r["eval/proxy_reward"] for r in rows])
    fig, ax = plt.subplots()
    fits = plot_gao_fits(ax, kl_C, {"gold": gold_C, "proxy": proxy_C}, form="rl")
    # the checkpoints: markers only (scatter collections at (sqrt(KL), reward))
    assert len(ax.collections) == 2
    np.testing.assert_allclose(ax.collections[0].get_offsets(), np.c_[np.sqrt(kl_C), gold_C])
    np.testing.assert_allclose(ax.collections[1].get_offsets(), np.c_[np.sqrt(kl_C), proxy_C])
    # the only lines are the two fitted curves over a grid, never the points joined
    lines = ax.get_lines()
    assert len(lines) == 2
    for ln, fit in zip(lines, (fits["gold"], fits["proxy"])):
        x = np.asarray(ln.get_xdata())
        assert x.size == 200 and np.all(np.diff(x) > 0)  # a grid in d, not the checkpoints
        np.testing.assert_allclose(
            ln.get_ydata(), gao_curve(x, fit["alpha"], fit["beta"], fit["offset"])
        )
    # the gold points lie on an exact RL curve: the fit finds it
    assert fits["gold"]["alpha"] == pytest.approx(0.6) and fits["gold"]["beta"] == pytest.approx(
        0.4
    )
    plt.close(fig)
    # the same drawing is PPO's dashboard panel
    fig = draw_dashboard(_ppo_rows(), ppo_dashboard_panels(kl_target=4.0))
    ax = _axes(fig, "gold and proxy reward vs sqrt(KL)")
    assert len(ax.collections) == 2 and len(ax.get_lines()) == 2
    plt.close(fig)


def test_fewer_than_three_points_draw_points_without_a_fit():
    fig, ax = plt.subplots()
    fits = plot_gao_fits(ax, np.array([0.0, 1.0]), {"gold": np.array([0.1, 0.3])})
    assert fits == {"gold": None} and len(ax.collections) == 1 and not ax.get_lines()
    plt.close(fig)


def test_best_of_n_form_fits_its_curve():
    d = np.linspace(0.2, 3.0, 12)
    fit = fit_gao(d, gao_curve(d, 1.0, 0.25, 0.1, form="bon"), form="bon")
    assert fit["alpha"] == pytest.approx(1.0) and fit["beta"] == pytest.approx(0.25)
    assert fit["d_star"] == pytest.approx(2.0)  # alpha / (2 beta)
    assert fit["reward_at_peak"] == pytest.approx(0.1 + 1.0)  # R0 + beta d*^2
    with pytest.raises(ValueError, match="form"):
        fit_gao(d, d, form="linear")


def test_dashboard_keeps_panels_with_data_in_order_and_skips_the_rest():
    rows = [{"step": s, "loss": 1.0 / s, "accuracy": 0.5 + 0.01 * s, "lr": 1e-3} for s in (1, 2)]
    fig = draw_dashboard(rows, TRAINING_PANELS)
    assert [a.get_title() for a in fig.axes] == [
        "loss",
        "preference accuracy",
        "learning rate",
    ]
    plt.close(fig)
    assert draw_dashboard([], TRAINING_PANELS) is None
    assert draw_dashboard(rows, (Panel("nothing", ("missing",)),)) is None


def _sft_cfg(arts: Path, run_dir: Path, plots: bool):
    return to_object(
        load_config(
            "sft",
            [
                "+experiment=demo",
                f"artifacts_dir={arts}",
                f"run_dir={run_dir}",
                "logging.tensorboard=false",
                f"logging.plots={str(plots).lower()}",
                "cluster.num_threads=1",
                "trainer.max_steps=6",
                "trainer.eval_every=2",
                "trainer.log_every=1",
            ],
        )
    )


def test_a_stage_redraws_its_one_dashboard_at_every_evaluation(arts, tmp_path, monkeypatch):
    """A tiny SFT run (6 steps, evaluations at 2 and 4): the dashboard exists after the first
    evaluation, long before the stage ends; at the end it is the run's only image."""
    from rlhfstack import training
    from rlhfstack.stages import sft

    run_dir = tmp_path / "sft"
    draws: list[tuple[int, bool, bool]] = []  # (last logged step, image there, stage done)
    real = training.write_dashboard

    def spy(rd, panels, title=""):
        path = real(rd, panels, title)
        steps = [r["step"] for r in read_jsonl(Path(rd) / "metrics.jsonl")]
        draws.append((max(steps), path is not None and path.exists(), (rd / "done.json").exists()))
        return path

    monkeypatch.setattr(training, "write_dashboard", spy)
    sft.train(_sft_cfg(arts, run_dir, plots=True))
    assert draws == [(2, True, False), (4, True, False), (6, True, False)]
    assert sorted(p.name for p in run_dir.rglob("*.png")) == ["dashboard.png"]
    assert (run_dir / "done.json").exists()


def test_no_dashboard_without_logging_plots(arts, tmp_path):
    from rlhfstack.stages import sft

    run_dir = tmp_path / "sft"
    sft.train(_sft_cfg(arts, run_dir, plots=False))
    assert not list(run_dir.rglob("*.png"))


def test_a_drawing_failure_is_logged_not_raised(tmp_path, monkeypatch, caplog):
    """The picture must not cost the run: refresh_dashboard logs the error and goes on."""
    from types import SimpleNamespace

    from rlhfstack import training

    def broken(*args, **kwargs):
        raise RuntimeError("no fonts")

    monkeypatch.setattr(training, "write_dashboard", broken)
    run = SimpleNamespace(
        is_main=True, cfg=SimpleNamespace(logging=SimpleNamespace(plots=True)), run_dir=tmp_path
    )
    with caplog.at_level("WARNING", logger="rlhfstack"):
        assert training.refresh_dashboard(run) is None
    assert "dashboard not drawn: RuntimeError: no fonts" in caplog.text
