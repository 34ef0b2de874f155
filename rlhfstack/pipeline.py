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

import importlib
import logging
import multiprocessing as mp
from collections.abc import Callable
from pathlib import Path
from typing import Any

from rlhfstack.configs import PipelineConfig, load_config, to_object
from rlhfstack.tasks.demo import gold_scorer_for
from rlhfstack.training import exit_on_divergence

log = logging.getLogger("rlhfstack.pipeline")

STAGE_MODULES = {
    "data": "rlhfstack.stages.demo_data",
    "sft": "rlhfstack.stages.sft",
    "rm": "rlhfstack.stages.reward_model",
    "ppo": "rlhfstack.stages.ppo",
    "dpo": "rlhfstack.stages.dpo",
    "eval": "rlhfstack.evaluation.jobs.demo",
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
    "online_dpo": ("data", "sft"),
    "online_dpo_eval": ("data", "sft", "dpo", "online_dpo"),
}


def stage_overrides(cfg: PipelineConfig, stage: str) -> list[str]:
    return [
        f"artifacts_dir={cfg.artifacts_dir}",
        f"seed={cfg.seed}",
        f"data_root={cfg.data_root}",
        *cfg.common_overrides,
        *cfg.stage_overrides.get(stage, []),
    ]


def run_stage(stage: str, scfg: Any, command: str = "") -> None:
    """Run one stage with its composed config (in this process)."""
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="[%(asctime)s][%(name)s] %(message)s")
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
    elif stage == "online_dpo_eval":
        mod.run_online_dpo_eval(scfg, command=command)
    else:
        mod.train(scfg)


def _run_stage_child(stage: str, scfg: Any, command: str) -> None:
    """:func:`run_stage` in a background process: a diverged run logs one error paragraph and
    exits with ``EXIT_DIVERGED`` (the parent reports the exit code)."""
    with exit_on_divergence():
        run_stage(stage, scfg, command)


def _spawn(stage: str, scfg: Any, command: str) -> Any:

    p = mp.get_context("spawn").Process(
        target=_run_stage_child, args=(stage, scfg, command), name=f"stage-{stage}"
    )
    p.start()
    return p


def run_pipeline(
    cfg: PipelineConfig, command: str = "", spawn: Callable[..., Any] | None = None
) -> Path:
    """Run ``cfg.stages``; returns ``artifacts_dir``. ``spawn(stage, scfg, command)`` starts a
    stage in the background and returns a handle with ``is_alive()``, ``join()`` (blocks until
    it ends), ``exitcode`` and ``terminate()`` (default: a spawned process; tests pass their own)."""
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="[%(asctime)s][%(name)s] %(message)s")
    unknown = [s for s in cfg.stages if s not in STAGE_MODULES]
    if unknown:
        raise ValueError(f"stages: unknown stage(s) {unknown}; choose from {list(STAGE_MODULES)}")
    if cfg.jobs < 1:
        raise ValueError(f"jobs: must be >= 1, got {cfg.jobs}")
    todo: list[tuple[str, Any]] = []
    for stage in cfg.stages:
        scfg = to_object(load_config(stage, stage_overrides(cfg, stage)))
        if cfg.skip_existing and (Path(scfg.run_dir) / "done.json").exists():
            log.info("== %s: done.json exists, skipped", stage)
            continue
        todo.append((stage, scfg))
    if cfg.jobs == 1:
        for stage, scfg in todo:
            log.info("== stage %s -> %s", stage, scfg.run_dir)
            run_stage(stage, scfg, command)
        return Path(cfg.artifacts_dir)
    _run_concurrently(todo, cfg, command, spawn or _spawn)
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
            raise RuntimeError(f"stage {stage} failed (exit code {handle.exitcode}); see its log")
        if not (Path(scfg.run_dir) / "done.json").exists():
            # a stage that exits 0 without done.json was preempted (it saved a checkpoint)
            log.warning("== %s stopped before finishing (preempted): the pipeline stops", stage)
            raise SystemExit(0)
        done.add(stage)
        log.info("== stage %s done (background)", stage)

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
