"""Tests for rlhfstack.losses.ppo (Schulman et al. 2017 eq. 7, clipped value loss)."""

import math

import pytest
import torch
from helpers import close

from rlhfstack.losses.ppo import entropy_bonus, ppo_policy_loss, ppo_value_loss

NAN = float("nan")


# tokens: ratios 1.5, 0.5, 1.0 in row 0 and 0.5 in row 1 (then two padded positions)
RATIOS = torch.tensor([[1.5, 0.5, 1.0], [0.5, 1.0, 1.0]], dtype=torch.float64)
ADV = torch.tensor([[1.0, 1.0, -1.0], [-1.0, 5.0, 5.0]], dtype=torch.float64)
MASK = torch.tensor([[1, 1, 1], [1, 0, 0]])


def _policy_inputs():
    old = torch.tensor([[-1.0, -2.0, -0.5], [-3.0, -1.0, -1.0]], dtype=torch.float64)
    new = (old + RATIOS.log()).requires_grad_(True)
    return new, old


def test_ppo_policy_loss_hand_computed():
    new, old = _policy_inputs()
    loss, stats = ppo_policy_loss(new, old, ADV, MASK, clip_eps=0.2)
    # per token max(-A r, -A clip(r, 0.8, 1.2)):
    #   r=1.5, A=+1: max(-1.5, -1.2) = -1.2   (clipped term active)
    #   r=0.5, A=+1: max(-0.5, -0.8) = -0.5
    #   r=1.0, A=-1: max( 1.0,  1.0) =  1.0
    #   r=0.5, A=-1: max( 0.5,  0.8) =  0.8   (clipped term active)
    # mean = (-1.2 - 0.5 + 1.0 + 0.8) / 4 = 0.025
    assert close(loss, 0.025)
    assert close(stats["clipfrac"], 0.5)  # 2 of 4 tokens
    assert close(stats["ratio_mean"], 0.875)  # (1.5 + 0.5 + 1 + 0.5) / 4
    assert close(stats["ratio_max"], 1.5)  # padded ratios ignored
    # approx_kl = mean((r - 1) - ln r) = [0.5 - ln 1.5, -0.5 + ln 2, 0, -0.5 + ln 2] / 4
    expected_kl = (0.5 - math.log(1.5) + 2 * (math.log(2.0) - 0.5)) / 4  # 0.120207
    assert close(stats["approx_kl"], expected_kl)
    assert all(not v.requires_grad and v.dim() == 0 for v in stats.values())
    # gradient wrt log pi: clipped tokens get 0; else d(-A r)/d log pi = -A r, divided by 4
    (grad,) = torch.autograd.grad(loss, new)
    assert close(grad, [[0.0, -0.5 / 4, 1.0 / 4], [0.0, 0.0, 0.0]])


def test_ppo_policy_loss_normalizer_divides_masked_sum():
    new, old = _policy_inputs()
    loss, _ = ppo_policy_loss(new, old, ADV, MASK, normalizer=8.0)
    assert close(loss, 0.1 / 8)  # masked sum 0.1 over a global count of 8 tokens
    with pytest.raises(ValueError):
        ppo_policy_loss(new, old, ADV, MASK, normalizer=0.0)


def test_ppo_policy_loss_clip_higher():
    new, old = _policy_inputs()
    # clip range [0.8, 1.6]: token r=1.5, A=+1 no longer clipped: -1.5 -> (-1.5-0.5+1+0.8)/4
    loss, stats = ppo_policy_loss(new, old, ADV, MASK, clip_eps=0.2, clip_eps_high=0.6)
    assert close(loss, -0.05)
    assert close(stats["clipfrac"], 0.25)


def test_ppo_ratio_is_one_and_approx_kl_zero_when_logprobs_equal_old():
    torch.manual_seed(0)
    logp = -torch.rand(4, 7) * 3
    adv = torch.randn(4, 7)
    mask = (torch.rand(4, 7) > 0.3).long()
    mask[:, 0] = 1
    loss, stats = ppo_policy_loss(logp.clone().requires_grad_(True), logp, adv, mask)
    assert stats["ratio_mean"] == 1 and stats["ratio_max"] == 1
    assert stats["approx_kl"] == 0
    assert stats["clipfrac"] == 0
    assert close(loss, -(adv * mask).sum() / mask.sum(), tol=1e-6)  # -mean(A) at ratio 1


def test_ppo_policy_loss_padding_values_change_nothing():
    new, old = _policy_inputs()
    new2 = new.detach().clone()
    old2, adv2 = old.clone(), ADV.clone()
    new2[1, 1:], old2[1, 1:], adv2[1, 1:] = 50.0, NAN, math.inf
    new2.requires_grad_(True)
    l1, s1 = ppo_policy_loss(new, old, ADV, MASK)
    l2, s2 = ppo_policy_loss(new2, old2, adv2, MASK)
    assert torch.equal(l1, l2)
    assert all(torch.equal(s1[k], s2[k]) for k in s1)
    (g1,) = torch.autograd.grad(l1, new)
    (g2,) = torch.autograd.grad(l2, new2)
    assert torch.equal(g1, g2)


def test_ppo_policy_loss_treats_old_logprobs_and_advantages_as_constants():
    new, old = _policy_inputs()
    old = old.clone().requires_grad_(True)
    adv = ADV.clone().requires_grad_(True)
    loss, _ = ppo_policy_loss(new, old, adv, MASK)
    loss.backward()
    assert old.grad is None and adv.grad is None and new.grad is not None


V = torch.tensor([[1.0, 0.0, 2.0, 9.0]], dtype=torch.float64)
V_OLD = torch.tensor([[0.5, 0.5, 2.0, -9.0]], dtype=torch.float64)
RET = torch.tensor([[2.0, 1.0, 2.1, 0.0]], dtype=torch.float64)
V_MASK = torch.tensor([[1, 1, 1, 0]])


def test_ppo_value_loss_hand_computed():
    v = V.clone().requires_grad_(True)
    loss, stats = ppo_value_loss(v, V_OLD, RET, V_MASK, clip_range=0.2)
    # t0: (1-2)^2 = 1;  v_clip = 0.5 + clip(0.5, +-0.2) = 0.7, (0.7-2)^2 = 1.69 -> 1.69 (clipped)
    # t1: (0-1)^2 = 1;  v_clip = 0.5 - 0.2 = 0.3, (0.3-1)^2 = 0.49            -> 1
    # t2: (2-2.1)^2 = 0.01 both                                                -> 0.01
    # loss = 0.5 * (1.69 + 1 + 0.01) / 3 = 0.45
    assert close(loss, 0.45)
    assert close(stats["vf_clipfrac"], 1.0 / 3.0)
    assert close(stats["value_mean"], 1.0)  # (1 + 0 + 2) / 3
    assert close(stats["value_error"], 2.01 / 3.0)  # (1 + 1 + 0.01) / 3
    # gradient: t0 clipped -> 0; t1: (v - R) / 3 = -1/3; t2: max of ties splits but sums to (v-R)/3
    (grad,) = torch.autograd.grad(loss, v)
    assert close(grad, [[0.0, -1.0 / 3.0, -0.1 / 3.0, 0.0]])


def test_ppo_value_loss_without_clipping_and_with_normalizer():
    loss, stats = ppo_value_loss(V, V_OLD, RET, V_MASK, clip_range=None)
    assert close(loss, 0.5 * 2.01 / 3.0)  # 0.5 * (1 + 1 + 0.01) / 3
    assert stats["vf_clipfrac"] == 0
    loss, _ = ppo_value_loss(V, V_OLD, RET, V_MASK, clip_range=0.2, normalizer=6.0)
    assert close(loss, 0.5 * 2.7 / 6.0)


def test_ppo_value_loss_padding_values_change_nothing():
    v1, v2, old2, ret2 = V.clone(), V.clone(), V_OLD.clone(), RET.clone()
    v2[0, 3], old2[0, 3], ret2[0, 3] = NAN, math.inf, -1e9
    v1.requires_grad_(True)
    v2.requires_grad_(True)
    l1, s1 = ppo_value_loss(v1, V_OLD, RET, V_MASK)
    l2, s2 = ppo_value_loss(v2, old2, ret2, V_MASK)
    assert torch.equal(l1, l2)
    assert all(torch.equal(s1[k], s2[k]) for k in s1)
    (g1,) = torch.autograd.grad(l1, v1)
    (g2,) = torch.autograd.grad(l2, v2)
    assert torch.equal(g1, g2) and g1[0, 3] == 0


def test_entropy_bonus_masked_mean():
    ent = torch.tensor([[1.0, 2.0], [3.0, NAN]])
    m = torch.tensor([[1, 1], [1, 0]])
    assert close(entropy_bonus(ent, m), 2.0)  # (1 + 2 + 3) / 3
    assert close(entropy_bonus(ent, m, normalizer=4.0), 1.5)  # 6 / 4
