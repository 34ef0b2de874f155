"""Rollout engine vs trainer mismatch in the PPO stage: a known gap made with the project's own
engine (sampling at another temperature, or from a bf16 copy of the policy, while the trainer
scores at ``rollout.temperature`` in float32), the logged ``mismatch/*`` and the truncated
importance weights against values computed here from the same tensors."""

from __future__ import annotations

import copy
import math
from pathlib import Path

import pytest
import torch

from rlhfstack.configs import load_config, to_object
from rlhfstack.runtime import read_jsonl

SMALL = [
    "trainer.batch_size=8",
    "trainer.micro_batch_size=8",  # one minibatch, one micro-batch: ratio 1 in the only step
    "ppo.num_minibatches=1",
    "ppo.epochs=1",
    "rollout.max_new_tokens=12",
    "gold_eval_every=0",
    "ppo.value_model=shared",
    "ppo.logprobs_from_rollout=false",  # the trainer recomputes the old log-probs
]
CAP, THRESHOLD = 1.5, 0.05
ENGINE_TEMPERATURE = 1.6  # the engine samples hotter than the trainer's rollout.temperature=1


def _cfg(smoke: Path, run_dir: Path, extra: list[str]):
    return to_object(
        load_config("ppo", [f"artifacts_dir={smoke}", f"run_dir={run_dir}", *SMALL, *extra])
    )


def _trainer(cfg):
    from rlhfstack.stages.ppo import PPOTrainer, _prompts, _validate
    from rlhfstack.training import setup_run

    _validate(cfg)
    trainer = PPOTrainer(cfg, setup_run(cfg))
    trainer.start_rollouts()
    prompts, _, _ = _prompts(cfg, trainer.tok)
    return trainer, prompts[: cfg.trainer.batch_size]


def _hand(trainer_lp, engine_lp, mask, threshold, cap):
    """The mismatch statistics and TIS weights, one valid token at a time in Python floats."""
    gaps, weights = [], {}
    for b in range(mask.shape[0]):
        for t in range(mask.shape[1]):
            if mask[b, t]:
                g = float(trainer_lp[b, t]) - float(engine_lp[b, t])
                gaps.append(g)
                weights[b, t] = min(math.exp(g), cap)
    n = len(gaps)
    return {
        "mismatch/logp_gap_mean": sum(abs(g) for g in gaps) / n,
        "mismatch/logp_gap_signed_mean": sum(gaps) / n,
        "mismatch/logp_gap_max": max(abs(g) for g in gaps),
        "mismatch/frac_above": sum(abs(g) > threshold for g in gaps) / n,
        "mismatch/kl_k3": sum(math.exp(g) - 1 - g for g in gaps) / n,
        "mismatch/is_weight_mean": sum(weights.values()) / n,
        "mismatch/is_capped_frac": sum(math.exp(g) > cap for g in gaps) / n,
    }, weights


@pytest.mark.parametrize("engine", ["temperature", "bf16"])
def test_known_mismatch_is_logged_and_corrected(smoke, tmp_path, monkeypatch, engine):
    import rlhfstack.stages.ppo as ppo_stage
    from rlhfstack.models.core import response_logprobs
    from rlhfstack.rollout.generate import generate as real_generate

    cfg = _cfg(
        smoke,
        tmp_path / engine,
        [
            "ppo.rollout_is=token_tis",
            f"ppo.rollout_is_cap={CAP}",
            f"ppo.mismatch_threshold={THRESHOLD}",
            "ppo.entropy_coef=0",
            "ppo.kl_loss_coef=0",  # loss/policy is then the weighted clipped loss alone
        ],
    )
    trainer, prompts = _trainer(cfg)
    seen = {}

    def mismatched_engine(model, *args, **kwargs):
        if engine == "temperature":
            kwargs["temperature"] = ENGINE_TEMPERATURE
        else:  # the same weights rounded to bf16: logits and log-probs of lower precision
            model = copy.deepcopy(model).to(torch.bfloat16)
        seen["gen"] = real_generate(model, *args, **kwargs)
        return seen["gen"]

    monkeypatch.setattr(ppo_stage, "generate", mismatched_engine)
    exp = trainer.make_experience(prompts, 1)
    gen = seen["gen"]
    ids, mask = gen.full()
    P = gen.prompt_ids_BP.shape[1]
    resp = gen.response_mask_BR
    # the two sides: the trainer's float32 pass at T = 1 and what the engine returned
    with torch.no_grad():
        trainer_lp = response_logprobs(trainer.policy, ids, mask, P, 1.0)["logprobs"]
    assert torch.allclose(exp.old_logprobs_BR * resp, trainer_lp * resp, atol=1e-5)
    assert exp.rollout_logprobs_BR is gen.logprobs_BR
    if engine == "temperature":  # the engine's log-probs are the policy's at T = 1.6
        with torch.no_grad():
            hot = response_logprobs(trainer.policy, ids, mask, P, ENGINE_TEMPERATURE)["logprobs"]
        assert torch.allclose(gen.logprobs_BR * resp, hot * resp, atol=1e-5)

    want, weights = _hand(exp.old_logprobs_BR, gen.logprobs_BR, resp, THRESHOLD, CAP)
    got = trainer.mismatch_metrics(exp)
    assert got == pytest.approx(want, rel=1e-9, abs=1e-12)
    assert want["mismatch/logp_gap_mean"] > 0.01  # a real gap, not rounding
    if engine == "temperature":
        assert 0 < want["mismatch/is_capped_frac"] < 1  # some weights cut to the cap
    for (b, t), w in weights.items():
        assert float(exp.is_weights_BR[b, t]) == pytest.approx(w, rel=1e-6)

    # the update: one step at ratio 1, so loss/policy = -sum_t w_t A_t / n over valid tokens
    stats = trainer.ppo_update(exp, 1)
    adv = exp.advantages_BR
    n = len(weights)
    want_loss = -sum(w * float(adv[b, t]) for (b, t), w in weights.items()) / n
    assert stats["loss/policy"] == pytest.approx(want_loss, rel=1e-4, abs=1e-6)
    assert stats["first_minibatch_ratio"] == pytest.approx(1.0, abs=1e-5)  # pi / pi_old
    row = trainer.metrics(exp, stats, trainer.update_kl(exp))
    assert {k: row[k] for k in want} == pytest.approx(want, rel=1e-9, abs=1e-12)


def test_without_mismatch_the_gap_is_rounding_and_the_weights_are_one(smoke, tmp_path):
    from rlhfstack.stages.ppo import train

    cfg = _cfg(
        smoke,
        tmp_path / "run",
        ["trainer.max_steps=2", "ppo.rollout_is=token_tis", f"ppo.rollout_is_cap={CAP}"],
    )
    rows = read_jsonl(train(cfg) / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2]
    for r in rows:
        # the KV-cache engine and the trainer's full forward: the same function, another
        # summation order (float32 rounding, about 1e-6 per token)
        assert r["mismatch/logp_gap_mean"] < 1e-5 and r["mismatch/logp_gap_max"] < 1e-4
        assert r["mismatch/frac_above"] == 0.0 and r["mismatch/is_capped_frac"] == 0.0
        assert r["mismatch/kl_k3"] < 1e-9
        assert r["mismatch/is_weight_mean"] == pytest.approx(1.0, abs=1e-5)
        assert r["first_minibatch_ratio"] == pytest.approx(1.0, abs=1e-5)


def test_tis_needs_the_trainers_old_logprobs(smoke, tmp_path):
    from rlhfstack.stages.ppo import train

    with pytest.raises(ValueError, match="logprobs_from_rollout=false"):
        train(
            _cfg(
                smoke,
                tmp_path / "x",
                ["ppo.rollout_is=token_tis", "ppo.logprobs_from_rollout=true"],
            )
        )
    # old log-probs from the engine itself: nothing to compare, no mismatch/* row
    trainer, prompts = _trainer(_cfg(smoke, tmp_path / "y", ["ppo.logprobs_from_rollout=true"]))
    exp = trainer.make_experience(prompts, 1)
    assert exp.rollout_logprobs_BR is None and exp.is_weights_BR is None
    assert trainer.mismatch_metrics(exp) == {}
