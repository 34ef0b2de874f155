"""Typed Hydra configs: every stage composes, typos are errors, the resolved config is saved."""

from __future__ import annotations

import pytest
from omegaconf import OmegaConf

from rlhfstack.configs import (
    STAGE_SCHEMAS,
    PPOConfig,
    SFTConfig,
    load_config,
    resolved_yaml,
    to_object,
)


@pytest.mark.parametrize("stage", [*STAGE_SCHEMAS, "pipeline"])
def test_every_stage_composes_with_demo_experiment(stage):
    obj = to_object(load_config(stage, ["+experiment=demo"]))
    assert obj.seed == 0
    if stage != "pipeline":
        assert isinstance(obj, STAGE_SCHEMAS[stage])
        assert obj.run_dir.startswith("runs/demo")


def test_run_dir_follows_artifacts_dir_and_stage():
    cfg = to_object(load_config("ppo", ["artifacts_dir=/x/y"]))
    assert isinstance(cfg, PPOConfig)
    assert cfg.run_dir == "/x/y/ppo"
    assert cfg.model.path == "/x/y/sft/model"
    assert cfg.reward_model_path == "/x/y/rm/model"


def test_misspelled_key_is_an_error():
    with pytest.raises(Exception, match="max_stpes"):
        load_config("sft", ["trainer.max_stpes=3"])


def test_appended_unknown_key_is_an_error():
    # Hydra lets `+key=value` append to a structured node; to_object must reject it.
    with pytest.raises(ValueError, match="foo"):
        to_object(load_config("sft", ["+trainer.foo=3"]))


def test_wrong_type_is_an_error():
    with pytest.raises(Exception, match="max_steps"):
        load_config("sft", ["trainer.max_steps=abc"])


def test_common_keys_override_from_command_line():
    cfg = to_object(load_config("sft", ["trainer.max_steps=7", "seed=3", "run_dir=/tmp/r"]))
    assert isinstance(cfg, SFTConfig)
    assert (cfg.trainer.max_steps, cfg.seed, cfg.run_dir) == (7, 3, "/tmp/r")


def test_resolved_yaml_has_no_interpolations():
    cfg = to_object(load_config("ppo", ["+experiment=demo", "kl.target=5.5"]))
    text = resolved_yaml(cfg)
    assert "${" not in text
    back = OmegaConf.create(text)
    assert back.kl.target == 5.5 and back.data.train_path == cfg.data.train_path


def test_data_root_comes_from_environment(monkeypatch):
    monkeypatch.setenv("RLHF_DATA_ROOT", "/some/where")
    assert to_object(load_config("sft", [])).data_root == "/some/where"


def test_generated_data_paths_are_absolute_so_the_data_root_never_captures_them():
    cfg = to_object(load_config("sft", ["+experiment=demo"]))
    assert cfg.data.train_path.startswith("/") and cfg.data.train_path.endswith(
        "runs/demo/data/sft_train.jsonl"
    )
