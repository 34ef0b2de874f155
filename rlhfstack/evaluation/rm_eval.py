"""Held-out evaluation of a trained reward model on any preference file.

``accuracy`` = fraction of pairs where r(chosen) > r(rejected) (ties count 1/2);
``mean_margin`` = mean of r(chosen) - r(rejected) (normalized rewards);
``ece`` = expected calibration error of P(chosen) = sigmoid(r_c - r_r) (Bradley-Terry), measured
with each pair shown in a random order (otherwise every outcome would be 1);
``baselines.length`` = accuracy of "the longer response (in characters) wins";
``baselines.chance`` = 0.5. Malformed rows are skipped and counted (``skipped``).

These are functions of the scores; the job that loads the RM, scores a file and writes
``rm_eval.json`` is :mod:`rlhfstack.evaluation.jobs.rm_eval`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from rlhfstack.evaluation.calibration import reliability_bins


def pair_accuracy(chosen_N: np.ndarray, rejected_N: np.ndarray) -> float:
    """Fraction of pairs with ``chosen > rejected``; ties count one half."""
    c, r = np.asarray(chosen_N, float), np.asarray(rejected_N, float)
    if len(c) == 0:
        return float("nan")
    return float((c > r).mean() + 0.5 * (c == r).mean())


def preference_metrics(chosen_N: np.ndarray, rejected_N: np.ndarray, seed: int = 0) -> dict:
    """Accuracy, mean margin and calibration of P(chosen) = sigmoid(r_c - r_r) for ``[N]`` scores.

    For calibration each pair is shown in a random order (seeded), so outcomes are 0 or 1.
    Returns ``{"accuracy", "n", "mean_margin", "ece", "reliability"}``.
    """
    c, r = np.asarray(chosen_N, float), np.asarray(rejected_N, float)
    diff = c - r
    rng = np.random.default_rng(seed)
    flip = rng.random(len(diff)) < 0.5
    d = np.where(flip, -diff, diff)
    probs = 1.0 / (1.0 + np.exp(-np.clip(d, -50, 50)))
    outcomes = (~flip).astype(float)
    rel = reliability_bins(probs, outcomes)
    return {
        "accuracy": pair_accuracy(c, r),
        "n": int(len(diff)),
        "mean_margin": float(diff.mean()) if len(diff) else float("nan"),
        "ece": rel["ece"],
        "reliability": rel,
    }


def length_baseline(pairs: Sequence[Any]) -> float:
    """Accuracy of "the longer response wins" (characters; ties count one half)."""
    c = np.array([len(p.chosen) for p in pairs], float)
    r = np.array([len(p.rejected) for p in pairs], float)
    return pair_accuracy(c, r)
