"""5-shot MMLU through lm-evaluation-harness on local CSVs, and the alignment tax.

Data layout (``$RLHF_DATA_ROOT/benchmarks/mmlu``)::

    dev/<subject>_dev.csv    5 few-shot exemplars per subject
    test/<subject>_test.csv  the evaluated questions
    header: question,choice0,choice1,choice2,choice3,answer   (answer = 0-based index)

The harness never touches the hub: :func:`write_task_yamls` writes one lm-eval task YAML per
subject whose ``custom_dataset`` is :func:`load_mmlu_csv` (a ``!function`` reference), reading
the CSVs with the stdlib ``csv`` module (so that choices such as ``None`` or ``0.50`` stay
strings). The prompt is the standard harness/Hendrycks format: a subject description, ``k``
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
"""

from __future__ import annotations

import csv
import logging
import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

logger = logging.getLogger(__name__)

__all__ = [
    "CHOICE_LETTERS",
    "FewshotChoice",
    "accuracy_summary",
    "alignment_tax",
    "choose_num_fewshot",
    "evaluate_mmlu",
    "list_subjects",
    "load_mmlu_csv",
    "read_mmlu_csv",
    "run_mmlu",
    "subject_task_name",
    "wilson_ci",
    "write_task_yamls",
]

CHOICE_LETTERS = ("A", "B", "C", "D")
CSV_HEADER = ("question", "choice0", "choice1", "choice2", "choice3", "answer")
TASK_PREFIX = "rlhf_mmlu"
GROUP_NAME = "rlhf_mmlu"
DOC_TO_TEXT = (
    "{{question.strip()}}\nA. {{choices[0]}}\nB. {{choices[1]}}\nC. {{choices[2]}}\n"
    "D. {{choices[3]}}\nAnswer:"
)

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
    import datasets

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


def _yaml_str(s: str) -> str:
    """A double-quoted YAML scalar (JSON string syntax is valid YAML)."""
    import json

    return json.dumps(s)


def write_task_yamls(
    mmlu_dir: str | Path,
    subjects: Sequence[str],
    out_dir: str | Path,
    num_fewshot: int = 5,
    prefix: str = TASK_PREFIX,
) -> dict[str, str]:
    """Write one lm-eval task YAML per subject (and a ``<prefix>`` group YAML) into ``out_dir``.

    Returns ``{subject: task_name}``. The YAMLs hold absolute CSV paths, so the directory can be
    passed to ``lm_eval --include_path``.
    """
    mmlu_dir = Path(mmlu_dir).resolve()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    names: dict[str, str] = {}
    for subject in subjects:
        dev = mmlu_dir / "dev" / f"{subject}_dev.csv"
        test = mmlu_dir / "test" / f"{subject}_test.csv"
        for p in (dev, test):
            if not p.exists():
                raise FileNotFoundError(f"MMLU subject {subject!r}: {p} not found")
        name = subject_task_name(subject, prefix)
        pretty = subject.replace("_", " ")
        description = (
            f"The following are multiple choice questions (with answers) about {pretty}.\n\n"
        )
        text = "\n".join(
            [
                f"# Generated by rlhfstack.evaluation.mmlu for {subject}; local CSVs, no hub access.",
                f"task: {name}",
                f"task_alias: {subject}",
                "custom_dataset: !function rlhfstack.evaluation.mmlu.load_mmlu_csv",
                "dataset_kwargs:",
                f"  dev: {_yaml_str(str(dev))}",
                f"  test: {_yaml_str(str(test))}",
                f"  subject: {_yaml_str(subject)}",
                "test_split: test",
                "fewshot_split: dev",
                "fewshot_config:",
                "  sampler: first_n",
                f"num_fewshot: {int(num_fewshot)}",
                "output_type: multiple_choice",
                f"description: {_yaml_str(description)}",
                f"doc_to_text: {_yaml_str(DOC_TO_TEXT)}",
                f"doc_to_choice: [{', '.join(_yaml_str(c) for c in CHOICE_LETTERS)}]",
                "doc_to_target: answer",
                "metric_list:",
                "  - metric: acc",
                "    aggregation: mean",
                "    higher_is_better: true",
                "metadata:",
                "  version: 1.0",
                "",
            ]
        )
        (out_dir / f"{name}.yaml").write_text(text, encoding="utf-8")
        names[subject] = name
    group = [f"group: {prefix}", "task:"] + [f"  - {n}" for n in names.values()]
    group += [
        "aggregate_metric_list:",
        "  - metric: acc",
        "    weight_by_size: true",
        "metadata:",
        "  version: 1.0",
        "",
    ]
    (out_dir / f"_{prefix}_group.yaml").write_text("\n".join(group), encoding="utf-8")
    return names


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
        rng = np.random.default_rng(seed)
        idx_RN = rng.integers(0, n, size=(n_boot, n))
        boots_R = d_N[idx_RN].mean(axis=1)
        lo, hi = np.percentile(boots_R, [2.5, 97.5])
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


# ----------------------------------------------------------------------------- evaluation


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


def _resolve_device(device: str) -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def evaluate_mmlu(
    model: Any,
    tokenizer: Any,
    *,
    mmlu_dir: str | Path,
    work_dir: str | Path,
    subjects: Sequence[str] | None = None,
    num_fewshot: int = 5,
    limit: int | None = None,
    batch_size: int = 8,
    max_length: int | None = None,
    min_fit_fraction: float = 0.95,
    apply_chat_template: bool = False,
    seed: int = 1234,
    quiet_harness: bool = True,
) -> dict[str, Any]:
    """Evaluate a loaded HF causal LM on MMLU with lm-eval's ``HFLM``.

    Args:
        model: a ``transformers`` causal LM (already on its device, eval mode).
        tokenizer: its tokenizer.
        mmlu_dir: directory with ``dev/`` and ``test/`` CSVs.
        work_dir: where the generated task YAMLs go (``work_dir/lm_eval_tasks``).
        subjects: subset of subjects (default: all found).
        num_fewshot: shots requested (5 is the MMLU standard; reduced per subject to fit).
        limit: evaluate only the first ``limit`` test questions of each subject.
        batch_size: harness batch size.
        max_length: context length; default ``model.config.max_position_embeddings``.
        min_fit_fraction: see :func:`choose_num_fewshot`.
        apply_chat_template: wrap prompts in the tokenizer's chat template (instruct models).
        seed: harness seeds (python/numpy/torch/few-shot).
        quiet_harness: silence lm-eval's own INFO/WARNING logging during the run.

    Returns:
        ``{"accuracy", "n", "ci95", "macro_accuracy", "per_subject": {s: {"accuracy", "n",
        "num_fewshot", "fit_fraction", "n_truncated"}}, "items": {"s/doc_id": 0|1},
        "num_fewshot_requested", "max_length", "limit", "warnings": [str]}``.
    """
    all_subjects = list_subjects(mmlu_dir)
    if subjects:
        unknown = sorted(set(subjects) - set(all_subjects))
        if unknown:
            raise ValueError(f"unknown MMLU subjects {unknown}; available: {all_subjects}")
        subjects = list(dict.fromkeys(subjects))
    else:
        subjects = all_subjects
    if max_length is None:
        max_length = int(getattr(model.config, "max_position_embeddings", 2048))

    harness_log = logging.getLogger("lm_eval")
    old_level = harness_log.level
    if quiet_harness:  # per-task INFO/WARNING chatter; our own warnings still go through
        harness_log.setLevel(logging.ERROR)
    try:
        return _evaluate(
            model,
            tokenizer,
            mmlu_dir=mmlu_dir,
            work_dir=work_dir,
            subjects=subjects,
            num_fewshot=num_fewshot,
            limit=limit,
            batch_size=batch_size,
            max_length=max_length,
            min_fit_fraction=min_fit_fraction,
            apply_chat_template=apply_chat_template,
            seed=seed,
        )
    finally:
        harness_log.setLevel(old_level)


def _evaluate(
    model: Any,
    tokenizer: Any,
    *,
    mmlu_dir: str | Path,
    work_dir: str | Path,
    subjects: list[str],
    num_fewshot: int,
    limit: int | None,
    batch_size: int,
    max_length: int,
    min_fit_fraction: float,
    apply_chat_template: bool,
    seed: int,
) -> dict[str, Any]:
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    task_dir = Path(work_dir) / "lm_eval_tasks"
    names = write_task_yamls(mmlu_dir, subjects, task_dir, num_fewshot=num_fewshot)
    lm = HFLM(pretrained=model, tokenizer=tokenizer, max_length=max_length, batch_size=batch_size)
    tm = TaskManager(include_path=str(task_dir), include_defaults=False)
    loaded = tm.load(list(names.values()))
    tasks = loaded["tasks"]

    chat = lm.apply_chat_template if apply_chat_template else None
    choices: dict[str, FewshotChoice] = {}
    warnings: list[str] = []
    for subject, name in names.items():
        task = tasks[name]
        task.set_fewshot_seed(seed)
        docs = list(task.eval_docs)
        if limit is not None:
            docs = docs[: int(limit)]

        def contexts_for(k: int, task: Any = task, docs: list = docs) -> list[str]:
            return [
                task.fewshot_context(
                    d,
                    k,
                    apply_chat_template=apply_chat_template,
                    fewshot_as_multiturn=apply_chat_template,
                    chat_template=chat,
                )
                for d in docs
            ]

        choice = choose_num_fewshot(
            contexts_for, lambda s: len(lm.tok_encode(s)), num_fewshot, max_length, min_fit_fraction
        )
        choices[subject] = choice
        if choice.num_fewshot < num_fewshot:
            msg = (
                f"MMLU {subject}: {num_fewshot}-shot prompts exceed max_length={max_length}; "
                f"using {choice.num_fewshot}-shot ({choice.fit_fraction:.0%} of prompts fit)"
            )
            logger.warning(msg)
            warnings.append(msg)
        if choice.n_truncated:
            msg = (
                f"MMLU {subject}: {choice.n_truncated}/{len(docs)} prompts exceed "
                f"max_length={max_length} even at {choice.num_fewshot}-shot; truncated from the left"
            )
            logger.warning(msg)
            warnings.append(msg)
        task.set_config(key="num_fewshot", value=choice.num_fewshot)

    results = simple_evaluate(
        model=lm,
        tasks=list(tasks.values()),
        task_manager=tm,
        limit=limit,
        log_samples=True,
        bootstrap_iters=0,
        apply_chat_template=apply_chat_template,
        fewshot_as_multiturn=apply_chat_template,
        random_seed=seed,
        numpy_random_seed=seed,
        torch_random_seed=seed,
        fewshot_random_seed=seed,
    )
    if results is None:  # non-zero rank under a distributed launcher
        return {}

    items: dict[str, float] = {}
    per_subject: dict[str, dict[str, Any]] = {}
    for subject, name in names.items():
        samples = results["samples"][name]
        correct = [float(s["acc"]) for s in samples]
        for s, c in zip(samples, correct, strict=True):
            items[f"{subject}/{int(s['doc_id'])}"] = c
        ch = choices[subject]
        per_subject[subject] = {
            **accuracy_summary(correct),
            "num_fewshot": ch.num_fewshot,
            "fit_fraction": ch.fit_fraction,
            "n_truncated": ch.n_truncated,
        }
    overall = accuracy_summary(list(items.values()))
    return {
        **overall,
        "macro_accuracy": float(np.mean([v["accuracy"] for v in per_subject.values()])),
        "per_subject": per_subject,
        "items": items,
        "subjects": list(subjects),
        "num_fewshot_requested": int(num_fewshot),
        "max_length": int(max_length),
        "limit": limit,
        "chance": 0.25,
        "warnings": warnings,
    }


# ----------------------------------------------------------------------------- entry point


def _load_baseline_results(path: str | Path) -> tuple[dict[str, Any], dict[str, float]]:
    """(summary, items) of an earlier run: its output dir or its ``mmlu.json``."""
    import json

    path = Path(path)
    summary_path = path / "mmlu.json" if path.is_dir() else path
    items_path = summary_path.parent / "mmlu_items.json"
    if not summary_path.exists() or not items_path.exists():
        raise FileNotFoundError(f"baseline_results: need {summary_path} and {items_path}")
    summary = json.loads(summary_path.read_text(encoding="utf-8"))
    items = json.loads(items_path.read_text(encoding="utf-8"))["policy"]
    return summary, {k: float(v) for k, v in items.items()}


def _eval_model_dir(
    path: str, tokenizer_path: str | None, cfg: Any, work_dir: Path, device: str, mmlu_dir: Path
) -> dict[str, Any]:
    import gc

    import torch
    from transformers import AutoTokenizer

    from rlhfstack.models.core import load_causal_lm

    tok = AutoTokenizer.from_pretrained(tokenizer_path or path)
    model = load_causal_lm(path, dtype=cfg.dtype, device=device, trainable=False)
    try:
        return evaluate_mmlu(
            model,
            tok,
            mmlu_dir=mmlu_dir,
            work_dir=work_dir,
            subjects=list(cfg.subjects) or None,
            num_fewshot=cfg.num_fewshot,
            limit=cfg.limit,
            batch_size=cfg.batch_size,
            max_length=cfg.max_length,
            min_fit_fraction=cfg.min_fit_fraction,
            apply_chat_template=cfg.apply_chat_template,
            seed=cfg.seed,
        )
    finally:
        del model
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def run_mmlu(cfg: Any) -> dict[str, Any]:
    """Run MMLU as configured by an ``MMLUEvalConfig``; write ``output_dir/mmlu.json`` (summary,
    per-subject results, ``alignment_tax`` when a baseline is given) and ``mmlu_items.json``
    (per-question 0/1 correctness, for later pairing). Returns the summary written."""
    import torch

    from rlhfstack.runtime import atomic_write_json, save_resolved_config, seed_everything

    seed_everything(cfg.seed)
    out_dir = Path(cfg.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    save_resolved_config(cfg, out_dir)
    device = (
        cfg.device if cfg.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    )
    mmlu_dir = Path(cfg.mmlu_dir)
    if not mmlu_dir.is_absolute():
        mmlu_dir = Path(cfg.data_root) / mmlu_dir

    policy = _eval_model_dir(cfg.model_path, cfg.tokenizer_path, cfg, out_dir, device, mmlu_dir)
    items = {"policy": policy.pop("items")}
    summary: dict[str, Any] = {"model_path": cfg.model_path, **policy}

    baseline_items = None
    if cfg.baseline_path:
        base = _eval_model_dir(cfg.baseline_path, None, cfg, out_dir / "baseline", device, mmlu_dir)
        baseline_items = base.pop("items")
        items["baseline"] = baseline_items
        summary["baseline"] = {"model_path": cfg.baseline_path, **base}
    elif cfg.baseline_results:
        base, baseline_items = _load_baseline_results(cfg.baseline_results)
        summary["baseline"] = {"results": str(cfg.baseline_results), **base}
    if baseline_items is not None:
        tax = alignment_tax(items["policy"], baseline_items, n_boot=cfg.n_bootstrap, seed=cfg.seed)
        summary["alignment_tax"] = tax
        logger.info(
            "MMLU accuracy %.4f (baseline %.4f): alignment tax %.4f, 95%% CI [%.4f, %.4f]",
            tax["policy_accuracy"],
            tax["baseline_accuracy"],
            tax["alignment_tax"],
            *tax["ci95"],
        )
    else:
        logger.info("MMLU accuracy %.4f (n=%d)", summary["accuracy"], summary["n"])
    atomic_write_json(out_dir / "mmlu_items.json", items)
    atomic_write_json(out_dir / "mmlu.json", summary)
    return summary
