"""Reward-model over-optimization curves (Gao, Schulman & Hilton 2022).

Gao et al. measure the policy's distance from its initialisation by ``d = sqrt(KL(pi || pi_0))``
and find that, for RL, the *gold* reward gain follows

    R(d) = d (alpha - beta log d)

while the proxy (the reward model being optimised) keeps rising. For ``beta > 0`` the curve
peaks where ``dR/dd = alpha - beta (log d + 1) = 0``:

    d* = exp(alpha / beta - 1),   KL* = d*^2,   R(d*) = beta d*.

For best-of-n sampling the same paper finds ``R(d) = d (alpha - beta d)`` (``form="bon"``),
peaking at ``d* = alpha / (2 beta)`` with ``R(d*) = beta d*^2``.

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
    "GAO_FORMS",
    "fit_gao",
    "gao_curve",
    "plot_gao_fits",
    "numeric_fields",
    "read_kl_rewards",
]

KL_KEY = "kl/seq_k1"
GOLD_KEY = "eval/gold_reward"
PROXY_KEY = "eval/proxy_reward"
GAO_FORMS = ("rl", "bon")
"""``rl``: ``d (alpha - beta log d)`` (RL, e.g. PPO); ``bon``: ``d (alpha - beta d)`` (best-of-n)."""


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


def _curvature_term(d_C: np.ndarray, form: str) -> np.ndarray:
    """The term ``beta`` multiplies (with a minus sign): ``d log d`` (0 at d = 0) or ``d^2``."""
    if form == "rl":
        return np.where(d_C > 0, d_C * np.log(np.where(d_C > 0, d_C, 1.0)), 0.0)
    if form == "bon":
        return d_C**2
    raise ValueError(f"form must be one of {GAO_FORMS}, got {form!r}")


def gao_curve(
    d: np.ndarray | float, alpha: float, beta: float, offset: float = 0.0, form: str = "rl"
) -> np.ndarray:
    """``offset + d (alpha - beta log d)`` (``form="rl"``, with the ``d -> 0`` limit handled) or
    ``offset + d (alpha - beta d)`` (``form="bon"``); same shape as d."""
    d_arr = np.asarray(d, dtype=np.float64)
    return offset + alpha * d_arr - beta * _curvature_term(d_arr, form)


def fit_gao(
    d: Sequence[float] | np.ndarray,
    reward: Sequence[float] | np.ndarray,
    offset: bool = True,
    form: str = "rl",
) -> dict[str, Any]:
    """Least-squares fit of ``R(d) = R0 + d (alpha - beta log d)`` (``form="rl"``) or
    ``R(d) = R0 + d (alpha - beta d)`` (``form="bon"``).

    Args:
        d: shape (C,) sqrt-KL per checkpoint (negative KL estimates should be clipped first).
        reward: shape (C,) reward per checkpoint (NaNs are dropped).
        offset: fit ``R0``; otherwise ``R0`` = the reward at the smallest ``d``.
        form: one of :data:`GAO_FORMS`.

    Returns:
        ``{"form", "alpha", "beta", "offset", "r2", "rmse", "n", "peaked", "d_star", "kl_star",
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
    curv_C = _curvature_term(d_C, form)
    if offset:
        X = np.stack([np.ones_like(d_C), d_C, -curv_C], axis=1)
        y = r_C
    else:
        r0 = float(r_C[np.argmin(d_C)])
        X = np.stack([d_C, -curv_C], axis=1)
        y = r_C - r0
    coef, _, rank, _ = lstsq(X, y)
    if offset:
        r0, alpha, beta = (float(c) for c in coef)
    else:
        alpha, beta = (float(c) for c in coef)
    pred = gao_curve(d_C, alpha, beta, r0, form)
    ss_res = float(np.sum((r_C - pred) ** 2))
    ss_tot = float(np.sum((r_C - r_C.mean()) ** 2))
    out: dict[str, Any] = {
        "form": form,
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
        if form == "bon":  # dR/dd = alpha - 2 beta d = 0
            d_star: float | None = alpha / (2.0 * beta) if alpha > 0 else None
            peak = None if d_star is None else r0 + beta * d_star**2
        else:  # dR/dd = alpha - beta (log d + 1) = 0
            log_d_star = alpha / beta - 1.0
            d_star = math.exp(log_d_star) if log_d_star < 700 else None  # exp overflow guard
            peak = None if d_star is None else r0 + beta * d_star
        if d_star is not None:
            out.update(
                d_star=d_star,
                kl_star=d_star**2,
                reward_at_peak=peak,
                peak_in_range=bool(d_C.min() <= d_star <= d_C.max()),
            )
    return out


def plot_gao_fits(
    ax: Any,
    kl_C: np.ndarray,
    rewards: dict[str, np.ndarray],
    form: str = "rl",
    colors: Sequence[str] = ("tab:orange", "tab:blue", "tab:green"),
    fits: dict[str, dict[str, Any] | None] | None = None,
) -> dict[str, dict[str, Any] | None]:
    """Draw each reward of ``rewards`` (name -> shape (C,)) against ``d = sqrt(KL)`` on the
    matplotlib axes ``ax``: the checkpoints as unjoined markers (checkpoints are not ordered in
    ``d``: a policy's KL goes down as well as up), and, where there are enough points
    (:func:`fit_gao` with an offset: 3), the fitted Gao curve of ``form`` over a grid; ``fits``
    (name -> a :func:`fit_gao` result or None) draws given fits instead. Returns the fits (None
    where there were too few points). Takes the axes, so it needs no matplotlib import."""
    d_C = np.sqrt(np.clip(np.asarray(kl_C, dtype=np.float64), 0.0, None))
    finite = d_C[np.isfinite(d_C)]
    grid = np.linspace(0.0, max(float(finite.max()) * 1.15 if finite.size else 0.0, 1e-3), 200)
    drawn: dict[str, dict[str, Any] | None] = {}
    for (name, y_C), color in zip(rewards.items(), colors):
        ok = np.isfinite(d_C) & np.isfinite(y_C)
        ax.scatter(d_C[ok], y_C[ok], s=18, color=color, label=name, zorder=3)
        if fits is not None:
            fit = fits.get(name)
        else:
            try:
                fit = fit_gao(d_C, y_C, offset=True, form=form)
            except ValueError:  # too few points yet
                fit = None
        drawn[name] = fit
        if fit is None:
            continue
        ax.plot(
            grid,
            gao_curve(grid, fit["alpha"], fit["beta"], fit["offset"], fit.get("form", form)),
            color=color,
            lw=1.3,
            alpha=0.8,
            label=f"{name} fit ({fit.get('form', form)}, R2={fit['r2']:.2f})",
        )
    ax.set_xlabel("d = sqrt(KL(pi || pi_0))")
    return drawn
