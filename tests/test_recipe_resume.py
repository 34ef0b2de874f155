"""Resume knows its recipe, and reads no pickle.

A run directory records its recipe (the settings that define the math, ``configs.recipe_of``)
in ``recipe.json`` and in each checkpoint. Rerunning it under another recipe stops before any
model loads and before ``config.yaml`` is rewritten, listing the keys that differ, unless
``resume=force`` (resume anyway, recorded) or ``overwrite=true`` (start over). Checkpoint state
is JSON + safetensors; a pickle planted in a run directory is refused, never executed.
"""

from __future__ import annotations

import json
import pickle
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

import pytest
import torch

from rlhfstack import distributed
from rlhfstack.configs import RECIPE_EXCLUDE, load_config, recipe_hash, recipe_of, to_object
from rlhfstack.configs.common import _flatten
from rlhfstack.training import RecipeMismatch, prepare_run_dir

REPO = Path(__file__).resolve().parent.parent


# ----------------------------------------------------------------------------- the recipe


def test_recipe_keeps_the_math_and_leaves_out_paths_logging_and_runtime_knobs():
    base = to_object(load_config("ppo", ["run_dir=/a", "artifacts_dir=/arts"]))
    moved = to_object(
        load_config(
            "ppo",
            [
                "run_dir=/b",
                "artifacts_dir=/arts",  # model paths resolve from it: kept equal
                "logging.tensorboard=false",
                "trainer.save_every=5",
                "trainer.log_every=3",
                "trainer.micro_batch_size=4",
                "cluster.num_threads=2",
                "parallel.dp_shard=2",
                "gold_eval_every=7",
                "rollout.packed_weights=false",
                "resume=force",
            ],
        )
    )
    assert recipe_of(base) == recipe_of(moved)
    assert recipe_hash(recipe_of(base)) == recipe_hash(recipe_of(moved))
    r = recipe_of(base)
    for key in (
        "seed",
        "trainer.lr",
        "trainer.max_steps",
        "model.path",
        "ppo.clip_eps",
        "kl.target",
    ):
        assert key in r
    for key in ("trainer.lr=0.5", "seed=3", "ppo.clip_eps=0.1", "data.train_path=x.jsonl"):
        changed = to_object(load_config("ppo", ["run_dir=/a", "artifacts_dir=/arts", key]))
        assert recipe_hash(recipe_of(changed)) != recipe_hash(r), key


def test_every_excluded_key_names_a_field_of_some_stage():
    # a renamed field must not leave a stale exclusion behind (it would then count as math)
    keys: set[str] = set()
    for stage in ("sft", "rm", "dpo", "ppo", "cai_sl", "ai_labels"):
        keys |= set(_flatten(asdict(to_object(load_config(stage, ["run_dir=/x"])))))
    for ex in RECIPE_EXCLUDE:
        assert any(k == ex or k.startswith(ex + ".") for k in keys), ex


# ----------------------------------------------------------------------------- resume


def _sft(env: dict, arts: Path, run_dir: Path, *extra: str) -> str:
    cmd = [
        sys.executable,
        "recipes/train_sft.py",
        *_overrides(arts, run_dir),
        *extra,
    ]
    p = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, (p.stdout + p.stderr)[-4000:]
    return p.stdout + p.stderr


def _overrides(arts: Path, run_dir: Path) -> list[str]:
    return [
        "+experiment=demo",
        f"artifacts_dir={arts}",
        f"run_dir={run_dir}",
        "trainer.eval_every=0",
        "logging.tensorboard=false",
        "logging.plots=false",
        "cluster.num_threads=1",
        "trainer.max_steps=3",
        "trainer.save_every=2",
    ]


def _rows(run_dir: Path) -> list[dict]:
    return [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if x]


def test_a_changed_recipe_stops_before_any_model_loads_unless_forced_or_overwritten(
    arts, tmp_path, launch_env, monkeypatch
):
    import rlhfstack.stages.sft as sft

    run_dir = tmp_path / "run"
    _sft(launch_env, arts, run_dir)
    assert (run_dir / "ckpt-000002").is_dir() and (run_dir / "done.json").exists()
    # the recipe's log is the stage's own, every line tagged; Hydra leaves none of its own
    log_lines = (run_dir / "sft.log").read_text().splitlines()
    assert log_lines and all("][sft][" in x for x in log_lines)
    assert any("== sft done: 3 steps" in x for x in log_lines)
    assert not list(run_dir.glob("train_sft*.log"))
    recorded = json.loads((run_dir / "recipe.json").read_text())
    old_lr, old_seed = recorded["recipe"]["trainer.lr"], recorded["recipe"]["seed"]
    assert old_seed == 0 and old_lr != 0.01
    config_before = (run_dir / "config.yaml").read_text()
    metrics_before = (run_dir / "metrics.jsonl").read_text()

    def _no_model(*a, **k):
        raise AssertionError("a model was loaded before the recipe check")

    monkeypatch.setattr(sft, "load_policy", _no_model)
    monkeypatch.setattr(sft, "tokenizer_for", _no_model)
    changed = [*_overrides(arts, run_dir), "trainer.lr=0.01", "seed=5"]
    with pytest.raises(RecipeMismatch) as err:
        sft.train(to_object(load_config("sft", changed)))
    msg = str(err.value)
    assert f"trainer.lr: {old_lr!r} -> 0.01" in msg and "seed: 0 -> 5" in msg, msg
    assert "resume=force" in msg and "overwrite=true" in msg
    assert "trainer.max_steps" not in msg  # only the keys that differ
    assert (run_dir / "config.yaml").read_text() == config_before
    assert (run_dir / "metrics.jsonl").read_text() == metrics_before

    # the same recipe, or one that differs only in excluded keys, resumes
    same = [*_overrides(arts, run_dir), "trainer.log_every=2", "logging.plots=true"]
    assert prepare_run_dir(to_object(load_config("sft", same)), run_dir, True) == (True, {})

    # resume=force: resumes from step 2 under the new settings, recorded
    out = _sft(launch_env, arts, run_dir, "trainer.lr=0.01", "seed=5", "resume=force")
    assert "resume=force: resuming anyway" in out and "resumed from" in out, out[-3000:]
    assert "resume: force" in (run_dir / "config.yaml").read_text()
    forced = json.loads((run_dir / "recipe.json").read_text())["forced_resumes"]
    assert forced[-1]["changed"]["trainer.lr"] == [old_lr, 0.01]
    assert forced[-1]["changed"]["seed"] == [0, 5]
    assert [r["step"] for r in _rows(run_dir)] == [1, 2, 3]

    # overwrite=true: the old checkpoints and metrics are deleted and the run starts over; its
    # result equals a fresh run's in an empty directory
    out = _sft(launch_env, arts, run_dir, "trainer.lr=0.01", "seed=5", "overwrite=true")
    assert "overwrite=true: deleted" in out and "resumed from" not in out, out[-3000:]
    fresh = tmp_path / "fresh"
    _sft(launch_env, arts, fresh, "trainer.lr=0.01", "seed=5")
    strip = lambda r: {k: v for k, v in r.items() if k not in ("time", "wall_seconds")}  # noqa: E731
    assert [strip(r) for r in _rows(run_dir)] == [strip(r) for r in _rows(fresh)]
    rec = json.loads((run_dir / "recipe.json").read_text())
    assert rec["forced_resumes"] == [] and rec["recipe"]["trainer.lr"] == 0.01


def test_resume_value_is_checked():
    with pytest.raises(ValueError, match="resume='maybe'"):
        to_object(load_config("sft", ["run_dir=/nonexistent/x", "resume=maybe"]))


# ----------------------------------------------------------------------------- no pickle


class _Planted:
    """Unpickling this creates ``marker``: a stand-in for code planted in a run directory."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def _save_one(path: Path) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    model(torch.ones(1, 3)).sum().backward()
    opt.step()
    extra = {"step": 1, "rng": {"python": (3, (1, 2), None)}, "t": torch.arange(3)}
    distributed.save_checkpoint(path, model, opt, extra, rank_extra={"g": torch.ones(2)})
    return model, opt


def test_the_planted_pickle_would_run_when_unpickled(tmp_path):
    # the payload of the tests below is live: plain unpickling creates the marker
    marker = tmp_path / "ran"
    pickle.loads(pickle.dumps(_Planted(marker)))
    assert marker.exists()


def test_checkpoint_state_round_trips_without_pickle(tmp_path):
    path = tmp_path / "ckpt-000001"
    model, opt = _save_one(path)
    assert not list(path.glob("*.pt"))
    extra = distributed.load_checkpoint(path, model, opt)
    assert extra["step"] == 1 and extra["rng"]["python"] == (3, (1, 2), None)
    assert torch.equal(extra["t"], torch.arange(3))
    assert torch.equal(extra["rank_extra"]["g"], torch.ones(2))
    with pytest.raises(TypeError, match="not storable without pickle"):
        distributed.save_checkpoint(tmp_path / "ckpt-000002", model, opt, {"f": object()})


def test_a_pickled_extra_in_a_run_dir_is_refused_not_executed(tmp_path):
    run_dir, marker = tmp_path / "downloaded", tmp_path / "ran"
    ck = run_dir / "ckpt-000005"
    ck.mkdir(parents=True)
    torch.save({"step": 5, "payload": _Planted(marker)}, ck / "extra.pt")
    torch.save({"gen": _Planted(marker)}, ck / "rank-0.pt")
    (ck / ".metadata").write_bytes(pickle.dumps(_Planted(marker)))
    with pytest.raises(distributed.CheckpointFormatError, match="old pickled format"):
        distributed.latest_checkpoint(run_dir)
    cfg = to_object(load_config("sft", [f"run_dir={run_dir}"]))
    with pytest.raises(distributed.CheckpointFormatError, match="overwrite=true"):
        prepare_run_dir(cfg, run_dir, True)
    assert not marker.exists()


def test_planted_dcp_metadata_is_refused_not_executed(tmp_path):
    run_dir, marker = tmp_path / "downloaded", tmp_path / "ran"
    model, opt = _save_one(run_dir / "ckpt-000001")
    (run_dir / "ckpt-000001" / ".metadata").write_bytes(pickle.dumps(_Planted(marker)))
    ck = distributed.latest_checkpoint(run_dir)
    with pytest.raises(distributed.CheckpointFormatError, match="not a checkpoint metadata class"):
        distributed.load_checkpoint(ck, model, opt)
    with pytest.raises(distributed.CheckpointFormatError, match="not a checkpoint metadata class"):
        distributed.read_checkpoint_tensors(ck)
    assert not marker.exists()
