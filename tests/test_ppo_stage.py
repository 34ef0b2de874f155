"""PPO stage on the smoke artifacts: LoRA reference = adapter off, checkpoints and resume."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from rlhfstack.configs import load_config, to_object
from rlhfstack.runtime import read_jsonl

REPO = Path(__file__).resolve().parent.parent
SMALL = [
    "trainer.batch_size=8",
    "trainer.micro_batch_size=4",
    "ppo.num_minibatches=2",
    "ppo.epochs=1",
    "rollout.max_new_tokens=8",
    "gold_eval_every=0",
    "ppo.value_model=shared",  # the demo's default is a separate critic (the smoke pipeline runs it)
]


def _cfg(smoke: Path, run_dir: Path, extra: list[str]):
    return to_object(
        load_config("ppo", [f"artifacts_dir={smoke}", f"run_dir={run_dir}", *SMALL, *extra])
    )


def test_lora_policy_uses_adapter_disabled_reference(smoke, tmp_path):
    from rlhfstack.stages.ppo import train

    cfg = _cfg(
        smoke,
        tmp_path / "ppo_lora",
        ["trainer.max_steps=2", "model.lora.enabled=true", "model.lora.r=4"],
    )
    run_dir = train(cfg)
    rows = read_jsonl(run_dir / "metrics.jsonl")
    # LoRA B=0 at init: policy == reference (the old log-probs come from the rollout's KV-cache
    # passes, the reference's from a full forward: equal up to float rounding)
    assert rows[0]["kl/seq_k1"] == pytest.approx(0.0, abs=1e-5)
    assert rows[0]["first_minibatch_ratio"] == pytest.approx(1.0, abs=1e-6)
    assert (run_dir / "model" / "config.json").exists()  # adapter merged into one HF dir


def test_bad_sampling_config_is_rejected(smoke, tmp_path):
    from rlhfstack.stages.ppo import train

    with pytest.raises(ValueError, match="top_k"):
        train(_cfg(smoke, tmp_path / "x", ["rollout.top_k=50"]))


@pytest.mark.parametrize("estimator", ["grpo", "rloo"])
def test_critic_free_estimators_train_the_policy_alone(smoke, tmp_path, estimator):
    from rlhfstack.stages.ppo import train

    # 8 responses = 2 prompts x 4 samples; generate() refuses rows that are not groups of 4
    # identical prompts, so the groups the advantages are computed over are the sampled ones
    cfg = _cfg(
        smoke,
        tmp_path / estimator,
        [
            "trainer.max_steps=2",
            f"ppo.advantage_estimator={estimator}",
            "rollout.samples_per_prompt=4",
        ],
    )
    run_dir = train(cfg)
    rows = read_jsonl(run_dir / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2]
    for r in rows:
        assert r["first_minibatch_ratio"] == pytest.approx(1.0, abs=1e-5)
        assert r["first_minibatch_approx_kl"] == pytest.approx(0.0, abs=1e-6)
        assert r["advantages/abs_mean"] > 0
        assert "loss/value" not in r and "values/explained_variance" not in r
    assert not (run_dir / "value_model.safetensors").exists()  # no value model was trained
    assert (run_dir / "model" / "config.json").exists()


def test_uncertainty_penalized_reward_from_an_ensemble(smoke, tmp_path):
    import torch

    from rlhfstack.models.core import RewardEnsemble, RewardModel
    from rlhfstack.stages.ppo import train

    # a two-member ensemble: the smoke RM and a copy with a perturbed head
    other = RewardModel.load(smoke / "rm" / "model")
    with torch.no_grad():
        other.head.linear.weight.add_(0.5 * torch.randn_like(other.head.linear.weight))
    other.save(tmp_path / "member2")
    RewardEnsemble.write_spec(tmp_path / "ens", [smoke / "rm" / "model", tmp_path / "member2"])
    coef = 0.7
    no_shaping = ["ppo.missing_eos_penalty=0", "ppo.reward_clip=0", "trainer.max_steps=1"]
    no_shaping.append("ppo.value_model=separate")  # the critic starts from the first member
    cfg = _cfg(
        smoke,
        tmp_path / "run",
        [
            f"reward_model_path={tmp_path / 'ens'}",
            f"ppo.reward_uncertainty_coef={coef}",
            *no_shaping,
        ],
    )
    (row,) = read_jsonl(train(cfg) / "metrics.jsonl")
    assert row["reward/rm_score_std"] > 0
    # per response: score = mean - coef * std; the batch means obey the same identity
    assert row["reward/shaped_score"] == pytest.approx(
        row["reward/rm_score"] - coef * row["reward/rm_score_std"], rel=1e-5, abs=1e-6
    )
    # one head: there is no spread to penalize
    with pytest.raises(ValueError, match="ensemble_size"):
        train(_cfg(smoke, tmp_path / "x", ["ppo.reward_uncertainty_coef=1.0"]))


@pytest.mark.parametrize(
    ("extra", "match"),
    [
        (["ppo.advantage_estimator=a2c"], "advantage_estimator"),
        (["ppo.advantage_estimator=grpo"], "samples_per_prompt must be >= 2"),
        (["rollout.samples_per_prompt=3"], "divide trainer.batch_size"),
    ],
)
def test_bad_estimator_config_is_rejected(smoke, tmp_path, extra, match):
    from rlhfstack.stages.ppo import train

    with pytest.raises(ValueError, match=match):
        train(_cfg(smoke, tmp_path / "x", extra))


def _run(smoke: Path, run_dir: Path, steps: int, save_every: int) -> subprocess.Popen:
    cmd = [
        sys.executable,
        str(REPO / "recipes" / "train_ppo.py"),
        f"artifacts_dir={smoke}",
        f"run_dir={run_dir}",
        f"trainer.max_steps={steps}",
        f"trainer.save_every={save_every}",
        *SMALL,
        "logging.tensorboard=false",
        "logging.plots=false",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(
        cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )


def _strip(row: dict) -> dict:
    return {k: v for k, v in row.items() if k not in ("time", "wall_seconds")}


@pytest.mark.slow
def test_sigkill_then_resume_matches_uninterrupted_run(smoke, tmp_path):
    ref_dir, cut_dir = tmp_path / "ref", tmp_path / "cut"
    p = _run(smoke, ref_dir, 12, 3)
    assert p.wait(timeout=600) == 0, p.stderr.read().decode()[-2000:]
    p = _run(smoke, cut_dir, 12, 3)
    deadline = time.time() + 300
    while not list(cut_dir.glob("ckpt-*/extra.json")) and time.time() < deadline:
        time.sleep(0.2)
    time.sleep(1.0)
    p.send_signal(signal.SIGKILL)
    p.wait()
    assert list(cut_dir.glob("ckpt-*")), "no checkpoint before the kill"
    p = _run(smoke, cut_dir, 12, 3)
    assert p.wait(timeout=600) == 0, p.stderr.read().decode()[-2000:]
    a = read_jsonl(ref_dir / "metrics.jsonl")
    b = read_jsonl(cut_dir / "metrics.jsonl")
    assert [r["step"] for r in b] == list(range(1, 13))
    assert _strip(a[-1]) == _strip(b[-1])


@pytest.mark.slow
def test_sigterm_saves_checkpoint_and_exits_cleanly(smoke, tmp_path):
    run_dir = tmp_path / "term"
    p = _run(smoke, run_dir, 200, 0)
    deadline = time.time() + 300
    while not (run_dir / "metrics.jsonl").exists() and time.time() < deadline:
        time.sleep(0.2)
    p.send_signal(signal.SIGTERM)
    assert p.wait(timeout=120) == 0
    assert list(run_dir.glob("ckpt-*/extra.json"))


def test_full_kl_loss_term_is_zero_while_policy_equals_reference(smoke, tmp_path):
    from rlhfstack.stages.ppo import train

    cfg = _cfg(
        smoke,
        tmp_path / "klloss",
        ["trainer.max_steps=2", "ppo.kl_loss_coef=0.1", "ppo.num_minibatches=1"],
    )
    rows = read_jsonl(train(cfg) / "metrics.jsonl")
    # step 1's only minibatch sees the untouched policy (== the frozen SFT reference)
    assert rows[0]["kl/full_in_loss"] == pytest.approx(0.0, abs=1e-6)
    assert rows[1]["kl/full_in_loss"] > 0.0  # after one update it has moved


def test_prompts_longer_than_the_cap_are_counted_once_and_recorded(smoke, tmp_path, caplog):
    """PPO keeps over-long prompts (cut to their last tokens by the rollout) and says how many."""
    import json
    import logging

    from rlhfstack.data import count_long_prompts, load_prompts
    from rlhfstack.models.core import tokenizer_for
    from rlhfstack.stages.ppo import train
    from rlhfstack.training import load_train_eval

    cfg = _cfg(smoke, tmp_path / "cut", ["trainer.max_steps=1", "data.max_prompt_tokens=8"])
    examples, _ = load_train_eval(load_prompts, cfg, "test")
    expected = count_long_prompts(examples, tokenizer_for(cfg.model), 8)
    assert 0 < expected <= len(examples)  # the smoke prompts are longer than 8 tokens
    with caplog.at_level(logging.INFO, logger="rlhfstack"):
        run_dir = train(cfg)
    done = json.loads((run_dir / "done.json").read_text())
    assert done["prompts_over_max_prompt_tokens"]["train"] == expected
    msg = (
        f"PPO train: {expected} of {len(examples)} prompts exceed data.max_prompt_tokens=8 "
        "and are cut to their last 8 tokens"
    )
    assert sum(msg in r.getMessage() for r in caplog.records) == 1


def test_dashboard_is_redrawn_at_each_gold_evaluation(smoke, tmp_path, monkeypatch):
    """3 iterations with a gold evaluation each: the dashboard is drawn after iterations 1 and 2
    while the run goes on, then once more at the end; it is the run's only image, and its KL
    panel carries the adaptive controller's target."""
    import numpy as np

    from rlhfstack import training
    from rlhfstack.stages import ppo

    draws: list[tuple[int, bool]] = []  # (last logged step, stage done)
    panels_seen: list = []
    real = training.write_dashboard

    def spy(rd, panels, title=""):
        path = real(rd, panels, title)
        assert path is not None and path.exists()
        draws.append((read_jsonl(rd / "metrics.jsonl")[-1]["step"], (rd / "done.json").exists()))
        panels_seen.append(panels)
        return path

    monkeypatch.setattr(training, "write_dashboard", spy)
    extra = ["trainer.max_steps=3", "gold_eval_every=1", "gold_eval_prompts=4", "kl.target=5"]
    cfg = _cfg(smoke, tmp_path / "ppo", [*extra, "logging.plots=true"])
    run_dir = ppo.train(cfg, gold_scorer=lambda p, c: np.array([len(x) for x in c], float))
    assert draws == [(1, False), (2, False), (3, False)]
    assert sorted(p.name for p in run_dir.rglob("*.png")) == ["dashboard.png"]
    (kl_panel,) = [p for p in panels_seen[-1] if p.keys == ("kl/seq_k1",)]
    assert kl_panel.hline == 5.0
