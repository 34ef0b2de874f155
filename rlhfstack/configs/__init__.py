"""Structured configs for every stage, registered with Hydra's ConfigStore.

Each stage has one typed dataclass (``SFTConfig``, ``RMConfig``, ``PPOConfig``, ``DPOConfig``, ...).
The YAML trees under ``conf/`` are validated against these schemas: a misspelled or unknown key
is an error, not a silently ignored value. Every field carries a docstring (the string literal
under it) and, where a paper fixes the default, the paper is cited there.

Composition (see ``conf/``)::

    conf/sft.yaml        defaults: [sft_schema, model: ..., data: ..., cluster: local, _self_]
    conf/experiment/X    a named bundle of overrides, used as ``+experiment=X``

``load_config(stage, overrides)`` composes the same tree without ``@hydra.main`` (the pipeline
recipe and the tests use it).
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import re
from typing import Any

from hydra import compose, initialize_config_dir
from hydra.core.config_store import ConfigStore
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from rlhfstack.configs.checks import validate
from rlhfstack.configs.common import (
    CONF_DIR,
    DATA_ROOT_INTERP,
    RECIPE_EXCLUDE,
    RENAMED_KEYS,
    REPO_ROOT,
    ClusterConfig,
    DataConfig,
    EndpointConfig,
    LoggingConfig,
    LoraConfig,
    ModelConfig,
    ParallelConfig,
    StageConfig,
    TrainerConfig,
    default_data_root,
    recipe_diff,
    recipe_hash,
    recipe_of,
)
from rlhfstack.configs.evaluation import (
    EVAL_ENTRY_SCHEMAS,
    EVAL_SUITE_SCHEMAS,
    DetectorThresholds,
    GenerateSamplesConfig,
    GenerationConfig,
    HHEvalConfig,
    JudgingConfig,
    LLMJudgeConfig,
    MMLUEvalConfig,
    OveroptimizationConfig,
    RewardHackingConfig,
    RMEvalConfig,
    WinrateConfig,
)
from rlhfstack.configs.rlaif import (
    AILabelsConfig,
    CAISLConfig,
    FeedbackConfig,
    RLAIFDataConfig,
    RLAIFEvalConfig,
)
from rlhfstack.configs.stages import (
    DemoDataConfig,
    DPOConfig,
    DPOHyperparams,
    EvalConfig,
    KLConfig,
    OnlineDPOEvalConfig,
    PipelineConfig,
    PPOConfig,
    PPOHyperparams,
    RMConfig,
    RMHyperparams,
    RolloutConfig,
    SFTConfig,
)

STAGE_SCHEMAS: dict[str, type] = {
    "data": DemoDataConfig,
    "sft": SFTConfig,
    "rm": RMConfig,
    "ppo": PPOConfig,
    "dpo": DPOConfig,
    "eval": EvalConfig,
    "rlaif_data": RLAIFDataConfig,
    "cai_sl": CAISLConfig,
    "ai_labels": AILabelsConfig,
    "rlaif_eval": RLAIFEvalConfig,
    "online_dpo_eval": OnlineDPOEvalConfig,
}

PRIMARY_CONFIG_NAMES = {
    "data": "demo_data",
    "sft": "sft",
    "rm": "rm",
    "ppo": "ppo",
    "dpo": "dpo",
    "eval": "evaluate",
    "rlaif_data": "rlaif_data",
    "cai_sl": "cai_sl",
    "ai_labels": "ai_labels",
    "rlaif_eval": "rlaif_eval",
    "online_dpo": "dpo",
    "online_dpo_eval": "online_dpo_eval",
    "pipeline": "pipeline",
}


def _abspath(path: str) -> str:
    return os.path.abspath(path)


# ``${abspath:${artifacts_dir}}/data/x.jsonl``: files a run generated are named by absolute path, so
# that the data loader never mistakes them for files under the shared data root.
if not OmegaConf.has_resolver("abspath"):
    OmegaConf.register_new_resolver("abspath", _abspath)

_SUBDIR_MAX = 160


def sweep_subdir() -> str:
    """The directory of one job of a Hydra multirun (``-m``), under the sweep's ``run_dir``:
    ``<job.num>_<job.override_dirname>``, e.g. ``1_dpo.beta=0.2,trainer.max_steps=2``. The
    overrides name the job (Hydra's ``override_dirname``; the stage YAMLs leave out ``run_dir``,
    ``artifacts_dir``, ``overwrite`` and ``resume``, so that rerunning a sweep with
    ``overwrite=true`` finds the same directories); the number keeps two jobs apart even where
    their names would not be. ``/`` in a value becomes ``_``; a name over 160 characters is cut
    and ends with a hash of the whole. Used as ``hydra.sweep.subdir: ${sweep_subdir:}``."""
    job = HydraConfig.get().job
    name = re.sub(r"[/\\\s]", "_", str(job.override_dirname))
    full = f"{job.num}_{name}" if name else str(job.num)
    if len(full) > _SUBDIR_MAX:
        full = full[: _SUBDIR_MAX - 13] + "-" + hashlib.sha256(full.encode()).hexdigest()[:12]
    return full


if not OmegaConf.has_resolver("sweep_subdir"):
    OmegaConf.register_new_resolver("sweep_subdir", sweep_subdir)


def register_configs() -> None:
    """Register every schema in Hydra's ConfigStore (idempotent)."""
    cs = ConfigStore.instance()
    for name, schema in STAGE_SCHEMAS.items():
        cs.store(name=f"{PRIMARY_CONFIG_NAMES[name]}_schema", node=schema)
    cs.store(name="pipeline_schema", node=PipelineConfig)
    cs.store(name="rm_eval_schema", node=RMEvalConfig)
    cs.store(group="model", name="model_schema", node=ModelConfig)
    cs.store(group="data", name="data_schema", node=DataConfig)
    cs.store(group="cluster", name="cluster_schema", node=ClusterConfig)
    for name, schema in EVAL_ENTRY_SCHEMAS.items():
        cs.store(name=f"{name}_schema", node=schema)
    for name, schema in EVAL_SUITE_SCHEMAS.items():
        cs.store(name=f"{name}_schema", node=schema)


register_configs()


def load_config(stage: str, overrides: list[str] | None = None) -> DictConfig:
    """Compose ``conf/<stage>.yaml`` with Hydra overrides, outside ``@hydra.main``.

    Returns the composed (struct-mode) DictConfig; unknown keys raise.
    """
    name = PRIMARY_CONFIG_NAMES.get(stage, stage)
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(config_name=name, overrides=list(overrides or []))
    return cfg


def to_object(cfg: DictConfig | Any) -> Any:
    """Resolve interpolations and return the typed dataclass instance.

    Keys added with Hydra's ``+key=value`` that the schema does not declare are rejected here
    (Hydra lets ``+`` append to a structured node; the typed object would silently drop them).
    Every field's declared constraint (``rlhfstack.configs.checks``) is checked here too, so a
    bad value fails every recipe before anything loads: one ``ValueError`` lists each bad field.
    """
    if not isinstance(cfg, DictConfig):
        return cfg
    schema = OmegaConf.get_type(cfg)
    if schema is not None and schema is not dict:
        try:
            OmegaConf.merge(
                OmegaConf.structured(schema), OmegaConf.to_container(cfg, resolve=False)
            )
        except Exception as err:  # omegaconf raises ConfigKeyError / ValidationError
            raise ValueError(f"invalid config for {schema.__name__}: {err}") from None
    obj = OmegaConf.to_object(cfg)
    return validate(obj) if dataclasses.is_dataclass(obj) else obj


def resolved_yaml(cfg: Any) -> str:
    """The fully resolved config as YAML (dataclass or DictConfig)."""
    node = OmegaConf.structured(cfg) if not isinstance(cfg, DictConfig) else cfg
    return OmegaConf.to_yaml(node, resolve=True)


__all__ = [
    "AILabelsConfig",
    "CAISLConfig",
    "FeedbackConfig",
    "RLAIFDataConfig",
    "RLAIFEvalConfig",
    "CONF_DIR",
    "RECIPE_EXCLUDE",
    "recipe_diff",
    "recipe_hash",
    "recipe_of",
    "ClusterConfig",
    "DATA_ROOT_INTERP",
    "DPOConfig",
    "DPOHyperparams",
    "DataConfig",
    "DemoDataConfig",
    "DetectorThresholds",
    "EVAL_ENTRY_SCHEMAS",
    "EndpointConfig",
    "EVAL_SUITE_SCHEMAS",
    "EvalConfig",
    "GenerateSamplesConfig",
    "GenerationConfig",
    "HHEvalConfig",
    "JudgingConfig",
    "KLConfig",
    "LLMJudgeConfig",
    "LoggingConfig",
    "LoraConfig",
    "MMLUEvalConfig",
    "ModelConfig",
    "OveroptimizationConfig",
    "PPOConfig",
    "PPOHyperparams",
    "PRIMARY_CONFIG_NAMES",
    "ParallelConfig",
    "OnlineDPOEvalConfig",
    "PipelineConfig",
    "RENAMED_KEYS",
    "REPO_ROOT",
    "RMConfig",
    "RMEvalConfig",
    "RMHyperparams",
    "RewardHackingConfig",
    "RolloutConfig",
    "SFTConfig",
    "STAGE_SCHEMAS",
    "StageConfig",
    "TrainerConfig",
    "WinrateConfig",
    "default_data_root",
    "load_config",
    "register_configs",
    "resolved_yaml",
    "sweep_subdir",
    "to_object",
    "validate",
]
