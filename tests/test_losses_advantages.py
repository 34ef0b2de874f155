"""Tests for rlhfstack.losses.advantages: KL-shaped rewards, GAE, GRPO, RLOO, explained variance."""

import math

import pytest
import torch
from helpers import close

from rlhfstack.losses.advantages import (
    explained_variance,
    gae,
    group_normalized_advantages,
    kl_shaped_rewards,
    last_token_index,
    leave_one_out_advantages,
)

NAN = float("nan")


def test_last_token_index_hand_computed():
    mask = torch.tensor([[1, 1, 0], [1, 1, 1], [0, 0, 0], [0, 1, 0]])
    assert last_token_index(mask).tolist() == [1, 2, -1, 1]  # empty row -> -1
    assert last_token_index(mask.bool()).tolist() == [1, 2, -1, 1]


# row 0 ends with EOS at t=1 then padding; row 1 was truncated (mask all ones to the end)
LOGP = torch.tensor([[-1.0, -2.0, -3.0], [-0.5, -0.5, -0.5]])
REF = torch.tensor([[-1.5, -1.0, 0.0], [-1.0, -1.0, -1.0]])
RESP_MASK = torch.tensor([[1, 1, 0], [1, 1, 1]])
SCORES = torch.tensor([1.0, 2.0])


def test_kl_shaped_rewards_hand_computed():
    rewards, kl = kl_shaped_rewards(SCORES, LOGP, REF, RESP_MASK, kl_coef=0.1)
    # k1 = logp - ref = [[0.5, -1.0, (pad) 0], [0.5, 0.5, 0.5]]
    assert close(kl, [[0.5, -1.0, 0.0], [0.5, 0.5, 0.5]])
    # -0.1 * kl, plus score on the last valid token: row0 t=1: 0.1 + 1.0; row1 t=2: -0.05 + 2.0
    assert close(rewards, [[-0.05, 1.1, 0.0], [-0.05, -0.05, 1.95]])
    # k3 estimator: log r = ref - logp = [-0.5, 1.0]; k3 = [e^-0.5 - 0.5, e - 2]
    _, kl3 = kl_shaped_rewards(SCORES, LOGP, REF, RESP_MASK, kl_coef=0.1, estimator="k3")
    assert close(kl3[0], [math.exp(-0.5) - 0.5, math.e - 2.0, 0.0])


def test_score_lands_on_last_valid_token_for_eos_and_truncated_rows():
    mask = torch.tensor(
        [
            [1, 1, 1, 0, 0],  # finished with EOS at t=2, then padding
            [1, 1, 1, 1, 1],  # truncated at max length, no EOS: last generated token t=4
            [1, 0, 0, 0, 0],  # immediate EOS at t=0
        ]
    )
    scores = torch.tensor([3.0, -2.0, 0.5])
    logp = torch.randn(3, 5)
    rewards, _ = kl_shaped_rewards(scores, logp, logp, mask, kl_coef=0.1)  # KL == 0
    expected = torch.zeros(3, 5)
    expected[0, 2], expected[1, 4], expected[2, 0] = 3.0, -2.0, 0.5
    assert torch.equal(rewards, expected)


def test_kl_shaped_rewards_padding_values_change_nothing():
    logp2, ref2 = LOGP.clone(), REF.clone()
    logp2[0, 2], ref2[0, 2] = NAN, 123.0
    r1, k1 = kl_shaped_rewards(SCORES, LOGP, REF, RESP_MASK, kl_coef=0.1)
    r2, k2 = kl_shaped_rewards(SCORES, logp2, ref2, RESP_MASK, kl_coef=0.1)
    assert torch.equal(r1, r2) and torch.equal(k1, k2)


def test_kl_shaped_rewards_rejects_empty_rows():
    with pytest.raises(ValueError, match="no valid token"):
        kl_shaped_rewards(SCORES, LOGP, REF, torch.tensor([[1, 0, 0], [0, 0, 0]]), kl_coef=0.1)


def test_gae_hand_computed():
    rewards = torch.tensor([[0.0, 0.0, 1.0], [1.0, 9.0, 9.0]])
    values = torch.tensor([[0.5, 0.5, 0.5], [0.25, 9.0, 9.0]])
    mask = torch.tensor([[1, 1, 1], [1, 0, 0]])
    adv, ret = gae(rewards, values, mask, gamma=1.0, lam=0.5)
    # row0: t2: d = 1 + 0 - 0.5 = 0.5, A = 0.5
    #       t1: d = 0 + 0.5 - 0.5 = 0,  A = 0 + 0.5 * 0.5 = 0.25
    #       t0: d = 0,                  A = 0.5 * 0.25 = 0.125
    # row1: t0: d = 1 + 0 (episode ends) - 0.25 = 0.75; padding -> 0
    assert close(adv, [[0.125, 0.25, 0.5], [0.75, 0.0, 0.0]])
    assert close(ret, [[0.625, 0.75, 1.0], [1.0, 0.0, 0.0]])  # A + V


def test_gae_lambda_one_gives_discounted_return_to_go():
    rewards = torch.tensor([[0.0, 0.0, 1.0]])
    values = torch.tensor([[0.5, 0.5, 0.5]])
    adv, ret = gae(rewards, values, torch.ones(1, 3), gamma=0.9, lam=1.0)
    # returns = sum_k gamma^k r_{t+k} = [0.81, 0.9, 1.0]; A = returns - 0.5
    assert close(ret, [[0.81, 0.9, 1.0]])
    assert close(adv, [[0.31, 0.4, 0.5]])


def _reference_gae(rewards, values, mask, gamma, lam):
    """Plain Python loop, one row at a time over the valid positions only."""
    adv = torch.zeros_like(values)
    for b in range(values.shape[0]):
        steps = [t for t in range(values.shape[1]) if mask[b, t]]
        last, next_v = 0.0, 0.0
        for t in reversed(steps):
            delta = rewards[b, t].item() + gamma * next_v - values[b, t].item()
            last = delta + gamma * lam * last
            adv[b, t] = last
            next_v = values[b, t].item()
    return adv, (adv + values) * mask


def test_vectorized_gae_matches_python_reference_loop_on_ragged_masks():
    torch.manual_seed(0)
    B, T = 6, 9
    rewards = torch.randn(B, T, dtype=torch.float64)
    values = torch.randn(B, T, dtype=torch.float64)
    lengths = torch.tensor([9, 1, 4, 7, 2, 5])
    mask = (torch.arange(T) < lengths[:, None]).long()  # right padding, ragged
    mask[4] = torch.tensor([0, 0, 0, 1, 1, 1, 1, 0, 0])  # left padding
    mask[5] = torch.tensor([1, 1, 0, 1, 0, 0, 1, 1, 0])  # holes (e.g. masked tool output)
    for gamma, lam in ((1.0, 0.95), (0.9, 0.8), (0.99, 1.0)):
        adv, ret = gae(rewards, values, mask, gamma=gamma, lam=lam)
        adv_ref, ret_ref = _reference_gae(rewards, values, mask, gamma, lam)
        assert torch.allclose(adv, adv_ref, atol=1e-12)
        assert torch.allclose(ret, ret_ref, atol=1e-12)


def test_gae_padding_values_change_nothing():
    torch.manual_seed(0)
    rewards, values = torch.randn(3, 6), torch.randn(3, 6)
    mask = torch.tensor([[1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 1, 1], [0, 1, 1, 1, 1, 0]])
    r2, v2 = rewards.clone(), values.clone()
    r2[mask == 0] = NAN
    v2[mask == 0] = 1e6
    a1, R1 = gae(rewards, values, mask)
    a2, R2 = gae(r2, v2, mask)
    assert torch.equal(a1, a2) and torch.equal(R1, R2)
    assert torch.all(a1[mask == 0] == 0) and torch.all(R1[mask == 0] == 0)


def test_gae_does_not_track_gradients():
    values = torch.randn(2, 3, requires_grad=True)
    adv, ret = gae(torch.randn(2, 3), values, torch.ones(2, 3))
    assert not adv.requires_grad and not ret.requires_grad


def test_group_normalized_advantages_hand_computed():
    rewards = torch.tensor([1.0, 2.0, 3.0, 0.0, 0.0, 0.0])
    # group 0: mean 2, unbiased std sqrt(((-1)^2 + 0 + 1^2) / 2) = 1 -> [-1, 0, 1]
    # group 1: all equal -> (0 - 0) / (0 + eps) = 0
    adv = group_normalized_advantages(rewards, group_size=3)
    assert close(adv, [-1.0, 0.0, 1.0, 0.0, 0.0, 0.0], tol=1e-5)
    assert close(group_normalized_advantages(rewards, 3, scale=False), [-1, 0, 1, 0, 0, 0])
    # G = 2, [0, 1]: mean 0.5; unbiased std sqrt(0.5) -> -/+ 0.5 / 0.70711 = -/+ 0.70711
    two = torch.tensor([0.0, 1.0])
    assert close(group_normalized_advantages(two, 2), [-math.sqrt(0.5), math.sqrt(0.5)], tol=1e-5)
    # biased std 0.5 -> -/+ 1
    assert close(group_normalized_advantages(two, 2, unbiased=False), [-1.0, 1.0], tol=1e-5)
    assert close(group_normalized_advantages(two, 1), [0.0, 0.0])  # G = 1 -> no signal
    with pytest.raises(ValueError):
        group_normalized_advantages(rewards, group_size=4)


def test_leave_one_out_advantages_hand_computed():
    rewards = torch.tensor([1.0, 2.0, 3.0, 5.0, 5.0, 2.0])
    # group 0: 1 - (2+3)/2 = -1.5; 2 - (1+3)/2 = 0; 3 - (1+2)/2 = 1.5
    # group 1: 5 - (5+2)/2 = 1.5; 1.5; 2 - (5+5)/2 = -3
    adv = leave_one_out_advantages(rewards, group_size=3)
    assert close(adv, [-1.5, 0.0, 1.5, 1.5, 1.5, -3.0])
    with pytest.raises(ValueError):
        leave_one_out_advantages(rewards, group_size=1)


def test_rloo_advantages_sum_to_zero_per_group():
    torch.manual_seed(0)
    for G in (2, 4, 8):
        adv = leave_one_out_advantages(torch.randn(5 * G, dtype=torch.float64), G)
        assert torch.allclose(
            adv.view(5, G).sum(1), torch.zeros(5, dtype=torch.float64), atol=1e-12
        )


def test_explained_variance_hand_computed():
    R = torch.tensor([[1.0, 2.0, 3.0, 7.0]])
    m = torch.tensor([[1, 1, 1, 0]])
    assert close(explained_variance(torch.tensor([[1.0, 2.0, 3.0, NAN]]), R, m), 1.0)  # perfect
    assert close(explained_variance(torch.tensor([[2.0, 2.0, 2.0, 0.0]]), R, m), 0.0)  # the mean
    # R - V = [0, 0, -1]: var = 2/9; Var[R] = 2/3 -> 1 - (2/9)/(2/3) = 2/3
    assert close(explained_variance(torch.tensor([[1.0, 2.0, 4.0, 0.0]]), R, m), 2.0 / 3.0)
    assert torch.isnan(explained_variance(R, torch.ones(1, 4), m.new_tensor([[1, 0, 0, 0]])))


def test_estimator_registry_names_and_token_broadcast():
    from rlhfstack.losses import ADVANTAGE_ESTIMATORS, CRITIC_FREE_ESTIMATORS

    assert set(ADVANTAGE_ESTIMATORS) == {"gae", "grpo", "rloo"}
    assert set(CRITIC_FREE_ESTIMATORS) == {"grpo", "rloo"}
    # 2 responses of one prompt (G = 2); response 0 has 2 tokens, response 1 has 1 (+ padding)
    rewards = torch.tensor([[0.5, 1.5, 9.0], [2.0, 9.0, 9.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]])
    # sequence rewards over valid tokens: 0.5 + 1.5 = 2, 2 -> equal: grpo 0 / (0 + eps) = 0
    adv, ret = ADVANTAGE_ESTIMATORS["grpo"](rewards, None, mask, group_size=2)
    assert ret is None and close(adv, [[0, 0, 0], [0, 0, 0]])
    # rloo with sequence rewards [3, 2] (first row 1 + 2): 3 - 2 = 1, 2 - 3 = -1, on valid tokens
    rewards2 = torch.tensor([[1.0, 2.0, 9.0], [2.0, 9.0, 9.0]])
    adv, ret = ADVANTAGE_ESTIMATORS["rloo"](rewards2, None, mask, group_size=2)
    assert ret is None and close(adv, [[1, 1, 0], [-1, 0, 0]])
    # gae with gamma = lam = 1, V = 0: A_t = sum of the rewards from t on; returns = A + V
    adv, ret = ADVANTAGE_ESTIMATORS["gae"](
        rewards2, torch.zeros(2, 3), mask, group_size=2, gamma=1.0, lam=1.0
    )
    assert close(adv, [[3, 2, 0], [2, 0, 0]]) and close(ret, [[3, 2, 0], [2, 0, 0]])
    with pytest.raises(ValueError, match="value"):
        ADVANTAGE_ESTIMATORS["gae"](rewards2, None, mask)
