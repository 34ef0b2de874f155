"""Hydra sweeps and finished runs.

Under ``-m`` each job trains in its own directory, ``<run_dir>/<job.num>_<its overrides>``
(``hydra.sweep.subdir: ${sweep_subdir:}`` in the stage YAMLs). A run directory holding
``done.json`` is finished: rerunning the command says so in one line per run and exits 0 without
touching it; ``overwrite=true`` trains it again. The pipeline skips finished stages the same way.
"""

from __future__ import annotations

import json
import random
import subprocess
import sys
from pathlib import Path

import pytest

from rlhfstack import cli, pipeline
from rlhfstack.configs import load_config, recipe_of, to_object
from rlhfstack.training import RECIPE_FILE, RecipeMismatch

REPO = Path(__file__).resolve().parent.parent


def _prefs(path: Path, n: int = 16) -> Path:
    rng = random.Random(0)
    words = "the cat dog sun ran sat happy sad big small tree ball".split()
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as f:
        for _ in range(n):
            row = {
                "prompt": "Once upon a time " + " ".join(rng.choices(words, k=4)) + ".",
                "chosen": "The " + " ".join(rng.choices(words, k=5)) + ".",
                "rejected": "A " + " ".join(rng.choices(words, k=5)) + ".",
            }
            f.write(json.dumps(row) + "\n")
    return path


def _tiny_dpo(arts: Path, run_dir: Path) -> list[str]:
    """A DPO run of one step on 8 pairs (the demo experiment's settings otherwise)."""
    return [
        "+experiment=demo",
        f"artifacts_dir={arts}",
        f"run_dir={run_dir}",
        "trainer.max_steps=1",
        "trainer.batch_size=4",
        "trainer.micro_batch_size=4",
        "data.max_examples=8",
        "logging.tensorboard=false",
        "logging.plots=false",
        "cluster.num_threads=1",
    ]


@pytest.fixture
def arts(tmp_path, stories_hf) -> Path:
    """Artifacts of earlier stages as DPO reads them: ``sft/model`` and the preference file."""
    art = tmp_path / "arts"
    (art / "sft").mkdir(parents=True)
    (art / "sft" / "model").symlink_to(stories_hf, target_is_directory=True)
    _prefs(art / "data" / "prefs_train.jsonl")
    return art


def _files(run_dir: Path) -> dict[str, int]:
    """Every file under ``run_dir`` but Hydra's job log, with its modification time (ns)."""
    return {
        str(p.relative_to(run_dir)): p.stat().st_mtime_ns
        for p in run_dir.rglob("*")
        if p.is_file() and p.suffix != ".log"
    }


# ----------------------------------------------------------------------------- fast


def test_each_sweep_job_gets_its_own_run_dir_and_a_finished_sweep_is_not_rerun(
    tmp_path, monkeypatch, capsys
):
    ran: list[str] = []

    def fake_stage(cfg):  # stands in for the DPO stage: records its run_dir, marks it finished
        ran.append(cfg.run_dir)
        Path(cfg.run_dir).mkdir(parents=True, exist_ok=True)
        (Path(cfg.run_dir) / "done.json").write_text(json.dumps({"beta": cfg.dpo.beta}))

    monkeypatch.setattr(cli, "_target", lambda command: fake_stage)
    monkeypatch.setattr(sys, "argv", ["rlhf"])
    sweep = tmp_path / "sweep"
    argv = ["dpo", "-m", "dpo.beta=0.05,0.2", "+experiment=demo", f"run_dir={sweep}"]
    assert cli.main(argv) == 0
    assert [Path(r).name for r in ran] == [
        "0_+experiment=demo,dpo.beta=0.05",
        "1_+experiment=demo,dpo.beta=0.2",
    ]
    assert all(Path(r).parent == sweep for r in ran)
    betas = [json.loads((Path(r) / "done.json").read_text())["beta"] for r in ran]
    assert betas == [0.05, 0.2]

    capsys.readouterr()
    assert cli.main(argv) == 0  # the same command again: nothing runs, one line per job
    assert len(ran) == 2
    out = capsys.readouterr().out
    for r in ran:
        assert f"{r} holds a finished dpo run (done.json): nothing to do" in out

    assert cli.main([*argv, "overwrite=true"]) == 0  # overwrite=true: the same dirs, trained again
    assert ran[2:] == ran[:2]


def test_sweep_subdir_keeps_long_and_slashed_overrides_in_one_short_name(tmp_path, monkeypatch):
    ran: list[str] = []
    monkeypatch.setattr(cli, "_target", lambda command: lambda cfg: ran.append(cfg.run_dir))
    monkeypatch.setattr(sys, "argv", ["rlhf"])
    long_path = "/a/b/" + "x" * 300
    assert (
        cli.main(["dpo", "-m", "seed=1,2", f"dpo.ref_path={long_path}", f"run_dir={tmp_path}"]) == 0
    )
    names = [Path(r).name for r in ran]
    assert [Path(r).parent for r in ran] == [tmp_path, tmp_path]
    assert names[0].startswith("0_dpo.ref_path=_a_b_xxx") and names[1].startswith("1_")
    assert all(len(n) <= 160 for n in names) and names[0][2:] != names[1][2:]


def test_pipeline_skips_finished_stages_unless_overwrite(tmp_path, monkeypatch):
    started: list[str] = []
    monkeypatch.setattr(
        pipeline, "run_stage", lambda stage, scfg, command="": started.append(stage)
    )
    (tmp_path / "sft").mkdir()
    (tmp_path / "sft" / "done.json").write_text("{}")
    base = [f"artifacts_dir={tmp_path}", "jobs=1", "stages=[sft,dpo]"]
    pipeline.run_pipeline(to_object(load_config("pipeline", base)))
    assert started == ["dpo"]
    pipeline.run_pipeline(to_object(load_config("pipeline", [*base, "overwrite=true"])))
    assert started == ["dpo", "sft", "dpo"]
    forced = [*base, "common_overrides=['resume=force']"]  # go on from its checkpoint: asked too
    pipeline.run_pipeline(to_object(load_config("pipeline", forced)))
    assert started == ["dpo", "sft", "dpo", "sft", "dpo"]


def test_a_finished_stage_under_other_settings_stops_the_pipeline(tmp_path, monkeypatch):
    started: list[str] = []
    monkeypatch.setattr(
        pipeline, "run_stage", lambda stage, scfg, command="": started.append(stage)
    )
    base = [f"artifacts_dir={tmp_path}", "jobs=1", "stages=[sft,dpo]"]
    sft = to_object(load_config("sft", [f"artifacts_dir={tmp_path}"]))
    (tmp_path / "sft").mkdir()
    (tmp_path / "sft" / "done.json").write_text("{}")
    (tmp_path / "sft" / RECIPE_FILE).write_text(json.dumps({"recipe": recipe_of(sft)}))
    pipeline.run_pipeline(to_object(load_config("pipeline", base)))  # same settings: kept
    assert started == ["dpo"]
    changed = [*base, "+stage_overrides.sft=['trainer.lr=0.5']"]
    with pytest.raises(RecipeMismatch, match=r"trainer.lr: .* -> 0.5"):
        pipeline.run_pipeline(to_object(load_config("pipeline", changed)))
    assert started == ["dpo"]  # nothing ran


def test_rerunning_a_finished_run_exits_0_and_touches_nothing(tmp_path, arts):
    run_dir = tmp_path / "dpo"
    run_dir.mkdir()
    (run_dir / "done.json").write_text('{"stage": "dpo"}')
    (run_dir / "model").mkdir()
    before = _files(run_dir)
    p = subprocess.run(
        [sys.executable, "recipes/train_dpo.py", *_tiny_dpo(arts, run_dir)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert p.returncode == 0, p.stderr[-3000:]
    lines = [x for x in p.stdout.splitlines() if "finished" in x]
    assert lines == [
        f"{run_dir} holds a finished dpo run (done.json): nothing to do (overwrite=true trains "
        "it again)"
    ]
    assert _files(run_dir) == before


# ----------------------------------------------------------------------------- slow


@pytest.mark.slow
def test_readme_dpo_sweep_trains_two_runs_and_a_rerun_keeps_them(tmp_path, arts):
    """``recipes/train_dpo.py -m dpo.beta=0.05,0.2 +experiment=demo`` (README), at tiny sizes."""
    sweep = tmp_path / "sweep"
    cmd = [
        sys.executable,
        "recipes/train_dpo.py",
        "-m",
        "dpo.beta=0.05,0.2",
        *_tiny_dpo(arts, sweep),
    ]
    p = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-4000:]
    runs = sorted(d for d in sweep.iterdir() if d.is_dir())
    assert [d.name.split(",dpo.beta=")[1].split(",")[0] for d in runs] == ["0.05", "0.2"]
    for d in runs:
        assert (d / "done.json").exists() and (d / "model" / "config.json").exists()
        assert (
            f"beta: {d.name.split('dpo.beta=')[1].split(',')[0]}" in (d / "config.yaml").read_text()
        )
    before = {d: _files(d) for d in runs}
    p = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-4000:]
    assert sum("holds a finished dpo run" in x for x in p.stdout.splitlines()) == 2
    assert {d: _files(d) for d in runs} == before
