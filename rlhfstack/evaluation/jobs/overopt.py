"""The over-optimization job: fit Gao et al. (2022)'s curves to a PPO run's gold and proxy
rewards, write ``overoptimization.json`` and ``overoptimization.png``.

The reader and the fit are in :mod:`rlhfstack.evaluation.overopt`; ``eval/overoptimization.py``
calls :func:`run_overoptimization`.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np

from rlhfstack import logs
from rlhfstack.evaluation.jobs.plots import plot_overoptimization
from rlhfstack.evaluation.overopt import GOLD_KEY, KL_KEY, PROXY_KEY, fit_gao, read_kl_rewards
from rlhfstack.runtime import atomic_write_json, save_resolved_config

__all__ = ["overoptimization_report", "run_overoptimization"]


def overoptimization_report(
    run_dir: str | Path,
    output_dir: str | Path,
    offset: bool = True,
    kl_key: str = KL_KEY,
    gold_key: str = GOLD_KEY,
    proxy_key: str = PROXY_KEY,
) -> dict[str, Any]:
    """Fit gold and proxy curves of a PPO run; write ``overoptimization.json`` and
    ``overoptimization.png`` into ``output_dir``. Returns the JSON written.

    The headline numbers are ``gold_fit.kl_star`` (the KL at the fitted gold peak) and the
    observed gold peak (``observed_gold_peak``).
    """
    data = read_kl_rewards(run_dir, kl_key, gold_key, proxy_key)
    if data["kl"].size == 0:
        raise ValueError(f"{run_dir}/metrics.jsonl has no rows with {kl_key} and a reward column")
    n_neg = int((data["kl"] < 0).sum())
    d_C = np.sqrt(np.clip(data["kl"], 0.0, None))
    fits: dict[str, dict[str, Any] | None] = {}
    errors: dict[str, str] = {}
    for key in ("gold", "proxy"):
        try:
            fits[key] = fit_gao(d_C, data[key], offset=offset)
        except ValueError as err:
            fits[key] = None
            errors[key] = str(err)
    gold_ok = np.isfinite(data["gold"])
    observed = None
    if gold_ok.any():
        i = int(np.nanargmax(np.where(gold_ok, data["gold"], -np.inf)))
        observed = {
            "step": float(data["step"][i]),
            "kl": float(data["kl"][i]),
            "d": float(d_C[i]),
            "gold_reward": float(data["gold"][i]),
        }
    out_dir = Path(output_dir)
    png = plot_overoptimization(data, fits, out_dir / "overoptimization.png", title=str(run_dir))
    result = {
        "run_dir": str(run_dir),
        "model": "R(d) = offset + d * (alpha - beta * log d), d = sqrt(KL)  (Gao et al. 2022)",
        "n_points": int(data["kl"].size),
        "n_negative_kl_clipped": n_neg,
        "gold_fit": fits["gold"],
        "proxy_fit": fits["proxy"],
        "kl_star": fits["gold"]["kl_star"] if fits["gold"] else None,
        "d_star": fits["gold"]["d_star"] if fits["gold"] else None,
        "observed_gold_peak": observed,
        "fit_errors": errors,
        "points": {
            "step": data["step"].tolist(),
            "kl": data["kl"].tolist(),
            "gold": [None if math.isnan(v) else v for v in data["gold"].tolist()],
            "proxy": [None if math.isnan(v) else v for v in data["proxy"].tolist()],
        },
        "plot": str(png),
    }
    atomic_write_json(out_dir / "overoptimization.json", result)
    return result


def run_overoptimization(cfg: Any) -> dict[str, Any]:
    """``eval/overoptimization.py``: :func:`overoptimization_report` as configured by an
    :class:`rlhfstack.configs.OveroptimizationConfig`, then ``config.yaml`` beside it. Returns the
    JSON written."""
    logs.tag_job("overoptimization")
    result = overoptimization_report(
        cfg.run_dir,
        cfg.output_dir,
        offset=cfg.offset,
        kl_key=cfg.kl_key,
        gold_key=cfg.gold_key,
        proxy_key=cfg.proxy_key,
    )
    save_resolved_config(cfg, cfg.output_dir)
    return result
