"""Chain the stages: data -> sft -> rm -> ppo -> dpo -> eval.

Each stage is composed from its own config tree (``conf/<stage>.yaml``) with
``artifacts_dir``, ``seed``, the pipeline's ``common_overrides`` and its ``stage_overrides``;
stages pass nothing in memory, only paths under ``artifacts_dir``.

``jobs=1`` runs the stages one after another in this process. ``jobs=N`` also runs them in
order here, but first starts later stages whose inputs (``NEEDS``) are all finished in up to
N-1 background (spawned) processes: with 2, DPO (which reads only the preference data and the
SFT model) trains beside RM -> PPO. Every stage is seeded and reads only files, so the results
are the same either way; only the wall time changes.
"""

from __future__ import annotations

import functools
import importlib
import logging
import multiprocessing as mp
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from rlhfstack import logs, progress
from rlhfstack.configs import PipelineConfig, load_config, to_object
from rlhfstack.tasks.demo import gold_scorer_for
from rlhfstack.training import exit_on_divergence, finished_run

log = logging.getLogger("rlhfstack.pipeline")

STAGE_MODULES = {
    "data": "rlhfstack.stages.demo_data",
    "sft": "rlhfstack.stages.sft",
    "rm": "rlhfstack.stages.reward_model",
    "ppo": "rlhfstack.stages.ppo",
    "dpo": "rlhfstack.stages.dpo",
    "eval": "rlhfstack.evaluation.jobs.demo",
    # RLAIF / Constitutional AI (+experiment=demo_rlaif): no simulated labeler runs
    "rlaif_data": "rlhfstack.stages.rlaif_data",
    "cai_sl": "rlhfstack.stages.cai_sl",
    "ai_labels": "rlhfstack.stages.ai_labels",
    "rlaif_eval": "rlhfstack.evaluation.jobs.rlaif",
    "online_dpo": "rlhfstack.stages.dpo",  # iterative DPO beside the offline one (demo_online_dpo)
    "online_dpo_eval": "rlhfstack.evaluation.jobs.online_dpo",
}

#: the stages whose outputs each stage reads (only those listed in ``stages`` are waited for)
NEEDS = {
    "data": (),
    "sft": ("data",),
    "rm": ("data", "sft"),
    "ppo": ("data", "sft", "rm"),
    "dpo": ("data", "sft"),
    "eval": ("data", "sft", "rm", "ppo", "dpo"),
    # in demo_rlaif the sft stage fine-tunes on cai_sl's revisions and rm / ppo start from it:
    # that experiment runs with jobs=1, so these static needs never start a stage too early
    "rlaif_data": (),
    "cai_sl": ("rlaif_data",),
    "ai_labels": ("rlaif_data", "cai_sl", "sft"),
    "rlaif_eval": ("rlaif_data", "cai_sl", "sft", "ai_labels", "rm", "ppo"),
    "online_dpo": ("data", "sft"),
    "online_dpo_eval": ("data", "sft", "dpo", "online_dpo"),
}


def stage_overrides(cfg: PipelineConfig, stage: str) -> list[str]:
    return [
        f"artifacts_dir={cfg.artifacts_dir}",
        f"seed={cfg.seed}",
        f"data_root={cfg.data_root}",
        *(["overwrite=true"] if cfg.overwrite else []),
        *cfg.common_overrides,
        *cfg.stage_overrides.get(stage, []),
    ]


def run_stage(stage: str, scfg: Any, command: str = "") -> None:
    """Run one stage with its composed config (in this process); its records are tagged with
    the stage, and its log ``<run_dir>/<stage>.log`` is closed when it ends, even on failure."""
    with logs.stage_context(stage):
        try:
            _run_stage(stage, scfg, command)
        finally:
            logs.close_stage_log()


def _run_stage(stage: str, scfg: Any, command: str) -> None:
    mod = importlib.import_module(STAGE_MODULES[stage])
    if stage == "ppo":
        gold = (
            gold_scorer_for(scfg.gold_task, scfg.artifacts_dir, scfg.cluster.device)
            if scfg.gold_eval_every
            else None
        )
        mod.train(scfg, gold_scorer=gold)
    elif stage == "eval":
        mod.run_demo_eval(scfg, command=command)
    elif stage == "rlaif_eval":
        mod.run_rlaif_eval(scfg, command=command)
    elif stage == "online_dpo_eval":
        mod.run_online_dpo_eval(scfg, command=command)
    else:
        mod.train(scfg)


def _run_stage_child(stage: str, scfg: Any, command: str, log_queue: Any = None) -> None:
    """:func:`run_stage` in a background process: its records (tagged ``stage``) go through
    ``log_queue`` to the pipeline's handlers (``pipeline.log`` and the console), and it draws no
    progress bar; the end of the stage is logged as soon as it finishes, a failure with its
    traceback. A diverged run logs one error paragraph and exits with ``EXIT_DIVERGED`` (the
    parent reports the exit code)."""
    if log_queue is not None:
        logs.log_to_queue(log_queue, stage)
    progress.set_mode("lines")  # two bars on one terminal would overwrite each other
    t0 = time.perf_counter()
    try:
        with exit_on_divergence():
            run_stage(stage, scfg, command)
    except SystemExit as e:
        if e.code not in (0, None):
            log.error("== stage %s failed (exit code %s)", stage, e.code)
        raise
    except BaseException:
        log.exception("== stage %s failed (background)", stage)
        raise
    if (Path(scfg.run_dir) / "done.json").exists():
        log.info(
            "== stage %s done (background, %s)",
            stage,
            progress.format_duration(time.perf_counter() - t0),
        )


def _spawn(stage: str, scfg: Any, command: str, log_queue: Any = None) -> Any:
    p = mp.get_context("spawn").Process(
        target=_run_stage_child, args=(stage, scfg, command, log_queue), name=f"stage-{stage}"
    )
    p.start()
    return p


def run_pipeline(
    cfg: PipelineConfig, command: str = "", spawn: Callable[..., Any] | None = None
) -> Path:
    """Run ``cfg.stages``; returns ``artifacts_dir``. ``spawn(stage, scfg, command)`` starts a
    stage in the background and returns a handle with ``is_alive()``, ``join()`` (blocks until
    it ends), ``exitcode`` and ``terminate()`` (default: a spawned process whose records reach
    this process's handlers through a queue; tests pass their own).

    Every record is tagged with its stage (``pipeline`` for the pipeline's own), and each stage
    also writes ``<run_dir>/<stage>.log``."""
    logs.configure_logging()
    logs.set_default_stage("pipeline")
    unknown = [s for s in cfg.stages if s not in STAGE_MODULES]
    if unknown:
        raise ValueError(f"stages: unknown stage(s) {unknown}; choose from {list(STAGE_MODULES)}")
    if cfg.jobs < 1:
        raise ValueError(f"jobs: must be >= 1, got {cfg.jobs}")
    todo: list[tuple[str, Any]] = []
    for stage in cfg.stages:
        scfg = to_object(load_config(stage, stage_overrides(cfg, stage)))
        if finished_run(scfg):  # trained again only when asked (overwrite / resume=force)
            log.info("== %s: finished in %s (done.json), skipped", stage, scfg.run_dir)
            continue
        todo.append((stage, scfg))
    t0 = time.perf_counter()
    if cfg.jobs == 1:
        for stage, scfg in todo:
            log.info("== stage %s -> %s", stage, scfg.run_dir)
            run_stage(stage, scfg, command)
    elif spawn is not None:
        _run_concurrently(todo, cfg, command, spawn)
    else:
        with logs.forward_from_children() as queue:
            _run_concurrently(todo, cfg, command, functools.partial(_spawn, log_queue=queue))
    log.info(
        "== pipeline done in %s: %s",
        progress.format_duration(time.perf_counter() - t0),
        ", ".join(f"{stage} -> {scfg.run_dir}" for stage, scfg in todo) or "nothing to run",
    )
    return Path(cfg.artifacts_dir)


def _run_concurrently(
    todo: list[tuple[str, Any]], cfg: PipelineConfig, command: str, spawn: Callable[..., Any]
) -> None:
    """Stages run in order in this process; before each, later stages whose inputs are all
    finished start in background processes (at most ``jobs - 1``); a stage that needs a
    background one waits for it first."""
    listed = {stage for stage, _ in todo}
    done: set[str] = set()
    children: dict[str, tuple[Any, Any]] = {}

    def needs(stage: str) -> list[str]:
        return [n for n in NEEDS[stage] if n in listed]

    def join(stage: str) -> None:
        handle, scfg = children.pop(stage)
        handle.join()
        if handle.exitcode != 0:
            raise RuntimeError(
                f"stage {stage} failed (exit code {handle.exitcode}); see its log "
                f"{Path(scfg.run_dir) / (stage + '.log')}"
            )
        if not (Path(scfg.run_dir) / "done.json").exists():
            # a stage that exits 0 without done.json was preempted (it saved a checkpoint)
            log.warning("== %s stopped before finishing (preempted): the pipeline stops", stage)
            raise SystemExit(0)
        done.add(stage)  # its process logged "stage ... done" when it ended

    try:
        for i, (stage, scfg) in enumerate(todo):
            if stage in children:
                join(stage)
                continue
            for n in needs(stage):
                if n in children:
                    join(n)
            for later, lcfg in todo[i + 1 :]:
                if len(children) >= cfg.jobs - 1:
                    break
                if later not in children and all(n in done for n in needs(later)):
                    log.info("== stage %s -> %s (background)", later, lcfg.run_dir)
                    children[later] = (spawn(later, lcfg, command), lcfg)
            log.info("== stage %s -> %s", stage, scfg.run_dir)
            run_stage(stage, scfg, command)
            done.add(stage)
    finally:
        for handle, _ in children.values():  # on failure or preemption: stop the others
            if handle.is_alive():
                handle.terminate()  # SIGTERM: training stages checkpoint and exit
        for handle, _ in children.values():
            handle.join()
