"""PNG plots of evaluation results: the reliability diagram of a reward model and the
over-optimization curves of a PPO run. matplotlib is imported where a plot is drawn, after the
file-only ``Agg`` backend is chosen.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from rlhfstack.evaluation.overopt import gao_curve
from rlhfstack.runtime import require

__all__ = ["plot_overoptimization", "plot_reliability"]


def plot_reliability(
    rel: dict, path: str | os.PathLike, title: str = "reward model calibration"
) -> Path:
    """Reliability diagram PNG (written to a temporary name, then renamed)."""
    require("matplotlib", "plots").use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(4.2, 4.2))
    ax.plot([0, 1], [0, 1], "--", color="gray", label="perfect")
    pts = [(b["mean_prob"], b["accuracy"], b["n"]) for b in rel["bins"] if b["n"]]
    if pts:
        x, y, n = zip(*pts)
        ax.plot(x, y, "o-", label="model")
        for xi, yi, ni in pts:
            ax.annotate(str(ni), (xi, yi), fontsize=7, textcoords="offset points", xytext=(3, -9))
    ax.set_xlabel("predicted P(chosen preferred)")
    ax.set_ylabel("observed frequency")
    ax.set_title(f"{title}\nECE = {rel['ece']:.3f}")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.legend(loc="upper left")
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=90)
    plt.close(fig)
    os.replace(tmp, path)
    return path


def plot_overoptimization(
    data: dict[str, np.ndarray],
    fits: dict[str, dict[str, Any] | None],
    out_path: str | Path,
    title: str = "",
) -> Path:
    """Gold and proxy reward against ``d = sqrt(KL)`` with their fitted Gao curves (two panels,
    since the two rewards are on different scales); the gold peak ``d*`` is marked."""
    require("matplotlib", "plots").use("Agg")
    import matplotlib.pyplot as plt

    d_C = np.sqrt(np.clip(data["kl"], 0.0, None))
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    grid = np.linspace(0.0, max(float(d_C.max()) * 1.15, 1e-3), 200)
    for ax, key, color in ((axes[0], "gold", "tab:orange"), (axes[1], "proxy", "tab:blue")):
        y = data[key]
        ok = np.isfinite(y)
        ax.scatter(d_C[ok], y[ok], s=18, color=color, label=f"{key} reward")
        fit = fits.get(key)
        if fit is not None:
            ax.plot(
                grid,
                gao_curve(grid, fit["alpha"], fit["beta"], fit["offset"]),
                color=color,
                lw=1.5,
                alpha=0.8,
                label=f"fit a={fit['alpha']:.3g} b={fit['beta']:.3g} (R2={fit['r2']:.2f})",
            )
            if fit.get("d_star") is not None and fit["d_star"] <= grid[-1]:
                ax.axvline(
                    fit["d_star"],
                    color="k",
                    ls="--",
                    lw=1,
                    label=f"d*={fit['d_star']:.3g} (KL*={fit['kl_star']:.3g})",
                )
        ax.set_xlabel("d = sqrt(KL(pi || pi_0))  [sqrt nats]")
        ax.set_ylabel(f"{key} reward")
        ax.set_title(f"{key} reward vs sqrt(KL)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_path, dpi=120)
    plt.close(fig)
    return out_path
