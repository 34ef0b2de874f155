"""Every config value is checked when the config is composed (``rlhfstack.configs.checks``), and
every input path when a stage starts (``rlhfstack.training.check_paths``), before any model loads."""

from __future__ import annotations

import dataclasses
import importlib
import json
import sys
from pathlib import Path

import pytest

from rlhfstack.configs import (
    EVAL_ENTRY_SCHEMAS,
    EVAL_SUITE_SCHEMAS,
    STAGE_SCHEMAS,
    PipelineConfig,
    RMEvalConfig,
    load_config,
    to_object,
)
from rlhfstack.configs.checks import CHECK, WHY, problems
from rlhfstack.training import check_paths

ROOTS = [
    *STAGE_SCHEMAS.values(),
    *EVAL_ENTRY_SCHEMAS.values(),
    *EVAL_SUITE_SCHEMAS.values(),
    PipelineConfig,
    RMEvalConfig,
]


def _fields(cls: type, prefix: str = ""):
    """``(dotted key, field)`` of every leaf field of ``cls``, nested config dataclasses walked."""
    for f in dataclasses.fields(cls):
        if f.default_factory is not dataclasses.MISSING:
            value = f.default_factory()
            if dataclasses.is_dataclass(value):
                yield from _fields(type(value), f"{prefix}{f.name}.")
                continue
        yield f"{prefix}{f.name}", f


@pytest.mark.parametrize("schema", ROOTS, ids=lambda c: c.__name__)
def test_every_field_declares_a_constraint_or_why_it_has_none(schema):
    # bool: OmegaConf's type check (true / false only) is the whole constraint
    undeclared = [
        key
        for key, f in _fields(schema)
        if f.type != "bool" and CHECK not in f.metadata and not f.metadata.get(WHY)
    ]
    assert not undeclared, (
        f"{schema.__name__}: fields with neither a check nor a reason: {undeclared}"
    )


@pytest.mark.parametrize("schema", ROOTS, ids=lambda c: c.__name__)
def test_defaults_pass_their_own_checks(schema):
    required = {key for key, f in _fields(schema) if f.default == "???"}
    obj = schema(**{k: "x" for k in required if "." not in k})
    assert problems(obj) == []


def test_the_walk_fails_on_a_new_field_without_a_constraint():
    @dataclasses.dataclass
    class Grown(STAGE_SCHEMAS["ppo"]):
        new_knob: float = 0.5

    assert any(key == "new_knob" for key, f in _fields(Grown) if not f.metadata)


@pytest.mark.parametrize(
    "override, allowed",
    [
        ("ppo.clip_eps=-1", "> 0"),
        ("trainer.batch_size=0", ">= 1"),
        ("trainer.save_every=-1", ">= 0"),
        ("kl.target=-1", "> 0"),
        ("rollout.temperature=0", "> 0"),
        ("ppo.gamma=1.5", "[0.0, 1.0]"),
        ("kl.estimator=k4", "k1 | k2 | k3"),
        ("trainer.adam_betas=[0.9,1.0]", "two numbers in [0, 1)"),
    ],
)
def test_a_bad_value_names_key_value_and_what_is_allowed(override, allowed):
    key, value = override.split("=")
    with pytest.raises(ValueError) as err:
        to_object(load_config("ppo", ["+experiment=demo", override]))
    line = next(line for line in str(err.value).splitlines() if line.strip().startswith(key + "="))
    assert allowed in line and value.strip("[]").split(",")[0] in line


def test_all_bad_fields_are_reported_at_once():
    overrides = ["ppo.clip_eps=-1", "trainer.batch_size=0", "kl.target=-1", "rollout.temperature=0"]
    with pytest.raises(ValueError) as err:
        to_object(load_config("ppo", ["+experiment=demo", *overrides]))
    msg = str(err.value)
    assert "4 bad values" in msg
    for override in overrides:
        assert override.split("=")[0] + "=" in msg


def test_a_bad_value_of_a_shared_group_fails_every_stage():
    for stage in ("sft", "rm", "dpo", "ppo"):
        with pytest.raises(ValueError, match=r"trainer\.batch_size=0: allowed >= 1"):
            to_object(load_config(stage, ["+experiment=demo", "trainer.batch_size=0"]))


def test_none_passes_where_the_type_admits_it():
    obj = to_object(load_config("rm", ["+experiment=demo", "rm.head_init_std=null"]))
    assert obj.rm.head_init_std is None


def test_eval_entry_configs_are_checked():
    with pytest.raises(ValueError, match=r"n_bootstrap=0: allowed >= 1"):
        to_object(load_config("winrate", ["a=x.jsonl", "b=y.jsonl", "n_bootstrap=0"]))
    obj = to_object(load_config("winrate", ["a=x.jsonl", "b=y.jsonl"]))
    assert obj.n_bootstrap > 0


# ----------------------------------------------------------------------------- paths at stage start


def _model_dir(path: Path, marker: str = "config.json") -> Path:
    path.mkdir(parents=True)
    (path / marker).write_text("{}")
    return path


def _demo_inputs(art: Path) -> None:
    """The files the demo PPO stage reads, as empty stand-ins (the checks read names only)."""
    _model_dir(art / "sft" / "model")
    _model_dir(art / "rm" / "model", "reward_config.json")
    (art / "data").mkdir(parents=True)
    for name in ("prompts_train.jsonl", "prompts_dev.jsonl"):
        (art / "data" / name).write_text("")


@pytest.fixture
def no_model_loads(monkeypatch):
    """Every loader of a model raises: a check that passes lets the test fail loudly."""

    def boom(*args, **kwargs):
        raise AssertionError("a model was loaded before the config was checked")

    import transformers

    # import every module that binds a loader first: one imported while the loaders are patched
    # would keep the stand-in after the test
    for mod in ("ppo", "sft", "dpo", "reward_model", "demo_data"):
        importlib.import_module(f"rlhfstack.stages.{mod}")
    for name, module in list(sys.modules.items()):
        if name.startswith("rlhfstack") and hasattr(module, "load_causal_lm"):
            monkeypatch.setattr(module, "load_causal_lm", boom)
    for name in ("AutoModelForCausalLM", "AutoModel", "AutoTokenizer"):
        monkeypatch.setattr(getattr(transformers, name), "from_pretrained", boom)


def _ppo(art: Path, *overrides: str):
    return to_object(load_config("ppo", ["+experiment=demo", f"artifacts_dir={art}", *overrides]))


def test_complete_inputs_pass(tmp_path):
    _demo_inputs(tmp_path)
    check_paths(_ppo(tmp_path))


def test_wrong_reward_model_path_fails_before_any_model_loads(tmp_path, no_model_loads):
    from rlhfstack.stages import ppo

    _demo_inputs(tmp_path)
    bad = tmp_path / "nowhere" / "rm"
    cfg = _ppo(tmp_path, f"reward_model_path={bad}")
    with pytest.raises(FileNotFoundError) as err:
        ppo.train(cfg)
    msg = str(err.value)
    assert f"reward_model_path={str(bad)!r}" in msg and "reward_config.json" in msg
    assert not Path(cfg.run_dir).exists()  # nothing created for a run that cannot start


def test_a_directory_that_is_not_a_reward_model_is_named(tmp_path):
    _demo_inputs(tmp_path)
    cfg = _ppo(tmp_path, f"reward_model_path={tmp_path / 'sft' / 'model'}")
    with pytest.raises(FileNotFoundError, match="holds none of reward_config.json, ensemble.json"):
        check_paths(cfg)


def test_nonexistent_model_path_is_one_clear_line_not_a_hub_error(tmp_path, no_model_loads):
    from rlhfstack.stages import sft

    cfg = to_object(
        load_config(
            "sft", ["+experiment=demo", f"artifacts_dir={tmp_path}", "model.path=/nonexistent"]
        )
    )
    with pytest.raises(FileNotFoundError) as err:
        sft.train(cfg)
    msg = str(err.value)
    assert "model.path='/nonexistent': expected an HF model directory" in msg
    assert "does not exist" in msg and "Repo id" not in msg
    # every missing input at once: the demo's data files are not there either
    assert "data.train_path=" in msg and "data.eval_path=" in msg
    assert not Path(cfg.run_dir).exists()


@pytest.mark.parametrize(
    "path", ["HuggingFaceTB/SmolLM-135M", "meta-llama/Meta-Llama-3-8B", "pkg:rlhf-demo-models/base"]
)
def test_hub_ids_and_package_names_stay_allowed(tmp_path, monkeypatch, path):
    monkeypatch.chdir(tmp_path)
    _demo_inputs(tmp_path)
    check_paths(_ppo(tmp_path, f"model.path={path}"))


@pytest.mark.parametrize("path", ["./models/x", "../x/y", "~/no/such/model", "runs/demo/sft/model"])
def test_local_looking_model_paths_must_exist(tmp_path, monkeypatch, path):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs").mkdir()  # ``runs/...`` exists in part: a local path, not a hub id
    _demo_inputs(tmp_path)
    with pytest.raises(FileNotFoundError, match=r"model\.path="):
        check_paths(_ppo(tmp_path, f"model.path='{path}'"))


def test_reference_and_lora_adapter_directories(tmp_path):
    _demo_inputs(tmp_path)
    _model_dir(tmp_path / "adapter", "adapter_config.json")
    check_paths(_ppo(tmp_path, f"ref_path={tmp_path / 'adapter'}"))
    with pytest.raises(FileNotFoundError, match=r"ref_path='/"):
        check_paths(_ppo(tmp_path, f"ref_path={tmp_path / 'missing_ref'}"))


def test_data_paths_resolve_against_data_root_as_the_loader_does(tmp_path):
    _demo_inputs(tmp_path)
    root = tmp_path / "root"
    (root / "prefs").mkdir(parents=True)
    (root / "prefs" / "a.jsonl").write_text(json.dumps({"prompt": "p"}) + "\n")
    ok = ["data.train_path=prefs/a.jsonl", "data.eval_path=hf://org/name:test", f"data_root={root}"]
    check_paths(_ppo(tmp_path, *ok))
    with pytest.raises(FileNotFoundError) as err:
        check_paths(_ppo(tmp_path, "data.train_path=prefs/b.jsonl", f"data_root={root}"))
    assert f"expected a data file at {root / 'prefs' / 'b.jsonl'}" in str(err.value)


def test_the_pipeline_composes_later_stages_before_their_inputs_exist(tmp_path):
    # composing (to_object) never looks at paths: PPO's inputs are written by earlier stages
    cfg = _ppo(tmp_path / "not_yet")
    assert cfg.reward_model_path.endswith("not_yet/rm/model")


def test_named_llm_judges_are_checked_after_their_merge():
    from rlhfstack.evaluation.jobs.winrate import _llm_config

    cfg = to_object(
        load_config("winrate", ["a=x.jsonl", "b=y.jsonl", "+llm_judges.local.concurrency=0"])
    )
    with pytest.raises(ValueError, match=r"llm_judges\.local\.concurrency=0: allowed >= 1"):
        _llm_config(cfg, "local")


def test_ppo_choice_fields_match_the_code_registries():
    """The schema lists the names the code accepts (configs import nothing else of the library,
    so the lists live twice): every registered name composes, and nothing else does."""
    from rlhfstack.losses import ADVANTAGE_ESTIMATORS, ROLLOUT_IS_MODES
    from rlhfstack.models.value import VALUE_MODELS
    from rlhfstack.rewards import INPUT_PATHS

    for key, names in (
        ("ppo.advantage_estimator", ADVANTAGE_ESTIMATORS),
        ("ppo.value_model", VALUE_MODELS),
        ("reward_input", INPUT_PATHS),
        ("ppo.rollout_is", ROLLOUT_IS_MODES),
    ):
        for name in names:
            extra = ["rollout.samples_per_prompt=2"] if key.endswith("estimator") else []
            to_object(load_config("ppo", [f"{key}={name}", *extra]))
        with pytest.raises(ValueError, match=key.split(".")[-1]):
            to_object(load_config("ppo", [f"{key}=no_such_name"]))
