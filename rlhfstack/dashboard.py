"""One image per stage: ``run_dir/dashboard.png``, a grid of the stage's diagnostics read from its
``metrics.jsonl``, redrawn at every evaluation and when the stage ends (``logging.plots``), so a
user watching a run opens one file and sees it move.

A :class:`Panel` names the metrics it draws against ``step`` (one line each), an optional
horizontal reference line (PPO's KL target) or its own drawing function (PPO's gold and proxy
reward against sqrt(KL), which needs the evaluation code and is supplied by the stage). Panels
whose metrics the run does not log are left out, so one list (:data:`TRAINING_PANELS`) serves
SFT, RM, DPO and KTO. matplotlib is imported where the image is drawn, after the file-only
``Agg`` backend is chosen.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rlhfstack.runtime import read_jsonl, require

__all__ = ["DASHBOARD_FILE", "TRAINING_PANELS", "Panel", "draw_dashboard", "write_dashboard"]

DASHBOARD_FILE = "dashboard.png"


@dataclass(frozen=True)
class Panel:
    """One plot of the dashboard.

    Attributes:
        title: the panel's title.
        keys: metrics drawn against ``step``, one line each (those never logged are skipped).
        hline: y of a horizontal reference line (e.g. the adaptive KL controller's target).
        hline_label: the reference line's legend entry.
        draw: a drawing of its own instead of ``keys``: ``draw(ax, rows)`` with the rows of
            ``metrics.jsonl`` merged by step, returns False when there is nothing to draw yet.
    """

    title: str
    keys: tuple[str, ...] = ()
    hline: float | None = None
    hline_label: str = "target"
    draw: Callable[[Any, list[dict[str, Any]]], bool] | None = None


TRAINING_PANELS: tuple[Panel, ...] = (
    Panel("loss", ("loss",)),
    Panel("training NLL per token", ("nll_per_token",)),
    Panel("validation NLL per token", ("val/nll_per_token",)),
    Panel("validation perplexity", ("val/ppl",)),
    Panel("preference accuracy", ("accuracy", "reward_accuracy", "val/accuracy")),
    Panel("reward margin (chosen - rejected)", ("margin_mean", "reward_margin")),
    Panel(
        "chosen / rejected reward",
        ("chosen_mean", "rejected_mean", "chosen_reward", "rejected_reward"),
    ),
    Panel("KTO reference KL z0", ("kto_kl_ref",)),
    Panel("gradient norm (before clipping)", ("grad_norm",)),
    Panel("learning rate", ("lr",)),
)
"""The panels of the supervised stages (SFT, RM, DPO / IPO / KTO), by the names they log."""


def _merged_rows(metrics_path: str | os.PathLike) -> list[dict[str, Any]]:
    """``metrics.jsonl`` rows merged by step (a step's training and evaluation values may be on
    separate lines), in step order; [] when the file does not exist yet."""
    if not Path(metrics_path).exists():
        return []
    merged: dict[float, dict[str, Any]] = {}
    for row in read_jsonl(metrics_path):
        if isinstance(row.get("step"), (int, float)):
            merged.setdefault(float(row["step"]), {}).update(row)
    return [merged[k] for k in sorted(merged)]


def _series(rows: list[dict[str, Any]], key: str) -> tuple[list[float], list[float]]:
    pts = [
        (float(r["step"]), float(r[key]))
        for r in rows
        if isinstance(r.get(key), (int, float)) and math.isfinite(r[key])
    ]
    return ([p[0] for p in pts], [p[1] for p in pts]) if pts else ([], [])


def _draw_keys(ax: Any, rows: list[dict[str, Any]], panel: Panel) -> bool:
    drew = False
    for key in panel.keys:
        xs, ys = _series(rows, key)
        if not xs:
            continue
        ax.plot(xs, ys, marker="." if len(xs) < 50 else None, lw=1.2, label=key)
        drew = True
    if drew and panel.hline is not None:
        ax.axhline(panel.hline, color="k", ls="--", lw=1, label=panel.hline_label)
    if drew:
        ax.set_xlabel("step")
    return drew


def draw_dashboard(
    rows: list[dict[str, Any]], panels: Sequence[Panel], title: str = "", ncols: int = 3
) -> Any:
    """The dashboard figure of ``rows`` (metrics merged by step): one axes per panel with data,
    in ``panels`` order, on a grid of ``ncols`` columns. Returns the matplotlib figure (None when
    no panel has data); the caller closes it."""
    require("matplotlib", "logging.plots=true").use("Agg")
    import matplotlib.pyplot as plt

    drawn: list[tuple[Panel, Any]] = []
    fig = plt.figure()
    for panel in panels:
        ax = fig.add_subplot(111, label=f"panel {len(drawn)} {panel.title}")
        ok = panel.draw(ax, rows) if panel.draw is not None else _draw_keys(ax, rows, panel)
        if ok:
            drawn.append((panel, ax))
        else:
            fig.delaxes(ax)
    if not drawn:
        plt.close(fig)
        return None
    nrows = math.ceil(len(drawn) / ncols)
    cols = min(ncols, len(drawn))
    width, height = 4.4 * cols, 3.0 * nrows + (0.4 if title else 0.0)
    fig.set_size_inches(width, height)
    # fixed margins in inches (tight_layout would measure every label: half the drawing time)
    grid = fig.add_gridspec(
        nrows,
        cols,
        left=0.6 / width,
        right=1 - 0.15 / width,
        bottom=0.45 / height,
        top=1 - (0.35 + (0.4 if title else 0.0)) / height,
        wspace=0.3,
        hspace=0.5,
    )
    for i, (panel, ax) in enumerate(drawn):
        ax.set_subplotspec(grid[i // cols, i % cols])
        ax.set_title(panel.title, fontsize=10)
        ax.grid(alpha=0.3)
        ax.tick_params(labelsize=8)
        if len(ax.get_legend_handles_labels()[0]) > 1:
            ax.legend(fontsize=7)
    if title:
        fig.suptitle(title, fontsize=11)
    return fig


def write_dashboard(
    run_dir: str | os.PathLike, panels: Sequence[Panel], title: str = ""
) -> Path | None:
    """Draw ``run_dir/metrics.jsonl`` into ``run_dir/dashboard.png`` (a temporary file renamed
    over it, so a viewer never sees half an image). Returns the path, or None when nothing is
    logged yet."""
    run_dir = Path(run_dir)
    fig = draw_dashboard(_merged_rows(run_dir / "metrics.jsonl"), panels, title)
    if fig is None:
        return None
    import matplotlib.pyplot as plt  # after draw_dashboard chose the Agg backend

    path = run_dir / DASHBOARD_FILE
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=80)
    plt.close(fig)
    os.replace(tmp, path)
    return path
