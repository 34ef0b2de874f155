"""Calibration of pairwise preference probabilities: expected calibration error and reliability bins
(the diagram is drawn by :func:`rlhfstack.evaluation.jobs.plots.plot_reliability`)."""

from __future__ import annotations

import numpy as np


def reliability_bins(probs: np.ndarray, outcomes: np.ndarray, n_bins: int = 10) -> dict:
    """Bin predicted P(first wins) and compare with the empirical frequency.

    probs: ``[N]`` predicted probabilities; outcomes: ``[N]`` 1 if the first item was preferred.
    Returns ``{"ece", "bins": [{"lo", "hi", "n", "mean_prob", "accuracy"}]}``; ECE = sum_b n_b/N |acc_b - conf_b|
    (Guo et al. 2017, eq. 3).
    """
    probs = np.asarray(probs, dtype=float)
    outcomes = np.asarray(outcomes, dtype=float)
    # Not sklearn.calibration.calibration_curve: its bins are (lo, hi] (np.searchsorted, left)
    # where these are [lo, hi), so a probability on an inner edge -- 0.5 = sigmoid(0) for a tied
    # pair is common -- lands in another bin; and it drops empty bins and returns no counts,
    # which the ECE weights and the reliability diagram need.
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
