"""Tests for rlhfstack.losses.mismatch (rollout engine vs trainer gap, truncated IS weights)."""

import math

import pytest
import torch
from helpers import close

from rlhfstack.losses import ppo_policy_loss
from rlhfstack.losses.mismatch import (
    logprob_gap,
    mismatch_metrics,
    mismatch_sums,
    truncated_is_weights,
)

NAN = float("nan")

# three valid tokens with trainer / engine probability ratios 1.5, 0.5 and 3 (gaps ln 1.5,
# -ln 2, ln 3), then padding whose garbage must not be read
ROLLOUT = torch.tensor([[-1.0, -2.0, -3.0], [-0.5, NAN, NAN]], dtype=torch.float64)
RATIOS = torch.tensor([[1.5, 0.5, 3.0], [1.0, 1.0, 1.0]], dtype=torch.float64)
TRAINER = ROLLOUT + RATIOS.log()
MASK = torch.tensor([[1, 1, 1], [0, 0, 0]])


def test_gap_and_metrics_hand_computed():
    gap = logprob_gap(TRAINER, ROLLOUT, MASK)
    assert torch.allclose(
        gap[0], torch.tensor([math.log(1.5), -math.log(2.0), math.log(3.0)]).double()
    )
    assert torch.equal(gap[1], torch.zeros(3, dtype=torch.float64))  # padding: 0, not NaN
    m = mismatch_metrics(mismatch_sums(TRAINER, ROLLOUT, MASK, threshold=0.5, cap=2.0))
    # mean |gap| = (ln 1.5 + ln 2 + ln 3) / 3 = ln 9 / 3 = 0.732408
    assert close(m["mismatch/logp_gap_mean"], math.log(9.0) / 3)
    # mean gap = (ln 1.5 - ln 2 + ln 3) / 3 = ln 2.25 / 3 = 0.270310
    assert close(m["mismatch/logp_gap_signed_mean"], math.log(2.25) / 3)
    assert close(m["mismatch/logp_gap_max"], math.log(3.0))  # 1.098612
    # |gap| > 0.5: ln 2 = 0.693 and ln 3 = 1.099 (ln 1.5 = 0.405 is not): 2 of 3
    assert close(m["mismatch/frac_above"], 2 / 3)
    # k3 = (r - 1) - ln r: (0.5 - ln 1.5) + (-0.5 + ln 2) + (2 - ln 3) = 2 + ln(4/9) = 1.189069
    assert close(m["mismatch/kl_k3"], (2.0 + math.log(4.0 / 9.0)) / 3)
    # TIS with C = 2: w = (1.5, 0.5, min(3, 2) = 2), mean 4/3; one of three capped
    assert close(m["mismatch/is_weight_mean"], 4.0 / 3.0)
    assert close(m["mismatch/is_capped_frac"], 1 / 3)


def test_truncated_weights_hand_computed_and_one_without_mismatch():
    w = truncated_is_weights(TRAINER, ROLLOUT, MASK, cap=2.0)
    assert torch.allclose(w, torch.tensor([[1.5, 0.5, 2.0], [1.0, 1.0, 1.0]]).double())
    assert not w.requires_grad
    # no mismatch: every weight exactly 1, every statistic 0
    same = TRAINER.clone()
    assert torch.equal(truncated_is_weights(same, same, MASK, cap=2.0), torch.ones_like(same))
    m = mismatch_metrics(mismatch_sums(same, same, MASK, threshold=0.0, cap=2.0))
    assert m["mismatch/logp_gap_mean"] == 0.0 and m["mismatch/logp_gap_max"] == 0.0
    assert m["mismatch/frac_above"] == 0.0 and m["mismatch/kl_k3"] == 0.0
    assert m["mismatch/is_weight_mean"] == 1.0 and m["mismatch/is_capped_frac"] == 0.0
    with pytest.raises(ValueError, match="cap"):
        truncated_is_weights(TRAINER, ROLLOUT, MASK, cap=0.5)


def test_huge_ratio_does_not_overflow():
    trainer = torch.tensor([[0.0]])
    rollout = torch.tensor([[-1000.0]])  # ratio e^1000: inf in float32
    w = truncated_is_weights(trainer, rollout, torch.ones(1, 1), cap=3.0)
    assert close(w, 3.0)


def test_policy_loss_with_weights_hand_computed():
    old = TRAINER.clone()
    new = old.clone().requires_grad_(True)  # pi == pi_old: ratio 1, no clipping
    adv = torch.tensor([[1.0, -1.0, 2.0], [7.0, NAN, 7.0]], dtype=torch.float64)
    w = truncated_is_weights(TRAINER, ROLLOUT, MASK, cap=2.0)  # (1.5, 0.5, 2)
    loss, stats = ppo_policy_loss(new, old, adv, MASK, clip_eps=0.2, is_weights_BT=w)
    # per token w * max(-A r, -A clip(r)) at r = 1: -w A = (-1.5, 0.5, -4); mean = -5/3
    assert close(loss, -5.0 / 3.0)
    loss.backward()
    # d/dlogp_t of -w A r / n at r = 1: -w_t A_t / 3
    expected = torch.tensor([[-1.5 / 3, 0.5 / 3, -4.0 / 3], [0.0, 0.0, 0.0]]).double()
    assert torch.allclose(new.grad, expected)
    assert close(stats["ratio_mean"], 1.0)  # the ratio statistics are the unweighted ones
    # weights of 1 leave the loss bit-identical to the unweighted one
    plain, _ = ppo_policy_loss(new, old, adv, MASK, clip_eps=0.2)
    ones, _ = ppo_policy_loss(new, old, adv, MASK, clip_eps=0.2, is_weights_BT=torch.ones_like(w))
    assert torch.equal(plain, ones)
