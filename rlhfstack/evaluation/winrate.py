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
    * :func:`evaluate_samples` -- run judges on paired samples and write ``winrate.json`` and
      ``judgments.jsonl``; :func:`run_winrate` / :func:`run_generate_samples` /
      :func:`run_hh_eval` are what the ``eval/`` entry points call.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from rlhfstack.evaluation.judges import (
    ChatClient,
    GoldJudge,
    Judge,
    JudgeResult,
    JudgmentCache,
    LLMJudge,
    RMJudge,
    load_judge_prompt,
)
from rlhfstack.evaluation.metrics import bootstrap_mean_ci, winrate_from_outcomes
from rlhfstack.runtime import atomic_write_json, atomic_write_jsonl, save_resolved_config

log = logging.getLogger("rlhfstack.winrate")

__all__ = [
    "PairedSamples",
    "answer_lengths",
    "build_judge",
    "build_judges",
    "cohen_kappa",
    "cut_at_stop",
    "evaluate_samples",
    "fit_length_controlled",
    "fleiss_kappa",
    "generate_completions",
    "judge_agreement",
    "length_controlled_winrate",
    "load_samples",
    "pair_samples",
    "run_generate_samples",
    "run_hh_eval",
    "run_winrate",
    "summarize_outcomes",
    "verdict_labels",
]

# --------------------------------------------------------------------------------------------
# Sample files
# --------------------------------------------------------------------------------------------


def load_samples(path: str | os.PathLike) -> list[dict[str, Any]]:
    """Rows of a samples file: jsonl with string fields ``prompt`` and ``completion`` (other
    fields are kept; an optional numeric ``instruction_difficulty`` feeds the LC GLM)."""
    import json

    rows = []
    with open(path, encoding="utf-8") as f:
        for i, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}:{i}: invalid JSON ({err.msg})") from None
            for key in ("prompt", "completion"):
                if not isinstance(row.get(key), str):
                    raise ValueError(f"{path}:{i}: field {key!r} missing or not a string")
            rows.append(row)
    if not rows:
        raise ValueError(f"{path}: no samples")
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
    """:func:`fit_length_controlled` plus a percentile bootstrap interval (refits on prompts
    resampled with replacement; ``n_boot=0`` skips it). None when lengths never differ."""
    fit = fit_length_controlled(outcomes_N, len_a_N, len_b_N, difficulty_N)
    if fit is None:
        return None
    y_N = np.asarray(outcomes_N, dtype=np.float64)
    la_N, lb_N = np.asarray(len_a_N, dtype=np.float64), np.asarray(len_b_N, dtype=np.float64)
    d_N = None if difficulty_N is None else np.asarray(difficulty_N, dtype=np.float64)
    rates = []
    rng = np.random.default_rng(seed)
    for _ in range(n_boot):
        idx = rng.integers(0, len(y_N), len(y_N))
        f = fit_length_controlled(y_N[idx], la_N[idx], lb_N[idx], None if d_N is None else d_N[idx])
        if f is not None:
            rates.append(f["rate"])
    fit["ci95"] = (
        [float(x) for x in np.percentile(rates, [2.5, 97.5])] if rates else [math.nan, math.nan]
    )
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
    cats = np.union1d(x, y)
    p_o = float(np.mean(x == y))
    p_e = float(sum(np.mean(x == c) * np.mean(y == c) for c in cats))
    return math.nan if p_e >= 1.0 else (p_o - p_e) / (1.0 - p_e)


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


def _clean(obj: Any) -> Any:
    """JSON-safe copy: NaN/inf -> None, numpy scalars -> python."""
    if isinstance(obj, Mapping):
        return {str(k): _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return _clean(obj.tolist())
    if isinstance(obj, (np.floating, float)):
        f = float(obj)
        return f if math.isfinite(f) else None
    if isinstance(obj, np.integer):
        return int(obj)
    if isinstance(obj, np.bool_):
        return bool(obj)
    return obj


# --------------------------------------------------------------------------------------------
# Judges from a config
# --------------------------------------------------------------------------------------------


def _data_path(path: str, data_root: str | None) -> Path:
    p = Path(path).expanduser()
    return p if p.is_absolute() or data_root is None else Path(data_root) / p


def _llm_config(cfg: Any, name: str) -> Any:
    """The ``llm`` block, with ``llm_judges[name]`` merged on top (unknown keys raise)."""
    from omegaconf import OmegaConf

    from rlhfstack.configs import LLMJudgeConfig

    base = OmegaConf.structured(cfg.llm if cfg.llm is not None else LLMJudgeConfig())
    if name == "llm" and name not in (cfg.llm_judges or {}):
        return OmegaConf.to_object(base)
    over = cfg.llm_judges[name]
    if not isinstance(over, Mapping):
        raise ValueError(f"llm_judges.{name} must be a mapping of LLMJudgeConfig fields")
    try:
        merged = OmegaConf.merge(base, dict(over))
    except Exception as err:
        raise ValueError(f"llm_judges.{name}: {err}") from None
    return OmegaConf.to_object(merged)


def build_judge(name: str, cfg: Any, cache: JudgmentCache) -> Judge:
    """The judge called ``name``: ``gold``, ``rm``, ``llm`` or a key of ``cfg.llm_judges``."""
    if name == "gold":
        return GoldJudge.from_artifacts(cfg.artifacts_dir, cfg.device, cache)
    if name == "rm":
        if not cfg.rm_path:
            raise ValueError("judge=rm needs rm_path=DIR (a reward model saved by the RM stage)")
        return RMJudge.from_path(
            cfg.rm_path,
            device=cfg.device,
            cache=cache,
            max_len=cfg.rm_max_len,
            batch_size=cfg.batch_size,
        )
    if name == "llm" or name in (cfg.llm_judges or {}):
        lc = _llm_config(cfg, name)
        client = ChatClient(
            lc.model,
            base_url=lc.base_url,
            api_key_env=lc.api_key_env,
            requests_per_minute=lc.requests_per_minute,
            max_retries=lc.max_retries,
            backoff_base_s=lc.backoff_base_s,
            backoff_max_s=lc.backoff_max_s,
            timeout_s=lc.timeout_s,
        )
        prompt_path = _data_path(lc.prompt_file, cfg.data_root) if lc.prompt_file else None
        prompt = load_judge_prompt(prompt_path, lc.prompt_name)
        return LLMJudge(
            name,
            client,
            prompt,
            temperature=lc.temperature,
            max_tokens=lc.max_tokens,
            concurrency=lc.concurrency,
            cache=cache,
        )
    options = ["gold", "rm", "llm", *sorted(cfg.llm_judges or {})]
    raise ValueError(f"unknown judge {name!r}; choose from {options}")


def build_judges(cfg: Any, cache: JudgmentCache) -> dict[str, Judge]:
    """Judges named by ``cfg.judges`` (or ``[cfg.judge]``), in order."""
    names = list(cfg.judges) if cfg.judges else [cfg.judge]
    if len(set(names)) != len(names):
        raise ValueError(f"judges: duplicate names in {names}")
    return {n: build_judge(n, cfg, cache) for n in names}


# --------------------------------------------------------------------------------------------
# Evaluate
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


def evaluate_samples(
    rows_a: Sequence[Mapping[str, Any]],
    rows_b: Sequence[Mapping[str, Any]],
    cfg: Any,
    output_dir: str | os.PathLike,
    *,
    judges: Mapping[str, Judge] | None = None,
    max_pairs: int | None = None,
) -> dict[str, Any]:
    """Pair, judge and write ``output_dir/judgments.jsonl``; returns the results (the caller
    writes them). ``cfg`` is a :class:`rlhfstack.configs.JudgingConfig` (or subclass); the
    judges are built from it (with their own cache) unless ``judges`` is given."""
    out_dir = Path(output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paired = pair_samples(rows_a, rows_b)
    if max_pairs is not None and len(paired) > max_pairs:
        paired = PairedSamples(
            paired.prompts[:max_pairs],
            paired.answers_a[:max_pairs],
            paired.answers_b[:max_pairs],
            None if paired.difficulty_N is None else paired.difficulty_N[:max_pairs],
            paired.n_unmatched_a,
            paired.n_unmatched_b,
        )
    cache = JudgmentCache(cfg.cache_path) if judges is None else None
    try:
        judges = judges if judges is not None else build_judges(cfg, cache)
        res, rows = compare(
            paired,
            judges,
            length_unit=cfg.length_unit,
            n_boot=cfg.n_bootstrap,
            lc_n_boot=cfg.lc_n_bootstrap,
            seed=cfg.seed,
        )
    finally:
        if cache is not None:
            cache.close()
    res = _clean(res)
    atomic_write_jsonl(out_dir / "judgments.jsonl", _clean(rows))
    return res


def _config_dict(cfg: Any) -> dict[str, Any]:
    return dataclasses.asdict(cfg) if dataclasses.is_dataclass(cfg) else dict(cfg)


def run_winrate(cfg: Any) -> dict[str, Any]:
    """``eval/winrate.py``: judge ``cfg.a`` against ``cfg.b``; writes ``winrate.json``,
    ``judgments.jsonl`` and ``config.yaml`` into ``cfg.output_dir``."""
    out_dir = Path(cfg.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    save_resolved_config(cfg, out_dir)
    res = evaluate_samples(
        load_samples(cfg.a), load_samples(cfg.b), cfg, out_dir, max_pairs=cfg.max_pairs
    )
    res = {"a": str(cfg.a), "b": str(cfg.b), **res, "config": _clean(_config_dict(cfg))}
    atomic_write_json(out_dir / "winrate.json", res)
    log.info(
        "win-rate of A over B: %.3f [%.3f, %.3f] (n=%d); written to %s",
        res["rate"],
        *res["ci95"],
        res["n"],
        out_dir / "winrate.json",
    )
    return res


# --------------------------------------------------------------------------------------------
# Generation (local HF directory or OpenAI-compatible endpoint)
# --------------------------------------------------------------------------------------------


def is_endpoint(model: str) -> bool:
    """True for an ``http(s)://`` endpoint URL (else a local model directory)."""
    return model.startswith(("http://", "https://"))


def cut_at_stop(text: str, stop: Sequence[str]) -> str:
    """``text`` up to the first occurrence of any stop string."""
    cut = len(text)
    for s in stop:
        if s:
            j = text.find(s)
            if j != -1:
                cut = min(cut, j)
    return text[:cut]


def generate_completions(
    model: str,
    prompts: Sequence[str],
    gen: Any,
    *,
    device: str = "cpu",
    seed: int = 0,
    api_model: str | None = None,
) -> list[str]:
    """One completion per prompt from a local HF model directory (``sample_texts``, batched
    KV-cache sampling) or an OpenAI-compatible endpoint (chat completions, one user message per
    prompt). ``gen`` is a :class:`rlhfstack.configs.GenerationConfig`; completions are cut at
    ``gen.stop``."""
    if is_endpoint(model):
        from concurrent.futures import ThreadPoolExecutor

        name = api_model or gen.api_model
        if not name:
            raise ValueError(
                f"{model} is an endpoint: set generation.api_model (the model to request)"
            )
        client = ChatClient(
            name,
            base_url=model,
            api_key_env=gen.api_key_env,
            requests_per_minute=gen.requests_per_minute,
            max_retries=gen.max_retries,
            backoff_base_s=gen.backoff_base_s,
            timeout_s=gen.timeout_s,
        )
        params: dict[str, Any] = {"temperature": gen.temperature, "max_tokens": gen.max_new_tokens}
        if gen.stop:
            params["stop"] = list(gen.stop)[:4]  # the API accepts at most 4

        def one(p: str) -> str:
            return client.complete([{"role": "user", "content": p}], **params)

        with ThreadPoolExecutor(max_workers=max(1, gen.concurrency)) as pool:
            texts = list(pool.map(one, prompts))
    else:
        from rlhfstack.models.core import load_causal_lm, load_tokenizer
        from rlhfstack.rollout.generate import sample_texts

        if not Path(model).is_dir():
            raise FileNotFoundError(f"model {model!r}: neither a directory nor an http(s) endpoint")
        lm = load_causal_lm(model, dtype=gen.dtype, trainable=False, device=device)
        tok = load_tokenizer(model)
        texts, _, _ = sample_texts(
            lm,
            tok,
            list(prompts),
            max_new_tokens=gen.max_new_tokens,
            max_prompt_tokens=gen.max_prompt_tokens,
            temperature=gen.temperature,
            greedy=gen.greedy,
            batch_size=gen.batch_size,
            seed=seed,
            device=device,
        )
    return [cut_at_stop(t, gen.stop) for t in texts]


def run_generate_samples(cfg: Any) -> Path:
    """``eval/generate_samples.py``: write ``cfg.output`` (jsonl of ``{prompt, completion}``)."""
    from rlhfstack.data.loading import load_prompts
    from rlhfstack.runtime import seed_everything

    seed_everything(cfg.seed)
    examples, _ = load_prompts(
        cfg.prompts,
        adapter=cfg.adapter,
        template=cfg.template,
        data_root=cfg.data_root,
        max_records=cfg.max_prompts,
    )
    prompts = [e.prompt for e in examples]
    texts = generate_completions(
        cfg.model_path, prompts, cfg.generation, device=cfg.device, seed=cfg.seed
    )
    out = Path(cfg.output)
    atomic_write_jsonl(out, [{"prompt": p, "completion": t} for p, t in zip(prompts, texts)])
    log.info("%d samples from %s written to %s", len(texts), cfg.model_path, out)
    return out


# --------------------------------------------------------------------------------------------
# HH evaluation
# --------------------------------------------------------------------------------------------


def run_hh_eval(cfg: Any) -> dict[str, Any]:
    """``eval/hh_eval.py``: policy vs baseline on Anthropic HH prompts, judged by the reward
    model and/or LLM judges. Writes ``policy_samples.jsonl``, ``baseline_samples.jsonl``,
    ``winrate.json``, ``judgments.jsonl``, ``hh_eval.json`` and ``config.yaml``."""
    from rlhfstack.data.loading import load_prompts
    from rlhfstack.runtime import seed_everything

    seed_everything(cfg.seed)
    out_dir = Path(cfg.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    save_resolved_config(cfg, out_dir)
    examples, _ = load_prompts(
        cfg.prompts, adapter=cfg.adapter, template=cfg.template, data_root=cfg.data_root
    )
    prompts = list(dict.fromkeys(e.prompt for e in examples))  # distinct, in file order
    if cfg.n_prompts is not None and cfg.n_prompts < len(prompts):
        idx = np.sort(
            np.random.default_rng(cfg.seed).choice(len(prompts), cfg.n_prompts, replace=False)
        )
        prompts = [prompts[i] for i in idx]
    sides: dict[str, list[dict[str, Any]]] = {}
    for side, src, api_model in (
        ("policy", cfg.policy, cfg.policy_api_model),
        ("baseline", cfg.baseline, cfg.baseline_api_model),
    ):
        if src.endswith(".jsonl"):
            sides[side] = load_samples(src)
            continue
        log.info("generating %d %s completions with %s", len(prompts), side, src)
        texts = generate_completions(
            src, prompts, cfg.generation, device=cfg.device, seed=cfg.seed, api_model=api_model
        )
        sides[side] = [{"prompt": p, "completion": t} for p, t in zip(prompts, texts)]
        atomic_write_jsonl(out_dir / f"{side}_samples.jsonl", sides[side])
    res: dict[str, Any] = {
        "policy": str(cfg.policy),
        "baseline": str(cfg.baseline),
        "prompts": str(cfg.prompts),
        "n_prompts": len(prompts),
    }
    cache = JudgmentCache(cfg.cache_path)
    try:
        judges = build_judges(cfg, cache)
        wr = evaluate_samples(sides["policy"], sides["baseline"], cfg, out_dir, judges=judges)
        res["winrate"] = wr
        rm_judge = judges.get("rm")
        if isinstance(rm_judge, RMJudge):  # mean RM reward per side (scores come from the cache)
            paired = pair_samples(sides["policy"], sides["baseline"])
            sa, _ = rm_judge.score(paired.prompts, paired.answers_a)
            sb, _ = rm_judge.score(paired.prompts, paired.answers_b)
            res["rm_reward"] = {
                "policy": bootstrap_mean_ci(sa, cfg.n_bootstrap, cfg.seed),
                "baseline": bootstrap_mean_ci(sb, cfg.n_bootstrap, cfg.seed),
                "difference": bootstrap_mean_ci(sa - sb, cfg.n_bootstrap, cfg.seed),
            }
    finally:
        cache.close()
    res["config"] = _config_dict(cfg)
    res = _clean(res)
    atomic_write_json(out_dir / "winrate.json", {**wr, "config": res["config"]})
    atomic_write_json(out_dir / "hh_eval.json", res)
    log.info(
        "HH: policy over baseline %.3f [%.3f, %.3f] (n=%d, judges %s)",
        wr["rate"],
        *wr["ci95"],
        wr["n"],
        wr["judges"],
    )
    return res
