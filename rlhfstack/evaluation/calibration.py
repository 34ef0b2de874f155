"""Calibration of pairwise preference probabilities: expected calibration error and reliability diagrams."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np


def reliability_bins(probs: np.ndarray, outcomes: np.ndarray, n_bins: int = 10) -> dict:
    """Bin predicted P(first wins) and compare with the empirical frequency.

    probs: ``[N]`` predicted probabilities; outcomes: ``[N]`` 1 if the first item was preferred.
    Returns ``{"ece", "bins": [{"lo", "hi", "n", "mean_prob", "accuracy"}]}``; ECE = sum_b n_b/N |acc_b - conf_b|
    (Guo et al. 2017, eq. 3).
    """
    probs = np.asarray(probs, dtype=float)
    outcomes = np.asarray(outcomes, dtype=float)
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    idx = np.clip(np.digitize(probs, edges[1:-1]), 0, n_bins - 1)
    bins, ece = [], 0.0
    for b in range(n_bins):
        sel = idx == b
        n = int(sel.sum())
        if n == 0:
            bins.append(
                {"lo": edges[b], "hi": edges[b + 1], "n": 0, "mean_prob": None, "accuracy": None}
            )
            continue
        conf, acc = float(probs[sel].mean()), float(outcomes[sel].mean())
        ece += n / len(probs) * abs(acc - conf)
        bins.append(
            {
                "lo": float(edges[b]),
                "hi": float(edges[b + 1]),
                "n": n,
                "mean_prob": conf,
                "accuracy": acc,
            }
        )
    return {"ece": float(ece), "bins": bins}


def plot_reliability(
    rel: dict, path: str | os.PathLike, title: str = "reward model calibration"
) -> Path:
    """Reliability diagram PNG (written to a temporary name, then renamed)."""
    import matplotlib

    matplotlib.use("Agg")
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
