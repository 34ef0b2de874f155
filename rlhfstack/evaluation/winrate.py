"""Win-rates of one set of samples over another, judged by one or several judges.

Pieces:
    * :func:`load_samples` / :func:`pair_samples` -- jsonl files of ``{prompt, completion}``,
      matched by prompt (the k-th occurrence of a prompt in A with its k-th occurrence in B).
    * :func:`summarize_outcomes` -- rate (ties count half) with a paired bootstrap CI
      (``rlhfstack.evaluation.metrics``) and the length-controlled rate.
    * :func:`fit_length_controlled` -- the length-controlled GLM of AlpacaEval 2.0 (Dubois et al.
      2024, "Length-Controlled AlpacaEval"): a logistic regression of the per-pair preference on

          logit P(A beats B) = theta + phi * tanh(dlen / sd(dlen)) + psi * difficulty

      where ``dlen = len(A) - len(B)`` (characters by default, as AlpacaEval) and ``difficulty``
      is an optional per-prompt covariate (AlpacaEval's instruction difficulty, which it fits
      across many models; give it as ``instruction_difficulty`` in the sample rows -- without it
      the instruction term is dropped). The length-controlled rate is the model's prediction
      with the length term set to 0, averaged over prompts: ``mean_x sigmoid(theta + psi*d_x)``.
      Ties enter as soft labels (0.5); a small L2 penalty keeps the fit finite when one side
      always wins.
    * :func:`cohen_kappa` / :func:`fleiss_kappa` -- agreement of several judges on the
      categorical verdict (A / tie / B).
    * :func:`compare` -- run judges on paired samples: per-judge and combined rates, agreement,
      and the per-pair rows.

The jobs that build judges from a config, generate samples and write ``winrate.json`` /
``judgments.jsonl`` (what the ``eval/`` entry points call) are in
:mod:`rlhfstack.evaluation.jobs.winrate`.
"""

from __future__ import annotations

import logging
import math
import os
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from sklearn.metrics import cohen_kappa_score

from rlhfstack.data import DataError, map_records, require_field
from rlhfstack.evaluation.judges import (
    Judge,
    JudgeResult,
)
from rlhfstack.evaluation.metrics import bootstrap_ci, winrate_from_outcomes

log = logging.getLogger("rlhfstack.winrate")

__all__ = [
    "PairedSamples",
    "answer_lengths",
    "cohen_kappa",
    "cut_at_stop",
    "fit_length_controlled",
    "fleiss_kappa",
    "judge_agreement",
    "length_controlled_winrate",
    "load_samples",
    "pair_samples",
    "summarize_outcomes",
    "verdict_labels",
]

# --------------------------------------------------------------------------------------------
# Sample files
# --------------------------------------------------------------------------------------------


def _sample_row(row: Any) -> dict[str, Any]:
    require_field(row, "prompt", str)
    require_field(row, "completion", str)
    require_field(row, "instruction_difficulty", (int, float), optional=True)
    return row


def load_samples(path: str | os.PathLike) -> list[dict[str, Any]]:
    """Rows of a samples file: jsonl with string fields ``prompt`` and ``completion`` (other
    fields are kept; an optional numeric ``instruction_difficulty`` feeds the LC GLM). Problems
    raise :class:`rlhfstack.data.DataError` with file, line and field."""
    rows = map_records(path, _sample_row, fmt="jsonl", data_root=".")
    if not rows:
        raise DataError("no samples", path=str(path), reason="no_examples")
    return rows


@dataclass
class PairedSamples:
    """Answers of A and B to the same N prompts (in A's order)."""

    prompts: list[str]
    answers_a: list[str]
    answers_b: list[str]
    difficulty_N: np.ndarray | None = None
    """Per-prompt ``instruction_difficulty`` when every pair carries one (from A, else B)."""
    n_unmatched_a: int = 0
    n_unmatched_b: int = 0

    def __len__(self) -> int:
        return len(self.prompts)


def pair_samples(
    rows_a: Sequence[Mapping[str, Any]], rows_b: Sequence[Mapping[str, Any]]
) -> PairedSamples:
    """Match rows by prompt: the k-th row of A with a prompt goes with the k-th row of B with
    the same prompt (so several samples per prompt pair up in order). Unmatched rows are counted
    and dropped."""
    by_prompt_b: dict[str, list[Mapping[str, Any]]] = defaultdict(list)
    for r in rows_b:
        by_prompt_b[r["prompt"]].append(r)
    used: dict[str, int] = defaultdict(int)
    prompts, ans_a, ans_b, diff = [], [], [], []
    n_unmatched_a = 0
    for r in rows_a:
        p = r["prompt"]
        k = used[p]
        if k >= len(by_prompt_b.get(p, ())):
            n_unmatched_a += 1
            continue
        rb = by_prompt_b[p][k]
        used[p] += 1
        prompts.append(p)
        ans_a.append(r["completion"])
        ans_b.append(rb["completion"])
        d = r.get("instruction_difficulty", rb.get("instruction_difficulty"))
        diff.append(float(d) if isinstance(d, (int, float)) and not isinstance(d, bool) else None)
    n_unmatched_b = len(rows_b) - sum(used.values())
    if not prompts:
        raise ValueError("no prompt of A matches a prompt of B")
    if n_unmatched_a or n_unmatched_b:
        log.warning(
            "pairing by prompt: %d rows of A and %d of B have no partner (dropped)",
            n_unmatched_a,
            n_unmatched_b,
        )
    difficulty_N = None if any(d is None for d in diff) else np.asarray(diff, dtype=np.float64)
    return PairedSamples(prompts, ans_a, ans_b, difficulty_N, n_unmatched_a, n_unmatched_b)


def answer_lengths(texts: Sequence[str], unit: str = "chars") -> np.ndarray:
    """Length of each text, shape (N,): characters (AlpacaEval's choice) or whitespace words."""
    if unit == "chars":
        return np.array([len(t) for t in texts], dtype=np.float64)
    if unit == "words":
        return np.array([len(t.split()) for t in texts], dtype=np.float64)
    raise ValueError(f"length_unit: unknown unit {unit!r} (chars | words)")


# --------------------------------------------------------------------------------------------
# Length-controlled win-rate (AlpacaEval 2.0 GLM)
# --------------------------------------------------------------------------------------------


def _sigmoid(z: np.ndarray) -> np.ndarray:
    return np.exp(-np.logaddexp(0.0, -z))


def _fit_logistic(
    X_NK: np.ndarray, y_N: np.ndarray, l2: float, max_iter: int = 100, tol: float = 1e-10
) -> tuple[np.ndarray, bool]:
    """Minimize sum_i [log(1 + e^z_i) - y_i z_i] + l2 * |beta|^2 with z = X beta (soft labels
    y in [0, 1]) by damped Newton steps; the problem is strictly convex for l2 > 0."""

    def loss(beta_K: np.ndarray) -> float:
        z_N = X_NK @ beta_K
        return float(np.sum(np.logaddexp(0.0, z_N) - y_N * z_N) + l2 * beta_K @ beta_K)

    K = X_NK.shape[1]
    beta_K = np.zeros(K)
    f = loss(beta_K)
    for _ in range(max_iter):
        p_N = _sigmoid(X_NK @ beta_K)
        grad_K = X_NK.T @ (p_N - y_N) + 2.0 * l2 * beta_K
        H_KK = (X_NK * (p_N * (1.0 - p_N))[:, None]).T @ X_NK + 2.0 * l2 * np.eye(K)
        step_K = np.linalg.solve(H_KK, grad_K)
        t = 1.0
        while t > 1e-8:
            f_new = loss(beta_K - t * step_K)
            if f_new <= f:
                break
            t *= 0.5
        beta_K = beta_K - t * step_K
        decrease, f = f - f_new, f_new
        if decrease < tol * max(1.0, abs(f)) and float(np.abs(grad_K).max()) < 1e-6 * len(y_N):
            return beta_K, True
    return beta_K, False


def fit_length_controlled(
    outcomes_N: Sequence[float] | np.ndarray,
    len_a_N: Sequence[float] | np.ndarray,
    len_b_N: Sequence[float] | np.ndarray,
    difficulty_N: Sequence[float] | np.ndarray | None = None,
    l2: float = 0.01,
) -> dict[str, Any] | None:
    """Fit the AlpacaEval 2.0 length-controlled GLM and predict with the length term at 0.

    Args:
        outcomes_N: A's per-pair outcome in [0, 1] (soft labels; ties 0.5), shape (N,).
        len_a_N, len_b_N: answer lengths, shape (N,).
        difficulty_N: optional per-prompt instruction difficulty, shape (N,).
        l2: ridge penalty on the coefficients (summed log-loss units).

    Returns:
        ``{"rate", "coefficients": {"model", "length", "instruction"}, "length_sd", "converged"}``,
        or None when the lengths never differ (nothing to control for) or N < 2.
    """
    y_N = np.asarray(outcomes_N, dtype=np.float64).reshape(-1)
    dlen_N = np.asarray(len_a_N, dtype=np.float64) - np.asarray(len_b_N, dtype=np.float64)
    if y_N.shape[0] < 2:
        return None
    sd = float(np.std(dlen_N, ddof=1))
    if not sd > 0:
        return None
    cols = [np.ones_like(y_N), np.tanh(dlen_N / sd)]
    has_diff = difficulty_N is not None
    if has_diff:
        cols.append(np.asarray(difficulty_N, dtype=np.float64).reshape(-1))
    beta_K, ok = _fit_logistic(np.stack(cols, axis=1), y_N, l2)
    z0_N = beta_K[0] + (beta_K[2] * cols[2] if has_diff else 0.0)
    return {
        "rate": float(np.mean(_sigmoid(z0_N))),
        "coefficients": {
            "model": float(beta_K[0]),
            "length": float(beta_K[1]),
            "instruction": float(beta_K[2]) if has_diff else None,
        },
        "length_sd": sd,
        "converged": ok,
    }


def length_controlled_winrate(
    outcomes_N: Sequence[float] | np.ndarray,
    len_a_N: Sequence[float] | np.ndarray,
    len_b_N: Sequence[float] | np.ndarray,
    difficulty_N: Sequence[float] | np.ndarray | None = None,
    n_boot: int = 200,
    seed: int = 0,
) -> dict[str, Any] | None:
    """:func:`fit_length_controlled` plus a percentile bootstrap interval (:func:`bootstrap_ci`:
    refits on prompts resampled with replacement, all columns paired; ``n_boot=0`` skips it).
    None when lengths never differ."""
    fit = fit_length_controlled(outcomes_N, len_a_N, len_b_N, difficulty_N)
    if fit is None:
        return None
    y_N = np.asarray(outcomes_N, dtype=np.float64)
    la_N, lb_N = np.asarray(len_a_N, dtype=np.float64), np.asarray(len_b_N, dtype=np.float64)
    d_N = None if difficulty_N is None else np.asarray(difficulty_N, dtype=np.float64)

    def refit_rate(y, la, lb, *d) -> float:  # NaN where a resample cannot be fitted
        f = fit_length_controlled(y, la, lb, d[0] if d else None)
        return math.nan if f is None else f["rate"]

    columns = (y_N, la_N, lb_N) + (() if d_N is None else (d_N,))
    fit["ci95"] = bootstrap_ci(columns, refit_rate, n_boot=n_boot, seed=seed, vectorized=False)
    fit["n"] = int(len(y_N))
    return fit


# --------------------------------------------------------------------------------------------
# Agreement between judges
# --------------------------------------------------------------------------------------------


def verdict_labels(outcomes_N: Sequence[float] | np.ndarray) -> np.ndarray:
    """Categorical verdicts from outcomes: 0 = B better (< 0.5), 1 = tie, 2 = A better."""
    o = np.asarray(outcomes_N, dtype=np.float64)
    return np.where(o > 0.5, 2, np.where(o < 0.5, 0, 1))


def cohen_kappa(labels_1: Sequence[int], labels_2: Sequence[int]) -> float:
    """Cohen's kappa of two raters' categorical labels (NaN when chance agreement is 1)."""
    x, y = np.asarray(labels_1), np.asarray(labels_2)
    if x.shape != y.shape or x.size == 0:
        raise ValueError("cohen_kappa: label arrays must be non-empty and the same length")
    if np.unique(np.concatenate([x, y])).size == 1:  # chance agreement 1: undefined
        return math.nan
    return float(cohen_kappa_score(x, y))


def fleiss_kappa(labels_JN: Sequence[Sequence[int]] | np.ndarray) -> float:
    """Fleiss' kappa of J >= 2 raters on N items (``labels_JN[j][i]`` = rater j's category of
    item i); NaN when chance agreement is 1."""
    L = np.asarray(labels_JN)
    if L.ndim != 2 or L.shape[0] < 2 or L.shape[1] == 0:
        raise ValueError("fleiss_kappa: need a (raters >= 2, items >= 1) label matrix")
    J = L.shape[0]
    cats = np.unique(L)
    n_NC = np.stack([(L == c).sum(axis=0) for c in cats], axis=1).astype(np.float64)
    P_N = (np.sum(n_NC**2, axis=1) - J) / (J * (J - 1))
    p_C = n_NC.sum(axis=0) / n_NC.sum()
    P_bar, P_e = float(P_N.mean()), float(np.sum(p_C**2))
    return math.nan if P_e >= 1.0 else (P_bar - P_e) / (1.0 - P_e)


def judge_agreement(outcomes: Mapping[str, np.ndarray]) -> dict[str, Any]:
    """Agreement of several judges' categorical verdicts (A / tie / B) on the same pairs:
    Cohen's kappa for two judges, Fleiss' kappa for more (and pairwise Cohen's kappas),
    plus the fraction of pairs where all judges agree."""
    names = list(outcomes)
    labels = {k: verdict_labels(v) for k, v in outcomes.items()}
    L_JN = np.stack([labels[k] for k in names])
    out: dict[str, Any] = {
        "judges": names,
        "all_agree": float(np.mean(np.all(L_JN == L_JN[0], axis=0))),
        "pairwise_cohen_kappa": {
            f"{a}|{b}": cohen_kappa(labels[a], labels[b])
            for i, a in enumerate(names)
            for b in names[i + 1 :]
        },
    }
    if len(names) == 2:
        out["method"] = "cohen"
        out["kappa"] = cohen_kappa(labels[names[0]], labels[names[1]])
    else:
        out["method"] = "fleiss"
        out["kappa"] = fleiss_kappa(L_JN)
    return out


# --------------------------------------------------------------------------------------------
# Summaries
# --------------------------------------------------------------------------------------------


def summarize_outcomes(
    outcomes_N: np.ndarray,
    len_a_N: np.ndarray,
    len_b_N: np.ndarray,
    difficulty_N: np.ndarray | None = None,
    *,
    n_boot: int = 2000,
    lc_n_boot: int = 200,
    seed: int = 0,
) -> dict[str, Any]:
    """Rate (ties half) with its bootstrap CI, and the length-controlled rate where lengths differ."""
    res = winrate_from_outcomes(outcomes_N, n_boot=n_boot, seed=seed)
    lc = length_controlled_winrate(outcomes_N, len_a_N, len_b_N, difficulty_N, lc_n_boot, seed)
    res["length_controlled_rate"] = None if lc is None else lc["rate"]
    res["length_controlled"] = lc
    return res


# --------------------------------------------------------------------------------------------
# Compare with judges
# --------------------------------------------------------------------------------------------


def compare(
    paired: PairedSamples,
    judges: Mapping[str, Judge],
    *,
    length_unit: str = "chars",
    n_boot: int = 2000,
    lc_n_boot: int = 200,
    seed: int = 0,
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Run every judge on the pairs; returns (results, per-pair rows).

    With several judges, a pair's outcome is the mean of the judges' outcomes.
    """
    if not judges:
        raise ValueError("no judges")
    len_a_N = answer_lengths(paired.answers_a, length_unit)
    len_b_N = answer_lengths(paired.answers_b, length_unit)
    kw = dict(n_boot=n_boot, lc_n_boot=lc_n_boot, seed=seed)
    per_judge: dict[str, dict[str, Any]] = {}
    results: dict[str, JudgeResult] = {}
    for name, judge in judges.items():
        log.info("judging %d pairs with %s", len(paired), name)
        r = judge.judge(paired.prompts, paired.answers_a, paired.answers_b)
        results[name] = r
        s = summarize_outcomes(r.outcomes_N, len_a_N, len_b_N, paired.difficulty_N, **kw)
        pc = r.position_consistency
        s["position_consistency"] = 1.0 if pc is None else pc
        s["position_consistency_measured"] = pc is not None
        s["stats"] = r.stats
        per_judge[name] = s
        log.info("%s: rate %.3f [%.3f, %.3f]", name, s["rate"], *s["ci95"])
    outcomes_JN = np.stack([r.outcomes_N for r in results.values()])
    combined_N = outcomes_JN.mean(axis=0)
    out = summarize_outcomes(combined_N, len_a_N, len_b_N, paired.difficulty_N, **kw)
    measured = [
        per_judge[n]["position_consistency"]
        for n in per_judge
        if per_judge[n]["position_consistency_measured"]
        and math.isfinite(per_judge[n]["position_consistency"])
    ]
    any_llm = any(per_judge[n]["position_consistency_measured"] for n in per_judge)
    # pointwise judges only: order cannot matter (1.0); LLM judges that compared no pair: None
    out["position_consistency"] = (
        float(np.mean(measured)) if measured else (None if any_llm else 1.0)
    )
    out["judges"] = list(judges)
    out["per_judge"] = per_judge
    if len(judges) > 1:
        out["agreement"] = judge_agreement({n: r.outcomes_N for n, r in results.items()})
    out["mean_length_a"] = float(len_a_N.mean())
    out["mean_length_b"] = float(len_b_N.mean())
    out["length_unit"] = length_unit
    out["n_identical"] = int(sum(a == b for a, b in zip(paired.answers_a, paired.answers_b)))
    out["n_unmatched_a"] = paired.n_unmatched_a
    out["n_unmatched_b"] = paired.n_unmatched_b

    rows = []
    for i in range(len(paired)):
        row = {
            "prompt": paired.prompts[i],
            "a": paired.answers_a[i],
            "b": paired.answers_b[i],
            "outcome": float(combined_N[i]),
            "judges": {},
        }
        for name, r in results.items():
            row["judges"][name] = {
                "outcome": float(r.outcomes_N[i]),
                **{k: v[i] for k, v in r.details.items()},
            }
        rows.append(row)
    return out, rows


# --------------------------------------------------------------------------------------------
# Generated text
# --------------------------------------------------------------------------------------------


def cut_at_stop(text: str, stop: Sequence[str]) -> str:
    """``text`` up to the first occurrence of any stop string."""
    cut = len(text)
    for s in stop:
        if s:
            j = text.find(s)
            if j != -1:
                cut = min(cut, j)
    return text[:cut]
