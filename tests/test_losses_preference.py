"""Tests for rlhfstack.losses.preference: Bradley-Terry, DPO / cDPO / IPO, KTO."""

import math

import pytest
import torch
from helpers import close

from rlhfstack.losses.preference import bradley_terry_loss, dpo_loss, kto_loss, sequence_logprobs

LOG2 = math.log(2.0)


def softplus(x):  # -log sigmoid(-x) = log(1 + e^x)
    return math.log1p(math.exp(x))


def test_sequence_logprobs_sum_and_mean():
    logp = torch.tensor([[-1.0, -2.0, -3.0], [-4.0, float("nan"), 0.5]])
    m = torch.tensor([[1, 1, 1], [1, 0, 0]])
    assert close(sequence_logprobs(logp, m), [-6.0, -4.0])  # -1-2-3, -4
    assert close(sequence_logprobs(logp, m, average=True), [-2.0, -4.0])  # -6/3, -4/1


def test_bradley_terry_loss_hand_computed():
    chosen, rejected = torch.tensor([2.0, 0.0]), torch.tensor([1.0, 1.0])
    loss, stats = bradley_terry_loss(chosen, rejected)
    # diffs [1, -1]: -log sig(1) = log(1 + e^-1) = 0.313262; -log sig(-1) = 1.313262; mean 0.813262
    assert close(loss, (softplus(-1.0) + softplus(1.0)) / 2)
    assert close(loss, 0.813262, tol=1e-6)
    assert close(stats["accuracy"], 0.5)
    assert close(stats["margin_mean"], 0.0)  # (1 + -1) / 2
    # Llama-2 margin m = [0.5, 0]: logits [0.5, -1] -> (0.474077 + 1.313262) / 2 = 0.893669
    loss_m, _ = bradley_terry_loss(chosen, rejected, margin_B=torch.tensor([0.5, 0.0]))
    assert close(loss_m, 0.893669, tol=1e-6)


def test_bradley_terry_soft_labels_hand_computed():
    chosen, rejected = torch.tensor([2.0, 0.0]), torch.tensor([1.0, 1.0])
    # diffs [1, -1], p = [0.8, 0.5]; -log sig(1) = 0.313262, -log sig(-1) = 1.313262
    # pair 1: 0.8 * 0.313262 + 0.2 * 1.313262 = 0.250610 + 0.262652 = 0.513262
    # pair 2: 0.5 * 1.313262 + 0.5 * 0.313262 = 0.813262 (p = 0.5: the same for d and -d)
    loss, _ = bradley_terry_loss(chosen, rejected, p_chosen_B=torch.tensor([0.8, 0.5]))
    assert close(loss, (0.513262 + 0.813262) / 2, tol=1e-6)
    # p = 1 is the hard-label loss
    hard, _ = bradley_terry_loss(chosen, rejected)
    assert close(bradley_terry_loss(chosen, rejected, p_chosen_B=torch.ones(2))[0], hard)
    # the gradient pushes d towards logit(p): at d = logit(0.8) it is zero
    d = torch.tensor([torch.logit(torch.tensor(0.8)).item()], requires_grad=True)
    bradley_terry_loss(d, torch.zeros(1), p_chosen_B=torch.tensor([0.8]))[0].backward()
    assert abs(float(d.grad)) < 1e-6


def test_bradley_terry_loss_is_log2_for_equal_scores():
    torch.manual_seed(0)
    r = torch.randn(5)
    loss, stats = bradley_terry_loss(r, r.clone())
    assert close(loss, LOG2)
    assert stats["accuracy"] == 0  # ties are not counted as correct


def test_bradley_terry_loss_gradient_pushes_chosen_up():
    chosen = torch.tensor([0.3], requires_grad=True)
    rejected = torch.tensor([0.1], requires_grad=True)
    loss, _ = bradley_terry_loss(chosen, rejected)
    loss.backward()
    assert chosen.grad.item() < 0 < rejected.grad.item()


# h = (pc - rc) - (pr - rr) = (-1 - -2) - (-3 - -2) = 1 - (-1) = 2
PC, PR, RC, RR = (torch.tensor([v]) for v in (-1.0, -3.0, -2.0, -2.0))


def test_dpo_sigmoid_hand_computed():
    losses, cr, rr = dpo_loss(PC, PR, RC, RR, beta=0.5)
    assert close(losses, [softplus(-1.0)])  # -log sig(beta h) = -log sig(1) = 0.313262
    assert close(cr, [0.5]) and close(rr, [-0.5])  # beta * (pi - ref): 0.5 * 1, 0.5 * -1
    assert not cr.requires_grad and not rr.requires_grad


def test_dpo_conservative_label_smoothing_hand_computed():
    losses, _, _ = dpo_loss(PC, PR, RC, RR, beta=0.5, label_smoothing=0.1)
    # 0.9 * -log sig(1) + 0.1 * -log sig(-1) = 0.9 * 0.313262 + 0.1 * 1.313262 = 0.413262
    assert close(losses, [0.9 * softplus(-1.0) + 0.1 * softplus(1.0)])
    assert close(losses, [0.413262], tol=1e-6)


def test_ipo_hand_computed():
    losses, _, _ = dpo_loss(PC, PR, RC, RR, beta=0.5, loss_type="ipo")
    assert close(losses, [1.0])  # (h - 1/(2*0.5))^2 = (2 - 1)^2
    losses, _, _ = dpo_loss(PC, PR, RC, RR, beta=0.25, loss_type="ipo")
    assert close(losses, [0.0])  # (2 - 1/(2*0.25))^2 = (2 - 2)^2


def test_dpo_loss_is_log2_when_policy_equals_reference():
    torch.manual_seed(0)
    c, r = -torch.rand(4) * 20, -torch.rand(4) * 20
    for ls in (0.0, 0.2):
        losses, cr, rr = dpo_loss(c, r, c.clone(), r.clone(), beta=0.1, label_smoothing=ls)
        assert close(losses, [LOG2] * 4), ls  # -(1-e) log 1/2 - e log 1/2 = log 2
        assert torch.all(cr == 0) and torch.all(rr == 0)
    ipo, _, _ = dpo_loss(c, r, c.clone(), r.clone(), beta=0.1, loss_type="ipo")
    assert close(ipo, [25.0] * 4)  # (0 - 1/(2*0.1))^2 = 5^2


def test_dpo_gradient_raises_chosen_and_lowers_rejected():
    pc = torch.tensor([-5.0], requires_grad=True)
    pr = torch.tensor([-5.0], requires_grad=True)
    losses, _, _ = dpo_loss(pc, pr, torch.tensor([-5.0]), torch.tensor([-5.0]), beta=0.1)
    losses.sum().backward()
    # d/dpc -log sig(beta h) = -beta (1 - sig(0)) = -0.05; d/dpr = +0.05
    assert close(pc.grad, [-0.05]) and close(pr.grad, [0.05])


def test_dpo_loss_rejects_bad_arguments():
    with pytest.raises(ValueError):
        dpo_loss(PC, PR, RC, RR, loss_type="hinge-ish")
    with pytest.raises(ValueError):
        dpo_loss(PC, PR, RC, RR, beta=0.0)
    with pytest.raises(ValueError):
        dpo_loss(PC, PR, RC, RR, label_smoothing=0.5)


def sigmoid(x):
    return 1.0 / (1.0 + math.exp(-x))


def test_kto_loss_hand_computed():
    policy, ref = torch.tensor([-1.0, -1.0]), torch.tensor([-2.0, -2.0])  # r = 1 for both
    desirable = torch.tensor([True, False])
    losses, rewards = kto_loss(policy, ref, desirable, torch.tensor(0.5), beta=1.0)
    # desirable: 1 - sig(1 * (1 - 0.5)) = 1 - 0.622459 = 0.377541
    # undesirable: 1 - sig(1 * (0.5 - 1)) = 1 - 0.377541 = 0.622459
    assert close(losses, [1 - sigmoid(0.5), 1 - sigmoid(-0.5)])
    assert close(rewards, [1.0, 1.0])  # beta * r
    losses_w, _ = kto_loss(
        policy,
        ref,
        desirable,
        torch.tensor(0.5),
        beta=1.0,
        desirable_weight=2.0,
        undesirable_weight=0.5,
    )
    assert close(losses_w, [2 * (1 - sigmoid(0.5)), 0.5 * (1 - sigmoid(-0.5))])  # lambda_y - v


def test_kto_reference_point_is_clamped_and_detached():
    policy = torch.tensor([-1.0], requires_grad=True)
    z0 = torch.tensor(-1.0, requires_grad=True)
    losses, _ = kto_loss(policy, torch.tensor([-2.0]), torch.tensor([True]), z0, beta=1.0)
    assert close(losses, [1 - sigmoid(1.0)])  # z0 clamped to 0: 1 - sig(1 - 0) = 0.268941
    losses.sum().backward()
    assert z0.grad is None and policy.grad.item() < 0  # raising log pi lowers a desirable loss


def test_bradley_terry_refuses_a_margin_with_soft_labels():
    r = torch.tensor([1.0, 0.0])
    with pytest.raises(ValueError, match="not both"):
        bradley_terry_loss(r, r, margin_B=torch.ones(2), p_chosen_B=torch.full((2,), 0.7))
