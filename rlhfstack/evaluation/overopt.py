"""Reward-model over-optimization curves (Gao, Schulman & Hilton 2022).

Gao et al. measure the policy's distance from its initialisation by ``d = sqrt(KL(pi || pi_0))``
and find that, for RL, the *gold* reward gain follows

    R(d) = d (alpha - beta log d)

while the proxy (the reward model being optimised) keeps rising. For ``beta > 0`` the curve
peaks where ``dR/dd = alpha - beta (log d + 1) = 0``:

    d* = exp(alpha / beta - 1),   KL* = d*^2,   R(d*) = beta d*.

The gains are measured from the initial policy. A PPO run's first evaluation comes after one
update, so the fit includes a free offset ``R0`` (``R(d) = R0 + d (alpha - beta log d)``);
``offset=False`` fixes ``R0`` to the reward at the smallest KL instead. The model is linear in
its parameters and is fitted by least squares (``scipy.linalg.lstsq``).

Input: a run directory whose ``metrics.jsonl`` has rows with ``kl/seq_k1`` (the per-sequence
KL, k1 estimator, nats) and ``eval/gold_reward`` / ``eval/proxy_reward``. The job that fits both
curves of a run and writes ``overoptimization.json`` and the plot is
:mod:`rlhfstack.evaluation.jobs.overopt`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from scipy.linalg import lstsq

from rlhfstack.data import map_records, require_field

__all__ = [
    "fit_gao",
    "gao_curve",
    "numeric_fields",
    "read_kl_rewards",
]

KL_KEY = "kl/seq_k1"
GOLD_KEY = "eval/gold_reward"
PROXY_KEY = "eval/proxy_reward"


def numeric_fields(*keys: str) -> Callable[[Any], dict[str, Any]]:
    """A record check for :func:`rlhfstack.data.map_records`: a JSON object whose ``keys`` are
    numbers or null/absent, else a :class:`rlhfstack.data.DataError` naming the field."""

    def check(row: Any) -> dict[str, Any]:
        for key in keys:
            require_field(row, key, (int, float), optional=True)
        return row

    return check


def read_kl_rewards(
    run_dir: str | Path,
    kl_key: str = KL_KEY,
    gold_key: str = GOLD_KEY,
    proxy_key: str = PROXY_KEY,
) -> dict[str, np.ndarray]:
    """Checkpoints of ``run_dir/metrics.jsonl`` holding ``kl_key`` and at least one reward key.

    Rows with the same ``step`` are merged first (a logger may write the training metrics and
    the evaluation metrics of one step on separate lines).

    Returns ``{"step", "kl", "gold", "proxy"}``, each shape (C,) sorted by step (NaN where a
    checkpoint lacks that reward).
    """
    path = Path(run_dir) / "metrics.jsonl"
    if not path.exists():
        raise FileNotFoundError(f"{path} not found")
    rows_read = map_records(
        path, numeric_fields("step", kl_key, gold_key, proxy_key), fmt="jsonl", data_root="."
    )
    merged: dict[float, dict[str, Any]] = {}
    for i, row in enumerate(rows_read):
        merged.setdefault(float(row.get("step", i)), {}).update(row)
    rows = []
    for step, row in merged.items():
        g, p = row.get(gold_key), row.get(proxy_key)
        if row.get(kl_key) is None or (g is None and p is None):
            continue
        rows.append(
            (
                step,
                float(row[kl_key]),
                math.nan if g is None else float(g),
                math.nan if p is None else float(p),
            )
        )
    rows.sort(key=lambda r: r[0])
    arr = np.array(rows, dtype=np.float64).reshape(-1, 4)
    return {"step": arr[:, 0], "kl": arr[:, 1], "gold": arr[:, 2], "proxy": arr[:, 3]}


def gao_curve(d: np.ndarray | float, alpha: float, beta: float, offset: float = 0.0) -> np.ndarray:
    """``offset + d (alpha - beta log d)`` with the ``d -> 0`` limit (0) handled; same shape as d."""
    d_arr = np.asarray(d, dtype=np.float64)
    safe = np.where(d_arr > 0, d_arr, 1.0)
    dlogd = np.where(d_arr > 0, d_arr * np.log(safe), 0.0)
    return offset + alpha * d_arr - beta * dlogd


def fit_gao(
    d: Sequence[float] | np.ndarray,
    reward: Sequence[float] | np.ndarray,
    offset: bool = True,
) -> dict[str, Any]:
    """Least-squares fit of ``R(d) = R0 + d (alpha - beta log d)``.

    Args:
        d: shape (C,) sqrt-KL per checkpoint (negative KL estimates should be clipped first).
        reward: shape (C,) reward per checkpoint (NaNs are dropped).
        offset: fit ``R0``; otherwise ``R0`` = the reward at the smallest ``d``.

    Returns:
        ``{"alpha", "beta", "offset", "r2", "rmse", "n", "peaked", "d_star", "kl_star",
        "reward_at_peak"}``. ``peaked`` is ``beta > 0``; ``d_star``/``kl_star`` are None otherwise.
        ``peak_in_range`` says whether ``d*`` lies within the observed ``d`` range.
    """
    d_C = np.asarray(d, dtype=np.float64).reshape(-1)
    r_C = np.asarray(reward, dtype=np.float64).reshape(-1)
    keep = np.isfinite(d_C) & np.isfinite(r_C)
    d_C, r_C = np.clip(d_C[keep], 0.0, None), r_C[keep]
    n_params = 3 if offset else 2
    if d_C.size < n_params:
        raise ValueError(f"fit_gao: need >= {n_params} points, got {d_C.size}")
    dlogd_C = np.where(d_C > 0, d_C * np.log(np.where(d_C > 0, d_C, 1.0)), 0.0)
    if offset:
        X = np.stack([np.ones_like(d_C), d_C, -dlogd_C], axis=1)
        y = r_C
    else:
        r0 = float(r_C[np.argmin(d_C)])
        X = np.stack([d_C, -dlogd_C], axis=1)
        y = r_C - r0
    coef, _, rank, _ = lstsq(X, y)
    if offset:
        r0, alpha, beta = (float(c) for c in coef)
    else:
        alpha, beta = (float(c) for c in coef)
    pred = gao_curve(d_C, alpha, beta, r0)
    ss_res = float(np.sum((r_C - pred) ** 2))
    ss_tot = float(np.sum((r_C - r_C.mean()) ** 2))
    out: dict[str, Any] = {
        "alpha": alpha,
        "beta": beta,
        "offset": r0,
        "r2": 1.0 - ss_res / ss_tot if ss_tot > 0 else float("nan"),
        "rmse": math.sqrt(ss_res / d_C.size),
        "n": int(d_C.size),
        "rank_deficient": bool(rank < X.shape[1]),
        "peaked": bool(beta > 0),
        "d_star": None,
        "kl_star": None,
        "reward_at_peak": None,
        "peak_in_range": None,
    }
    if beta > 0:
        log_d_star = alpha / beta - 1.0
        if log_d_star < 700:  # exp overflow guard
            d_star = math.exp(log_d_star)
            out.update(
                d_star=d_star,
                kl_star=d_star**2,
                reward_at_peak=r0 + beta * d_star,
                peak_in_range=bool(d_C.min() <= d_star <= d_C.max()),
            )
    return out
