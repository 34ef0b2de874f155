"""PNG plots of evaluation results: the reliability diagram of a reward model, the
over-optimization curves of a PPO run, and the panels of PPO's dashboard
(:func:`ppo_dashboard_panels`, drawn by :mod:`rlhfstack.dashboard`). matplotlib is imported where a plot is drawn, after the
file-only ``Agg`` backend is chosen.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from rlhfstack.dashboard import Panel
from rlhfstack.evaluation.overopt import GOLD_KEY, KL_KEY, PROXY_KEY, plot_gao_fits
from rlhfstack.runtime import require

__all__ = ["gold_proxy_panel", "plot_overoptimization", "plot_reliability", "ppo_dashboard_panels"]


def _draw_gold_proxy(ax: Any, rows: list[dict[str, Any]]) -> bool:
    """PPO's periodic gold and proxy reward against sqrt(KL): points and fitted RL curves."""
    pts = [r for r in rows if r.get(KL_KEY) is not None and r.get(GOLD_KEY) is not None]
    if not pts:
        return False
    kl_C = np.array([r[KL_KEY] for r in pts], dtype=np.float64)
    series = {
        "gold": np.array([r[GOLD_KEY] for r in pts], dtype=np.float64),
        "proxy": np.array([np.nan if r.get(PROXY_KEY) is None else r[PROXY_KEY] for r in pts]),
    }
    plot_gao_fits(ax, kl_C, series, form="rl")
    ax.set_ylabel("mean reward, dev prompts")
    return True


def gold_proxy_panel() -> Panel:
    """The dashboard panel of gold and proxy reward against sqrt(KL) with Gao et al.'s fits."""
    return Panel("gold and proxy reward vs sqrt(KL)", draw=_draw_gold_proxy)


def ppo_dashboard_panels(kl_target: float | None) -> tuple[Panel, ...]:
    """PPO's dashboard: reward, KL (with ``kl_target``, the adaptive controller's target, as a
    dashed line; None draws none), beta, entropy, clip fractions, approximate KL, losses,
    explained variance, response length, and gold / proxy against sqrt(KL) where a gold reward
    is evaluated. Metric names as :meth:`rlhfstack.stages.ppo.PPOTrainer.metrics` logs them."""
    return (
        Panel("reward (proxy RM score)", ("reward/rm_score", "reward/shaped_score")),
        Panel(
            "KL to reference (nats / sequence)",
            (KL_KEY,),
            hline=kl_target,
            hline_label=f"KL target {kl_target:g}" if kl_target is not None else "target",
        ),
        Panel("KL coefficient beta", ("kl/beta",)),
        Panel("entropy (nats / token)", ("entropy",)),
        Panel("clip fraction", ("ppo/clipfrac", "ppo/vf_clipfrac")),
        Panel("approx KL (old -> new policy)", ("ppo/approx_kl",)),
        Panel("policy loss", ("loss/policy",)),
        Panel("value loss", ("loss/value",)),
        Panel("values explained variance", ("values/explained_variance",)),
        Panel("response length (tokens)", ("response/length",)),
        Panel("ended with EOS", ("response/ended_frac",)),
        gold_proxy_panel(),
    )


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

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    grid_end = max(float(np.sqrt(np.clip(data["kl"], 0.0, None)).max()) * 1.15, 1e-3)
    for ax, key, color in ((axes[0], "gold", "tab:orange"), (axes[1], "proxy", "tab:blue")):
        plot_gao_fits(ax, data["kl"], {key: data[key]}, colors=(color,), fits={key: fits.get(key)})
        fit = fits.get(key)
        if fit is not None and fit.get("d_star") is not None and fit["d_star"] <= grid_end:
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
