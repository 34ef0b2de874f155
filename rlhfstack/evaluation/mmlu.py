"""MMLU on local CSVs: the data, the few-shot fit to a context window, and the alignment tax.

Data layout (``$RLHF_DATA_ROOT/benchmarks/mmlu``)::

    dev/<subject>_dev.csv    5 few-shot exemplars per subject
    test/<subject>_test.csv  the evaluated questions
    header: question,choice0,choice1,choice2,choice3,answer   (answer = 0-based index)

The harness never touches the hub: :func:`rlhfstack.evaluation.jobs.mmlu.write_task_yamls`
writes one lm-eval task YAML per subject whose ``custom_dataset`` is :func:`load_mmlu_csv` (a
``!function`` reference), reading the CSVs with the stdlib ``csv`` module (so that choices such
as ``None`` or ``0.50`` stay strings). The prompt is the standard harness/Hendrycks format: a subject description, ``k``
solved dev examples, then ``question / A. .. / D. .. / Answer:`` scored by the log-likelihood of
`` A`` .. `` D`` (``acc``). The YAML directory also holds a ``rlhf_mmlu`` group, so the same tasks
run from the CLI: ``lm_eval --include_path DIR --tasks rlhf_mmlu --model hf ...``.

Short context windows (stories260K: 512 positions) cannot hold 5-shot prompts. For each subject
:func:`choose_num_fewshot` keeps the largest ``k <= num_fewshot`` for which at least
``min_fit_fraction`` of the evaluated prompts fit; the reduction is logged and recorded. Prompts
that still do not fit are truncated from the left by the harness (counted in ``n_truncated``).

Alignment tax (Ouyang et al. 2022; Askell et al. 2021): ``tax = acc(baseline) - acc(policy)`` on
the same questions, positive when alignment cost accuracy, with a paired bootstrap CI over
questions (and a normal-approximation CI alongside).

The job that loads models, runs the harness and writes ``mmlu.json`` is
:mod:`rlhfstack.evaluation.jobs.mmlu`.
"""

from __future__ import annotations

import csv
import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import datasets
import numpy as np

from rlhfstack.evaluation.metrics import bootstrap_ci

__all__ = [
    "CHOICE_LETTERS",
    "FewshotChoice",
    "accuracy_summary",
    "alignment_tax",
    "choose_num_fewshot",
    "list_subjects",
    "load_mmlu_csv",
    "read_mmlu_csv",
    "subject_task_name",
    "wilson_ci",
]

CHOICE_LETTERS = ("A", "B", "C", "D")
CSV_HEADER = ("question", "choice0", "choice1", "choice2", "choice3", "answer")
TASK_PREFIX = "rlhf_mmlu"
GROUP_NAME = "rlhf_mmlu"

# ----------------------------------------------------------------------------- data


def list_subjects(mmlu_dir: str | Path) -> list[str]:
    """Subjects that have both ``test/<s>_test.csv`` and ``dev/<s>_dev.csv``, sorted."""
    mmlu_dir = Path(mmlu_dir)
    test_dir, dev_dir = mmlu_dir / "test", mmlu_dir / "dev"
    if not test_dir.is_dir() or not dev_dir.is_dir():
        raise FileNotFoundError(f"{mmlu_dir}: expected dev/ and test/ subdirectories")
    subjects = []
    for path in sorted(test_dir.glob("*_test.csv")):
        subject = path.name[: -len("_test.csv")]
        if (dev_dir / f"{subject}_dev.csv").exists():
            subjects.append(subject)
    if not subjects:
        raise FileNotFoundError(f"{mmlu_dir}: no <subject>_test.csv with a matching dev file")
    return subjects


def read_mmlu_csv(path: str | Path) -> list[dict[str, Any]]:
    """Rows of one MMLU CSV as ``{"question": str, "choices": [4 str], "answer": int}``.

    Every cell is kept as a string (no NaN / number inference); ``answer`` must be 0..3.
    """
    path = Path(path)
    rows: list[dict[str, Any]] = []
    with path.open(newline="", encoding="utf-8") as f:
        reader = csv.reader(f)
        header = tuple(h.strip() for h in next(reader, ()))
        if header != CSV_HEADER:
            raise ValueError(f"{path}: header {header} != {CSV_HEADER}")
        for line_no, cells in enumerate(reader, start=2):
            if not cells:
                continue
            if len(cells) != len(CSV_HEADER):
                raise ValueError(f"{path}:{line_no}: expected 6 cells, got {len(cells)}")
            answer = cells[5].strip()
            if answer not in {"0", "1", "2", "3"}:
                raise ValueError(f"{path}:{line_no}: answer {answer!r} is not a 0-based index 0..3")
            rows.append({"question": cells[0], "choices": cells[1:5], "answer": int(answer)})
    return rows


def load_mmlu_csv(dev: str, test: str, subject: str = "", **_unused: Any) -> Any:
    """lm-eval ``custom_dataset``: a ``datasets.DatasetDict`` with ``dev`` and ``test`` splits.

    The harness calls it with the task's ``metadata`` and ``dataset_kwargs`` merged as keyword
    arguments; only ``dev``, ``test`` (CSV paths) and ``subject`` are used.
    """
    features = datasets.Features(
        {
            "question": datasets.Value("string"),
            "choices": datasets.Sequence(datasets.Value("string")),
            "answer": datasets.Value("int64"),
            "subject": datasets.Value("string"),
        }
    )
    splits = {}
    for split, path in (("dev", dev), ("test", test)):
        rows = [dict(r, subject=subject) for r in read_mmlu_csv(path)]
        splits[split] = datasets.Dataset.from_list(rows, features=features)
    return datasets.DatasetDict(splits)


def subject_task_name(subject: str, prefix: str = TASK_PREFIX) -> str:
    """Harness task name of a subject, e.g. ``rlhf_mmlu_anatomy``."""
    return f"{prefix}_{re.sub(r'[^0-9A-Za-z_]', '_', subject)}"


# ----------------------------------------------------------------------------- statistics


def wilson_ci(k: float, n: int, z: float = 1.959964) -> list[float]:
    """Wilson score interval for a proportion ``k / n`` (NaNs for n == 0)."""
    if n <= 0:
        return [float("nan"), float("nan")]
    p = k / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return [max(0.0, centre - half), min(1.0, centre + half)]


def accuracy_summary(correct: Sequence[float] | np.ndarray) -> dict[str, Any]:
    """``{"accuracy", "n", "ci95"}`` of 0/1 outcomes; the CI is Wilson's (shape (N,) input)."""
    c_N = np.asarray(correct, dtype=np.float64).reshape(-1)
    n = int(c_N.size)
    acc = float(c_N.mean()) if n else float("nan")
    return {"accuracy": acc, "n": n, "ci95": wilson_ci(float(c_N.sum()), n)}


def alignment_tax(
    policy_items: dict[str, float],
    baseline_items: dict[str, float],
    n_boot: int = 2000,
    seed: int = 0,
) -> dict[str, Any]:
    """Alignment tax ``acc(baseline) - acc(policy)`` with 95% CIs.

    Args:
        policy_items: ``{item_id: 0/1 correct}`` of the aligned policy (ids ``subject/doc_id``).
        baseline_items: the same for the baseline (usually the SFT model).
        n_boot: paired bootstrap resamples over the shared items.
        seed: bootstrap RNG seed.

    Returns:
        ``{"alignment_tax", "ci95", "ci95_normal", "method", "n", "policy_accuracy",
        "baseline_accuracy"}``. On shared items the CI is a paired percentile bootstrap of the
        per-question difference (``ci95_normal`` is mean +- 1.96 sd/sqrt(n) of the same
        differences); with no shared items it falls back to the unpaired normal approximation.
        A CI that excludes 0 means a significant change.
    """
    shared = sorted(set(policy_items) & set(baseline_items))
    if shared:
        b_N = np.array([baseline_items[k] for k in shared], dtype=np.float64)
        p_N = np.array([policy_items[k] for k in shared], dtype=np.float64)
        d_N = b_N - p_N
        n = d_N.size
        # paired: one resample takes the same questions from both models
        lo, hi = bootstrap_ci(
            (b_N, p_N), lambda b, p, axis: np.mean(b - p, axis=axis), n_boot=n_boot, seed=seed
        )
        se = float(d_N.std(ddof=1) / math.sqrt(n)) if n > 1 else float("nan")
        tax = float(d_N.mean())
        return {
            "alignment_tax": tax,
            "ci95": [float(lo), float(hi)],
            "ci95_normal": [tax - 1.959964 * se, tax + 1.959964 * se],
            "method": "paired_bootstrap",
            "n": int(n),
            "policy_accuracy": float(p_N.mean()),
            "baseline_accuracy": float(b_N.mean()),
        }
    b_N = np.asarray(list(baseline_items.values()), dtype=np.float64)
    p_N = np.asarray(list(policy_items.values()), dtype=np.float64)
    if b_N.size == 0 or p_N.size == 0:
        raise ValueError("alignment_tax: empty policy or baseline results")
    pb, pp = float(b_N.mean()), float(p_N.mean())
    se = math.sqrt(pb * (1 - pb) / b_N.size + pp * (1 - pp) / p_N.size)
    tax = pb - pp
    ci = [tax - 1.959964 * se, tax + 1.959964 * se]
    return {
        "alignment_tax": tax,
        "ci95": ci,
        "ci95_normal": ci,
        "method": "unpaired_normal",
        "n": int(min(b_N.size, p_N.size)),
        "policy_accuracy": pp,
        "baseline_accuracy": pb,
    }


# ----------------------------------------------------------------------------- few-shot count


@dataclass
class FewshotChoice:
    """Outcome of fitting the few-shot count of one subject to the context window."""

    num_fewshot: int
    """Shots used (<= the requested count)."""
    fit_fraction: float
    """Fraction of the evaluated prompts whose context + answer fit in ``max_length``."""
    n_truncated: int
    """Evaluated prompts that still exceed ``max_length`` (left-truncated by the harness)."""


def choose_num_fewshot(
    contexts_for: Callable[[int], Sequence[str]],
    n_tokens: Callable[[str], int],
    requested: int,
    max_length: int,
    min_fit_fraction: float = 0.95,
    answer_suffix: str = " A",
) -> FewshotChoice:
    """Largest ``k <= requested`` whose prompts fit ``max_length`` for >= ``min_fit_fraction``.

    Args:
        contexts_for: ``k -> the k-shot contexts of the evaluated questions``.
        n_tokens: tokenizer length of a string (as the harness encodes it).
        requested: shots asked for.
        max_length: model context (positions). The harness feeds ``(context + answer)[-(L+1):-1]``
            so a prompt fits when ``len(context + answer) <= max_length + 1``.
        min_fit_fraction: required fraction of fitting prompts; 0 shots is the floor.
        answer_suffix: the scored continuation appended when measuring.
    """
    for k in range(max(0, requested), -1, -1):
        contexts = contexts_for(k)
        if not contexts:
            return FewshotChoice(k, 1.0, 0)
        allowed = math.floor((1.0 - min_fit_fraction) * len(contexts) + 1e-9)
        over = 0
        for c in contexts:
            over += n_tokens(c + answer_suffix) > max_length + 1
            if over > allowed and k > 0:
                break  # this k fails; skip measuring the rest
        else:
            return FewshotChoice(k, 1.0 - over / len(contexts), int(over))
    raise AssertionError("unreachable")
