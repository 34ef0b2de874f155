"""training.Checkpointer in one process: when it saves, what it restores, preemption."""

from __future__ import annotations

import os
import signal

import pytest
import torch

from rlhfstack.runtime import CostMeter, RunLogger, read_jsonl
from rlhfstack.training import Checkpointer, Preempted, Run


def _setup(run_dir, save_every: int):
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (s + 1))
    logger = RunLogger(run_dir, tensorboard=False)
    run = Run(cfg=None, run_dir=run_dir, logger=logger, cost=CostMeter(), device="cpu")
    return model, opt, sched, Checkpointer(run, model, opt, sched, save_every=save_every)


def _train_step(model, opt, sched) -> None:
    opt.zero_grad()
    model(torch.ones(1, 3)).sum().backward()
    opt.step()
    sched.step()


def test_saves_every_n_steps_but_not_the_last_and_restores_everything(tmp_path):
    model, opt, sched, ckpt = _setup(tmp_path, save_every=2)
    assert ckpt.restore() is None  # a fresh run
    for step in range(1, 5):
        _train_step(model, opt, sched)
        ckpt.run.logger.log(step, {"x": float(step)})
        ckpt.end_of_step(step, 4, lambda: ({"cursor": 7}, {"gen": 1}))
        if step == 2:
            want = {k: v.clone() for k, v in model.state_dict().items()}
            want_draw = torch.rand(3)  # the global RNG right after the step-2 checkpoint
    # step 2 saved; step 4 is the last (the stage saves its model instead)
    assert sorted(p.name for p in tmp_path.glob("ckpt-*")) == ["ckpt-000002"]
    model2, opt2, sched2, ckpt2 = _setup(tmp_path, save_every=2)
    extra = ckpt2.restore()
    assert extra["step"] == 2 and extra["cursor"] == 7 and extra["rank_extra"] == {"gen": 1}
    for k, v in model2.state_dict().items():
        assert torch.equal(v, want[k]), k
    assert sched2.last_epoch == 2 and opt2.state_dict()["state"][0]["step"] == 2
    # the global RNG continues from where it was saved; the metrics after step 2 are dropped
    assert torch.equal(torch.rand(3), want_draw)
    assert [r["step"] for r in read_jsonl(tmp_path / "metrics.jsonl")] == [1, 2]


def test_a_preemption_signal_saves_and_raises_preempted(tmp_path):
    model, opt, sched, ckpt = _setup(tmp_path, save_every=0)
    with ckpt.watch():
        _train_step(model, opt, sched)
        ckpt.end_of_step(1, 10)  # no signal, no save_every: nothing written
        assert not list(tmp_path.glob("ckpt-*"))
        os.kill(os.getpid(), signal.SIGTERM)  # only sets the flag inside watch()
        _train_step(model, opt, sched)
        with pytest.raises(Preempted) as e:
            ckpt.end_of_step(2, 10)
    assert e.value.step == 2 and e.value.code == 0
    assert [p.name for p in tmp_path.glob("ckpt-*")] == ["ckpt-000002"]


def test_a_model_with_frozen_weights_resumes_its_trainable_ones(tmp_path):
    # frozen weights (a LoRA base; a head that a pipeline stage holds but never runs) are not
    # saved; loading must restore the trainable ones and leave the frozen ones as they are
    from rlhfstack import distributed

    def build(seed: int):
        torch.manual_seed(seed)
        model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2))
        model[0].requires_grad_(False)
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.1)
        model(torch.ones(1, 3)).sum().backward()
        opt.step()
        return model, opt

    model, opt = build(0)
    distributed.save_checkpoint(tmp_path / "ckpt-000001", model, opt, {"step": 1})
    other, other_opt = build(1)
    frozen = other[0].weight.clone()
    distributed.load_checkpoint(tmp_path / "ckpt-000001", other, other_opt)
    assert torch.equal(other[1].weight, model[1].weight)
    assert torch.equal(other[0].weight, frozen)
    state = other_opt.state[other[1].weight]
    assert torch.equal(state["exp_avg"], opt.state[model[1].weight]["exp_avg"])
