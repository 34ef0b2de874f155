"""Evaluation metrics: win-rates with bootstrap CIs, diversity and length statistics.

Pure numpy / scipy + stdlib so it can run anywhere (no torch import).

Conventions:
    * A "win" of system A over system B on one prompt is 1.0 if A's score is higher, 0.5 on a
      tie and 0.0 otherwise. Win-rates are means of these per-prompt outcomes.
    * Confidence intervals are 95% percentile bootstrap intervals over prompts (paired: the same
      resampled prompt indices are used for A and B).
    * "Words" are whitespace-separated tokens (``str.split()``), with no lower-casing.
"""

from __future__ import annotations

import warnings
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import numpy as np
import scipy.stats

from rlhfstack.data.text_stats import ngrams

__all__ = [
    "bootstrap_ci",
    "bootstrap_mean_ci",
    "distinct_n",
    "mean_length_tokens",
    "mean_length_words",
    "win_outcomes",
    "winrate_from_outcomes",
    "winrate_with_ci",
]


def bootstrap_ci(
    data: Sequence[np.ndarray],
    statistic: Callable[..., Any],
    *,
    n_boot: int = 2000,
    seed: int = 0,
    alpha: float = 0.05,
    vectorized: bool = True,
) -> list[float]:
    """(1 - alpha) percentile bootstrap interval of ``statistic(*data)`` over items.

    ``scipy.stats.bootstrap`` with ``paired=True``: one resample draws item indices once and
    takes them from every array of ``data``, so a statistic of paired columns (policy and
    baseline on the same prompt) keeps its pairs. ``method="percentile"`` rather than BCa: it is
    the interval the reports state (EVAL_REPORT.md); it stays defined on degenerate samples (a
    policy winning every prompt gives [1, 1], where BCa's acceleration is 0/0 and gives NaN);
    and BCa's jackknife would refit a non-vectorized statistic (the length-controlled model)
    once per item. ``statistic`` takes the arrays and ``axis`` when ``vectorized``; a NaN from a
    resample where it is undefined (e.g. a refit that cannot be done) is left out of the
    percentiles. ``n_boot == 0`` gives ``[nan, nan]``; one item gives its own statistic twice.
    """
    if n_boot == 0:
        return [float("nan"), float("nan")]
    arrays = tuple(np.asarray(d, dtype=np.float64).reshape(-1) for d in data)
    n = arrays[0].shape[0]
    if n == 1:  # every resample is the one item (scipy wants two or more)
        v = float(statistic(*arrays, axis=-1) if vectorized else statistic(*arrays))
        return [v, v]
    with warnings.catch_warnings():  # a NaN end is handled below
        warnings.simplefilter("ignore", scipy.stats.DegenerateDataWarning)
        res = scipy.stats.bootstrap(
            arrays,
            statistic,
            n_resamples=n_boot,
            # bounds memory at ~2M resampled values per batch for large n * n_boot
            batch=max(1, 2_000_000 // max(n, 1)),
            vectorized=vectorized,
            paired=True,
            confidence_level=1.0 - alpha,
            method="percentile",
            rng=np.random.default_rng(seed),
        )
    lo, hi = float(res.confidence_interval.low), float(res.confidence_interval.high)
    if np.isnan(lo) or np.isnan(hi):
        dist_R = res.bootstrap_distribution
        if np.isnan(dist_R).all():
            return [float("nan"), float("nan")]
        lo, hi = np.nanpercentile(dist_R, [100 * alpha / 2, 100 * (1 - alpha / 2)])
    return [float(lo), float(hi)]


def bootstrap_mean_ci(
    values: Sequence[float] | np.ndarray,
    n_boot: int = 2000,
    seed: int = 0,
    alpha: float = 0.05,
) -> dict[str, Any]:
    """Mean of ``values`` with a percentile bootstrap CI (:func:`bootstrap_ci`).

    Args:
        values: shape (N,) per-item values (NaNs are not allowed).
        n_boot: number of bootstrap resamples.
        seed: RNG seed (result is deterministic given the seed).
        alpha: 1 - confidence level (0.05 -> 95% CI).

    Returns:
        ``{"mean": float, "ci95": [lo, hi], "n": int}``. For N == 0 the mean and bounds are NaN.
        (The key is always ``ci95``; it holds the (1 - alpha) interval.)
    """
    values_N = np.asarray(values, dtype=np.float64).reshape(-1)
    n = int(values_N.shape[0])
    if n == 0:
        return {"mean": float("nan"), "ci95": [float("nan"), float("nan")], "n": 0}
    if np.isnan(values_N).any():
        raise ValueError("bootstrap_mean_ci: values contain NaN")
    ci = bootstrap_ci((values_N,), np.mean, n_boot=n_boot, seed=seed, alpha=alpha)
    return {"mean": float(values_N.mean()), "ci95": ci, "n": n}


def win_outcomes(
    scores_a: Sequence[float] | np.ndarray, scores_b: Sequence[float] | np.ndarray
) -> np.ndarray:
    """Per-prompt outcome of A vs B: 1.0 (A higher), 0.5 (tie), 0.0 (B higher); shape (N,)."""
    a_N = np.asarray(scores_a, dtype=np.float64).reshape(-1)
    b_N = np.asarray(scores_b, dtype=np.float64).reshape(-1)
    if a_N.shape != b_N.shape:
        raise ValueError(f"scores_a and scores_b differ in length: {a_N.shape} vs {b_N.shape}")
    return (a_N > b_N).astype(np.float64) + 0.5 * (a_N == b_N)


def winrate_from_outcomes(
    outcomes: Sequence[float] | np.ndarray, n_boot: int = 2000, seed: int = 0
) -> dict[str, Any]:
    """Win-rate from per-prompt outcomes in [0, 1] (e.g. a judge's 1 / 0.5 / 0 verdicts).

    Returns ``{"rate": float, "ci95": [lo, hi], "n": int}`` (percentile bootstrap over prompts).
    """
    res = bootstrap_mean_ci(outcomes, n_boot=n_boot, seed=seed)
    return {"rate": res["mean"], "ci95": res["ci95"], "n": res["n"]}


def winrate_with_ci(
    scores_a: Sequence[float] | np.ndarray,
    scores_b: Sequence[float] | np.ndarray,
    n_boot: int = 2000,
    seed: int = 0,
) -> dict[str, Any]:
    """Rate at which A beats B on paired per-prompt scores (ties count half).

    Args:
        scores_a: shape (N,) score of system A's output on prompt i (higher is better).
        scores_b: shape (N,) score of system B's output on the same prompt i.
        n_boot: bootstrap resamples over prompts (paired).
        seed: RNG seed.

    Returns:
        ``{"rate": float, "ci95": [lo, hi], "n": int}``.
    """
    return winrate_from_outcomes(win_outcomes(scores_a, scores_b), n_boot=n_boot, seed=seed)


def distinct_n(texts: Iterable[str], n: int) -> float:
    """Corpus-level distinct-n: #unique n-grams / #n-grams over all texts (whitespace words).

    N-grams do not cross text boundaries. Returns 0.0 when the corpus has no n-grams.
    """
    counts: Counter[tuple[str, ...]] = Counter()
    for text in texts:
        counts.update(ngrams(text.split(), n))
    total = sum(counts.values())
    return float(len(counts) / total) if total else 0.0


def mean_length_words(texts: Sequence[str]) -> float:
    """Mean number of whitespace words per text (NaN for an empty list)."""
    if len(texts) == 0:
        return float("nan")
    return float(np.mean([len(t.split()) for t in texts]))


def mean_length_tokens(
    texts: Sequence[str], tokenizer: Any | Callable[[str], Sequence[int]]
) -> float:
    """Mean number of tokens per text (NaN for an empty list).

    Args:
        texts: the texts (completions only, typically).
        tokenizer: a Hugging Face tokenizer (``encode(text, add_special_tokens=False)`` is used)
            or any callable ``text -> list[int]``.
    """
    if len(texts) == 0:
        return float("nan")
    if hasattr(tokenizer, "encode"):
        lengths = [len(tokenizer.encode(t, add_special_tokens=False)) for t in texts]
    else:
        lengths = [len(tokenizer(t)) for t in texts]
    return float(np.mean(lengths))
