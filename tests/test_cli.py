"""The installable package and the ``rlhf`` command (rlhfstack/cli.py).

The wheel ships ``conf/`` as ``rlhfstack/conf``; ``CONF_DIR`` finds that copy when installed and
the checkout's ``conf/`` otherwise. ``rlhf list`` and ``--help`` read the experiments' headers and
the schemas' field docstrings. A bad config stops before Hydra creates anything: a value outside a
field's choices, an experiment of another stage, a missing input model.
"""

from __future__ import annotations

import dataclasses
import shutil
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest

from rlhfstack import cli
from rlhfstack.configs import CONF_DIR, load_config, to_object
from rlhfstack.configs.common import find_conf_dir

REPO = Path(__file__).resolve().parent.parent
STAGES = {"sft", "rm", "ppo", "dpo", "pipeline", "any"}


# ----------------------------------------------------------------------------- packaging


def test_conf_dir_is_the_packaged_copy_when_installed_else_the_checkouts(tmp_path):
    assert CONF_DIR == REPO / "conf"  # this checkout: no rlhfstack/conf beside the package
    site = tmp_path / "site-packages"
    (site / "rlhfstack" / "conf").mkdir(parents=True)
    assert find_conf_dir(site / "rlhfstack", site) == site / "rlhfstack" / "conf"
    checkout = tmp_path / "repo"
    (checkout / "rlhfstack").mkdir(parents=True)
    assert find_conf_dir(checkout / "rlhfstack", checkout) == checkout / "conf"


def test_pyproject_lists_every_package_and_conf_folder():
    cfg = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed = set(cfg["packages"])
    code = {
        ".".join(p.parent.relative_to(REPO).parts)
        for p in (REPO / "rlhfstack").rglob("__init__.py")
    }
    conf = {"rlhfstack.conf"} | {
        "rlhfstack.conf." + ".".join(p.relative_to(CONF_DIR).parts)
        for p in CONF_DIR.rglob("*")
        if p.is_dir()
    }
    assert listed == code | conf
    assert cfg["package-dir"] == {"rlhfstack.conf": "conf"}
    scripts = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts == {"rlhf": "rlhfstack.cli:main"}


def test_wheel_ships_the_config_tree(tmp_path):
    # built from a copy: an in-tree build reuses build/lib, which may hold files of older trees
    src = tmp_path / "src"
    skip = shutil.ignore_patterns(".git", "build", "runs", ".venv*", "*.egg-info", "__pycache__")
    shutil.copytree(REPO, src, ignore=skip)
    p = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q"]
        + ["-w", str(tmp_path), str(src)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert p.returncode == 0, p.stderr[-3000:]
    (wheel,) = tmp_path.glob("rlhfstack-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    expected = {"rlhfstack/conf/" + str(p.relative_to(CONF_DIR)) for p in CONF_DIR.rglob("*.yaml")}
    assert "rlhfstack/conf/experiment/demo_smoke.yaml" in expected
    assert "rlhfstack/conf/hydra/launcher/slurm.yaml" in expected
    assert expected <= names, sorted(expected - names)
    assert "rlhfstack/cli.py" in names
    entry = next(n for n in names if n.endswith("entry_points.txt"))
    assert "rlhf = rlhfstack.cli:main" in zipfile.ZipFile(wheel).read(entry).decode()


# ----------------------------------------------------------------------------- list and help


def test_every_experiment_declares_its_stage_and_composes_with_it():
    exps = cli.experiments()
    assert {e.name for e in exps} == {p.stem for p in (CONF_DIR / "experiment").glob("*.yaml")}
    for e in exps:
        assert e.stage in STAGES, (e.name, e.stage)
        assert e.about and len(e.about) <= 104, e.name
        if e.stage in ("sft", "rm", "ppo", "dpo", "pipeline"):
            load_config(
                e.stage, [f"+experiment={e.name}", "run_dir=/tmp/x"][: 1 + (e.stage != "pipeline")]
            )


def test_list_shows_each_experiment_with_stage_and_description(capsys):
    assert cli.main(["list"]) == 0
    out = capsys.readouterr().out
    rows = {line.split()[0]: line.split()[1] for line in out.splitlines()[1:] if line.strip()}
    assert rows["demo_smoke"] == "pipeline"
    assert rows["rm_hh"] == "rm"
    assert rows["llama3_8b_dpo"] == "dpo"
    assert "The embedded default: stories260K on CPU" in out


def test_main_help_names_every_command(capsys):
    assert cli.main(["--help"]) == 0
    out = capsys.readouterr().out
    for name in ("data", "sft", "rm", "ppo", "dpo", "pipeline", "winrate", "rm-eval", "mmlu"):
        assert f"\n  {name} " in out, name
    for name in ("list", "export"):
        assert f"\n  {name} " in out, name


def test_stage_help_shows_field_docs_and_hides_schema_names(capsys):
    assert cli.main(["ppo", "--help"]) == 0
    out = capsys.readouterr().out
    assert "_schema" not in out
    assert "trainer.max_steps = " in out
    assert "Optimizer steps (PPO: rollout + update iterations)." in out
    assert "[one of gae | grpo | rloo]" in out  # a choice field shows its values
    assert "+experiment=demo | llama3_8b_ppo_lora" in out  # only experiments of this stage
    assert "rm_hh" not in out.split("fields (")[0]


def test_export_help(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["export", "--help"])
    assert e.value.code == 0
    assert "--lora-adapter" in capsys.readouterr().out


# ----------------------------------------------------------------------------- prechecks


def _fails(capsys, argv: list[str]) -> str:
    with pytest.raises(SystemExit) as e:
        cli.main(argv)
    assert e.value.code == cli.EXIT_USAGE
    return capsys.readouterr().err


def test_a_bad_choice_fails_when_composed_before_anything_is_written(tmp_path, capsys):
    run_dir = tmp_path / "ppo"
    err = _fails(
        capsys,
        ["ppo", "+experiment=demo", "ppo.advantage_estimator=grpoo", f"run_dir={run_dir}"],
    )
    assert "ppo.advantage_estimator='grpoo': allowed one of gae | grpo | rloo" in err
    assert not run_dir.exists()


def test_an_experiment_of_another_stage_names_its_stage_and_the_command(tmp_path, capsys):
    err = _fails(capsys, ["ppo", "+experiment=rm_hh", f"run_dir={tmp_path / 'x'}"])
    assert "experiment 'rm_hh' is meant for the rm stage, not ppo" in err
    assert "rlhf rm +experiment=rm_hh" in err and "recipes/train_rm.py" in err
    assert "not in 'PPOConfig'" not in err
    err = _fails(capsys, ["sft", "+experiment=demo_smoke"])
    assert "meant for the pipeline stage" in err and "rlhf pipeline +experiment=demo_smoke" in err
    err = _fails(capsys, ["dpo", "+experiment=no_such_thing"])
    assert "experiment 'no_such_thing' does not exist" in err


def test_a_missing_model_path_fails_before_run_dir_exists(tmp_path, capsys):
    run_dir = tmp_path / "out" / "sft"
    missing = tmp_path / "nothing" / "base_model"
    err = _fails(
        capsys,
        ["sft", "+experiment=demo", f"model.path={missing}", f"run_dir={run_dir}"],
    )
    assert f"model.path='{missing}': expected an HF model directory" in err
    assert not run_dir.exists() and not (tmp_path / "out").exists()


def test_the_recipe_entry_point_runs_the_same_precheck(tmp_path):
    run_dir = tmp_path / "ppo"
    p = subprocess.run(
        [sys.executable, "recipes/train_ppo.py", "+experiment=rm_hh", f"run_dir={run_dir}"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert p.returncode == cli.EXIT_USAGE, p.stderr[-2000:]
    assert "train_ppo.py: error: experiment 'rm_hh' is meant for the rm stage" in p.stderr
    assert "Traceback" not in p.stderr
    assert not run_dir.exists()


def test_pipeline_takes_run_dir_as_its_artifacts_dir_and_generate_takes_model():
    assert cli._alias("pipeline", "run_dir=/x") == "artifacts_dir=/x"
    assert cli._alias("generate", "model=http://h:8000/v1") == "model_path=http://h:8000/v1"
    assert cli._alias("ppo", "run_dir=/x") == "run_dir=/x"
    assert cli._alias("pipeline", "+experiment=demo") == "+experiment=demo"


# ----------------------------------------------------------------------------- endpoints


def test_judge_and_generation_spell_an_endpoint_the_same_way():
    from rlhfstack.configs import EndpointConfig, GenerationConfig, LLMJudgeConfig

    names = {f.name for f in dataclasses.fields(EndpointConfig)}
    assert names == {"base_url", "model", "api_key_env"}
    for block in (LLMJudgeConfig, GenerationConfig):
        assert issubclass(block, EndpointConfig)
    gen = to_object(
        load_config(
            "generate_samples",
            ["generation.base_url=http://h:8000/v1", "generation.model=m", "prompts=p", "output=o"],
        )
    )
    assert (gen.generation.base_url, gen.generation.model) == ("http://h:8000/v1", "m")
    judge = to_object(load_config("winrate", ["a=x", "b=y", "llm.base_url=http://h:8000/v1"]))
    assert (judge.llm.base_url, judge.llm.model) == ("http://h:8000/v1", "gpt-4o")


def test_old_endpoint_spellings_fail_naming_the_new_one(capsys):
    err = _fails(capsys, ["generate", "generation.api_model=m", "prompts=p", "output=o"])
    assert "generation.api_model is now spelled generation.model" in err
    err = _fails(capsys, ["generate", "model=http://h:8000/v1", "prompts=p", "output=o"])
    assert "generation.base_url=http://h:8000/v1 generation.model=NAME" in err


def test_recipe_help_is_the_commands_help(tmp_path):
    p = subprocess.run(
        [sys.executable, "recipes/train_dpo.py", "--help"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert p.returncode == 0, p.stderr[-2000:]
    assert "dpo.beta = 0.1" in p.stdout and "_schema" not in p.stdout
