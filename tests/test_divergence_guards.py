"""Divergence guards: a non-finite loss, gradient norm, reward, value or KL stops a run before the
update that would use it, names the quantity and the step, and leaves nothing saved after it (no
checkpoint, model, ``done.json`` or KL controller state); PPO's runaway-KL guard; and a
``metrics.jsonl`` that stays valid JSON when a value is non-finite."""

from __future__ import annotations

import json
import math
import re
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from rlhfstack.configs import load_config, to_object
from rlhfstack.losses import AdaptiveKLController
from rlhfstack.runtime import CostMeter, RunLogger, read_jsonl
from rlhfstack.training import (
    EXIT_DIVERGED,
    FiniteGuard,
    NonFiniteError,
    Run,
    RunawayKLError,
    train_loop,
)

REPO = Path(__file__).resolve().parent.parent
PPO_SMALL = [
    "trainer.batch_size=8",
    "trainer.micro_batch_size=4",
    "ppo.num_minibatches=2",
    "ppo.epochs=1",
    "rollout.max_new_tokens=8",
    "gold_eval_every=0",
    "ppo.value_model=shared",
    "logging.tensorboard=false",
    "logging.plots=false",
]


def _assert_nothing_saved_after(run_dir: Path, last_ckpt_step: int | None) -> None:
    """No done.json, model or end-of-run files; checkpoints only up to ``last_ckpt_step``."""
    for name in ("done.json", "model", "kl_controller.json", "value_model.safetensors"):
        assert not (run_dir / name).exists(), name
    steps = sorted(int(p.name.split("-")[1]) for p in run_dir.glob("ckpt-*"))
    assert steps == ([] if last_ckpt_step is None else list(range(1, last_ckpt_step + 1)))
    if (run_dir / "metrics.jsonl").exists():  # valid JSON, finite values only
        for row in read_jsonl(run_dir / "metrics.jsonl"):
            assert "nonfinite" not in row, row
            assert all(math.isfinite(v) for v in row.values() if isinstance(v, float)), row


# ----------------------------------------------------------------------------- the shared loop


def _toy_run(tmp_path: Path) -> Run:
    trainer = SimpleNamespace(
        batch_size=2,
        micro_batch_size=2,
        save_every=0,
        lr=0.1,
        adam_betas=(0.9, 0.999),
        adam_eps=1e-8,
        weight_decay=0.0,
        warmup_steps=0,
        lr_schedule="constant",
        grad_clip=1.0,
        eval_every=0,
        log_every=1,
    )
    cfg = SimpleNamespace(seed=0, trainer=trainer)
    logger = RunLogger(tmp_path, tensorboard=False)
    return Run(cfg=cfg, run_dir=tmp_path, logger=logger, cost=CostMeter(), device="cpu")


@pytest.mark.parametrize("bad", ["loss", "grad_norm"])
def test_train_loop_stops_before_the_update_that_would_use_a_non_finite_value(tmp_path, bad):
    torch.manual_seed(0)
    model = nn.Linear(2, 1)
    items = [torch.randn(2) for _ in range(4)]
    seen: dict[int, dict[str, torch.Tensor]] = {}

    def loss_fn(mb, n):
        step = len(seen) + 1
        seen[step] = {k: v.detach().clone() for k, v in model.state_dict().items()}
        loss = model(mb["x"]).pow(2).sum() / n
        if step == 3 and bad == "loss":
            loss = loss * float("nan")
        if step == 3 and bad == "grad_norm":  # finite value (0), NaN gradient (d sqrt(u) at 0)
            w = model.weight
            loss = loss + torch.sqrt(((w - w.detach()) ** 2).sum())
        return loss, {}

    run = _toy_run(tmp_path)
    with pytest.raises(NonFiniteError) as err:
        train_loop(
            run,
            params=list(model.parameters()),
            items=items,
            collate=lambda xs: {"x": torch.stack(xs)},
            loss_fn=loss_fn,
            max_steps=5,
        )
    e = err.value
    assert (e.quantity, e.step) == (bad, 3)
    assert f"non-finite {bad} at step 3" in str(e)
    assert "last finite values (step 2): loss=" in str(e) and "grad_norm=" in str(e)
    assert set(e.last_good) >= {"loss", "grad_norm", "lr"}
    # the in-memory model is the one that produced step 3's loss: the update was not applied
    for k, v in model.state_dict().items():
        assert torch.equal(v, seen[3][k]) and torch.isfinite(v).all(), k
    assert [r["step"] for r in read_jsonl(tmp_path / "metrics.jsonl")] == [1, 2]


def test_a_value_non_finite_on_another_rank_stops_this_one_too(tmp_path, monkeypatch):
    from rlhfstack import distributed

    # the collective sum of "non-finite" flags: another rank reports its grad_norm non-finite
    monkeypatch.setattr(
        distributed, "sum_stats", lambda d: {k: v + (k == "grad_norm") for k, v in d.items()}
    )
    guard = FiniteGuard(_toy_run(tmp_path))
    guard.passed(4, {"loss": 1.5, "grad_norm": 0.25, "lr": 1e-3, "other": 7.0})
    with pytest.raises(NonFiniteError, match=r"non-finite grad_norm at step 5.*another rank"):
        guard.check(5, {"loss": 1.0, "grad_norm": 2.0})
    guard.check(5, {"loss": 1.0}, collective=False)  # rank-0-only code: local flags only


def test_sft_stage_stops_at_a_nan_loss_and_keeps_its_last_checkpoint(arts, tmp_path, monkeypatch):
    from rlhfstack.stages import sft

    real = sft.sft_loss
    calls = {"n": 0}

    def nan_from_step_3(model, batch, n):  # one micro-batch per step: call n is step n
        calls["n"] += 1
        loss, stats = real(model, batch, n)
        return (loss * float("nan") if calls["n"] >= 3 else loss), stats

    monkeypatch.setattr(sft, "sft_loss", nan_from_step_3)
    run_dir = tmp_path / "sft"
    cfg = to_object(
        load_config(
            "sft",
            [
                "+experiment=demo",
                f"artifacts_dir={arts}",
                f"run_dir={run_dir}",
                "trainer.max_steps=5",
                "trainer.batch_size=4",
                "trainer.micro_batch_size=4",
                "trainer.save_every=1",
                "trainer.eval_every=0",
                "logging.tensorboard=false",
                "logging.plots=false",
            ],
        )
    )
    with pytest.raises(NonFiniteError, match="non-finite loss at step 3") as err:
        sft.train(cfg)
    assert err.value.step == 3
    _assert_nothing_saved_after(run_dir, last_ckpt_step=2)


# ----------------------------------------------------------------------------- PPO


def test_diverging_ppo_recipe_exits_nonzero_naming_quantity_and_step(smoke, tmp_path):
    """The issue's command (trainer.lr=10, the demo's PPO settings at batch size 8) on the smoke
    pipeline's models."""
    run_dir = tmp_path / "ppo_lr10"
    cmd = [
        sys.executable,
        "recipes/train_ppo.py",
        "+experiment=demo",
        f"artifacts_dir={smoke}",
        f"run_dir={run_dir}",
        "trainer.max_steps=3",
        "trainer.batch_size=8",
        "trainer.micro_batch_size=8",
        "gold_eval_every=0",
        "trainer.lr=10",
        "cluster.num_threads=1",
        "logging.tensorboard=false",
        "logging.plots=false",
    ]
    p = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
    out = p.stdout + p.stderr
    assert p.returncode == EXIT_DIVERGED, out[-3000:]
    assert re.search(r"NonFiniteError: non-finite \S+ at step [123]\b", out), out[-3000:]
    assert "Traceback" not in out
    _assert_nothing_saved_after(run_dir, last_ckpt_step=None)


def _ppo_cfg(smoke: Path, run_dir: Path, extra: list[str]):
    return to_object(
        load_config("ppo", [f"artifacts_dir={smoke}", f"run_dir={run_dir}", *PPO_SMALL, *extra])
    )


def test_ppo_nan_value_loss_stops_before_the_update_and_keeps_the_checkpoints(
    smoke, tmp_path, monkeypatch
):
    from rlhfstack.stages import ppo

    real = ppo.ppo_value_loss
    calls = {"n": 0}

    def nan_from_step_3(*args, **kwargs):  # 2 minibatches x 1 micro-batch per iteration
        calls["n"] += 1
        loss, stats = real(*args, **kwargs)
        return (loss * float("nan") if calls["n"] >= 5 else loss), stats

    monkeypatch.setattr(ppo, "ppo_value_loss", nan_from_step_3)
    run_dir = tmp_path / "ppo_nan"
    cfg = _ppo_cfg(smoke, run_dir, ["trainer.max_steps=4", "trainer.save_every=1"])
    with pytest.raises(NonFiniteError) as err:
        ppo.train(cfg)
    e = err.value
    assert (e.quantity, e.step) == ("loss/value", 3)
    assert "(update: epoch 0, minibatch 0)" in str(e)
    assert "kl/seq_k1=" in str(e) and "reward/rm_score=" in str(e)  # last good values
    _assert_nothing_saved_after(run_dir, last_ckpt_step=2)
    assert [r["step"] for r in read_jsonl(run_dir / "metrics.jsonl")] == [1, 2]


def test_ppo_nan_reward_stops_before_the_update(smoke, tmp_path, monkeypatch):
    from rlhfstack.rewards import RewardModelReward

    real = RewardModelReward.score

    def nan_scores(self, *args, **kwargs):
        out = real(self, *args, **kwargs)
        out.scores_B[0] = float("nan")
        return out

    monkeypatch.setattr(RewardModelReward, "score", nan_scores)
    from rlhfstack.stages.ppo import train

    with pytest.raises(NonFiniteError, match=r"non-finite reward/rm_score at step 1 \(rollout"):
        train(_ppo_cfg(smoke, tmp_path / "ppo_nan_rm", ["trainer.max_steps=2"]))
    _assert_nothing_saved_after(tmp_path / "ppo_nan_rm", last_ckpt_step=None)


def test_runaway_kl_guard_trips_and_can_be_disabled(smoke, tmp_path):
    from rlhfstack.stages.ppo import train

    # a tiny target: after the first update the KL is far above 10 x target
    forced = ["trainer.max_steps=3", "trainer.lr=1e-3", "kl.target=1e-4", "kl.stop_multiple=10"]
    with pytest.raises(RunawayKLError, match=r"runaway KL at step 3") as err:
        train(_ppo_cfg(smoke, tmp_path / "on", [*forced, "kl.stop_patience=2"]))
    assert err.value.quantity == "kl/seq_k1" and err.value.step == 3
    _assert_nothing_saved_after(tmp_path / "on", last_ckpt_step=None)
    # the same run with the guard off finishes, and its KL was above the limit from step 2 on
    run_dir = train(_ppo_cfg(smoke, tmp_path / "off", [*forced, "kl.stop_multiple=0"]))
    kl = [r["kl/seq_k1"] for r in read_jsonl(run_dir / "metrics.jsonl")]
    assert kl[0] < 1e-3 < min(kl[1:]), kl
    assert (run_dir / "done.json").exists()


def test_runaway_kl_guard_config_is_checked():
    with pytest.raises(ValueError, match="stop_patience"):
        to_object(load_config("ppo", ["kl.stop_patience=0"]))
    with pytest.raises(ValueError, match="stop_multiple"):
        to_object(load_config("ppo", ["kl.stop_multiple=-1"]))


def test_demo_ppo_config_keeps_the_runaway_kl_guard_on_with_room():
    cfg = to_object(load_config("ppo", []))
    # the committed demo's kl/seq_k1 peaks near 2.5 nats with target 4: the guard is far above
    assert cfg.kl.stop_multiple * cfg.kl.target >= 10 * 2.5 and cfg.kl.stop_patience >= 2


# ----------------------------------------------------------------------------- logs and state


def test_run_logger_writes_non_finite_values_as_null_with_a_flag(tmp_path):
    logger = RunLogger(tmp_path, tensorboard=False)
    logger.log(1, {"loss": 0.5, "lr": 1e-3})
    logger.log(
        2,
        {
            "loss": float("nan"),
            "grad_norm": float("inf"),
            "kl": torch.tensor(float("-inf")),
            "lr": 1e-3,
        },
    )
    logger.close()
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert rows[0] == {"step": 1, "loss": 0.5, "lr": 1e-3}
    assert rows[1] == {
        "step": 2,
        "loss": None,
        "grad_norm": None,
        "kl": None,
        "lr": 1e-3,
        "nonfinite": ["loss", "grad_norm", "kl"],
    }


def test_kl_controller_refuses_a_non_finite_kl():
    ctl = AdaptiveKLController(0.3, 4.0, 1000)
    ctl.update(5.0, 64)
    beta = ctl.value
    with pytest.raises(ValueError, match="non-finite KL"):
        ctl.update(float("nan"), 64)
    assert ctl.value == beta and math.isfinite(ctl.state_dict()["value"])
