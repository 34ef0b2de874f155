"""The demo's data stage: three disjoint prompt sets (train, dev for PPO's gold evaluation and any
tuning, test for the report only), wired into the stage configs; the gold margin the simulated
labels carry never reaches training."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from rlhfstack.configs import load_config, to_object
from rlhfstack.runtime import read_jsonl

DATA_OVERRIDES = [
    "n_prompts=300",
    "n_dev=64",
    "n_test=48",
    "n_pref_prompts=24",
    "max_new_tokens=8",
    "cluster.num_threads=1",
]


@pytest.fixture(scope="module")
def demo_data(tmp_path_factory, data_root) -> Path:
    """The data stage at small sizes; returns ``artifacts_dir``."""
    from rlhfstack.stages.demo_data import train

    art = tmp_path_factory.mktemp("demo_data") / "art"
    train(to_object(load_config("demo_data", [f"artifacts_dir={art}", *DATA_OVERRIDES])))
    return art


def _prompts(path: Path) -> list[str]:
    return [r["prompt"] for r in read_jsonl(path)]


def test_train_dev_test_are_disjoint_and_train_is_unchanged(demo_data):
    from rlhfstack.tasks.stories import make_story_prompts, split_prompts

    d = demo_data / "data"
    train, dev, test = (_prompts(d / f"prompts_{s}.jsonl") for s in ("train", "dev", "test"))
    assert (len(train), len(dev), len(test)) == (300 - 64, 64, 48)
    sets = [set(train), set(dev), set(test)]
    assert [len(s) for s in sets] == [len(train), len(dev), len(test)]  # no repeats inside
    assert not sets[0] & sets[1] and not sets[0] & sets[2] and not sets[1] & sets[2]
    # train and dev are the split of the first n_prompts made before the test split existed
    old_train, old_dev = split_prompts(make_story_prompts(300, seed=0), 64, seed=0)
    assert train == old_train and dev == old_dev
    # the alignment-tax text is on the test prompts (report only)
    assert _prompts(d / "heldout_text.jsonl") == test
    # no labeled pair, SFT target or base sample is on a dev or test prompt
    for name in ("prefs_train", "prefs_val", "sft_train", "sft_val"):
        assert not set(_prompts(d / f"{name}.jsonl")) & (sets[1] | sets[2]), name


def test_demo_configs_point_ppo_at_dev_and_the_report_at_test(demo_data):
    """PPO's periodic gold evaluation (``data.eval_path``) reads dev; the eval stage's metrics and
    targets read test, its ``winrate_dev`` the same dev file PPO read."""
    from rlhfstack.pipeline import stage_overrides

    d = demo_data / "data"
    pipe = to_object(load_config("pipeline", ["+experiment=demo", f"artifacts_dir={demo_data}"]))
    ppo = to_object(load_config("ppo", stage_overrides(pipe, "ppo")))
    ev = to_object(load_config("evaluate", stage_overrides(pipe, "eval")))
    assert Path(ppo.data.eval_path) == d / "prompts_dev.jsonl"
    assert Path(ppo.data.train_path) == d / "prompts_train.jsonl"
    assert Path(ev.test_prompts_path) == d / "prompts_test.jsonl"
    assert ev.dev_prompts_path == ppo.data.eval_path
    assert not set(_prompts(Path(ppo.data.eval_path))) & set(_prompts(Path(ev.test_prompts_path)))


def test_rm_use_margin_is_not_a_setting():
    """The BT margin is not wired to any data (the demo's only margin is the hidden gold one)."""
    with pytest.raises(Exception, match="use_margin"):
        to_object(load_config("rm", ["rm.use_margin=true"]))


def test_loaded_pairs_do_not_carry_the_gold_margin(demo_data, tmp_path):
    from rlhfstack.data.loading import load_preferences

    src = demo_data / "data" / "prefs_train.jsonl"
    rows = read_jsonl(src)
    assert rows and all("gold_margin" in r for r in rows)  # the file does carry it
    other = tmp_path / "prefs_other_margin.jsonl"
    other.write_text(
        "".join(
            json.dumps({**r, "gold_margin": -100.0 * r["gold_margin"] + 7}) + "\n" for r in rows
        )
    )
    kw = dict(adapter="plain", template="plain")
    a, _ = load_preferences(src, **kw)
    b, _ = load_preferences(other, **kw)
    assert a == b and len(a) == len(rows)
    assert all(not hasattr(ex, "gold_margin") and not hasattr(ex, "margin") for ex in a)


def test_rm_training_is_unchanged_when_gold_margin_changes(demo_data, tmp_path):
    """Two RM runs on files that differ only in ``gold_margin``: the same losses, the same head."""
    from safetensors.torch import load_file

    from rlhfstack.stages.reward_model import train

    rows = read_jsonl(demo_data / "data" / "prefs_train.jsonl")
    files = {
        "as_written": demo_data / "data" / "prefs_train.jsonl",
        "changed": tmp_path / "prefs_changed.jsonl",
    }
    files["changed"].write_text(
        "".join(
            json.dumps({**r, "gold_margin": 50.0 - 3.0 * r["gold_margin"]}) + "\n" for r in rows
        )
    )
    out = {}
    for name, path in files.items():
        cfg = to_object(
            load_config(
                "rm",
                [
                    f"artifacts_dir={demo_data}",
                    f"run_dir={tmp_path / name}",
                    f"model.path={demo_data / 'base_model'}",
                    f"data.train_path={path}",
                    "trainer.max_steps=3",
                    "trainer.batch_size=8",
                    "trainer.micro_batch_size=8",
                    "rm.normalize=false",
                    "rm.probes=false",
                    "logging.tensorboard=false",
                    "logging.plots=false",
                    "cluster.num_threads=1",
                ],
            )
        )
        run_dir = train(cfg)
        losses = [r["loss"] for r in read_jsonl(run_dir / "metrics.jsonl") if "loss" in r]
        out[name] = (losses, load_file(str(run_dir / "model" / "reward_head.safetensors")))
    (la, ha), (lb, hb) = out["as_written"], out["changed"]
    assert len(la) == 3 and la == lb
    assert ha.keys() == hb.keys() and all(torch.equal(ha[k], hb[k]) for k in ha)
