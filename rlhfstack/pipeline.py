"""Chain the stages in one process: data -> sft -> rm -> ppo -> dpo -> eval.

Each stage is composed from its own config tree (``conf/<stage>.yaml``) with
``artifacts_dir``, ``seed``, the pipeline's ``common_overrides`` and its ``stage_overrides``;
stages pass nothing in memory, only paths under ``artifacts_dir``.
"""

from __future__ import annotations

import importlib
import logging
from pathlib import Path

from rlhfstack.config import PipelineConfig, load_config, to_object

log = logging.getLogger("rlhfstack.pipeline")

STAGE_MODULES = {
    "data": "rlhfstack.stages.demo_data",
    "sft": "rlhfstack.stages.sft",
    "rm": "rlhfstack.stages.reward_model",
    "ppo": "rlhfstack.stages.ppo",
    "dpo": "rlhfstack.stages.dpo",
    "eval": "rlhfstack.stages.evaluate",
}


def stage_overrides(cfg: PipelineConfig, stage: str) -> list[str]:
    return [
        f"artifacts_dir={cfg.artifacts_dir}",
        f"seed={cfg.seed}",
        f"data_root={cfg.data_root}",
        *cfg.common_overrides,
        *cfg.stage_overrides.get(stage, []),
    ]


def run_pipeline(cfg: PipelineConfig, command: str = "") -> Path:
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="[%(asctime)s][%(name)s] %(message)s")
    unknown = [s for s in cfg.stages if s not in STAGE_MODULES]
    if unknown:
        raise ValueError(f"stages: unknown stage(s) {unknown}; choose from {list(STAGE_MODULES)}")
    for stage in cfg.stages:
        scfg = to_object(load_config(stage, stage_overrides(cfg, stage)))
        if cfg.skip_existing and (Path(scfg.run_dir) / "done.json").exists():
            log.info("== %s: done.json exists, skipped", stage)
            continue
        log.info("== stage %s -> %s", stage, scfg.run_dir)
        mod = importlib.import_module(STAGE_MODULES[stage])
        if stage == "ppo":
            from rlhfstack.tasks.demo import gold_scorer_for

            gold = (
                gold_scorer_for(scfg.gold_task, scfg.artifacts_dir, scfg.cluster.device)
                if scfg.gold_eval_every
                else None
            )
            mod.train(scfg, gold_scorer=gold)
        elif stage == "eval":
            mod.train(scfg, command=command)
        else:
            mod.train(scfg)
    return Path(cfg.artifacts_dir)
