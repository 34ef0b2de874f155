"""Tests for rlhfstack.losses.kl: KL estimators (Schulman 2020) and KL controllers (Ziegler 2019)."""

import math

import pytest
import torch
from helpers import close

from rlhfstack.losses.kl import (
    AdaptiveKLController,
    FixedKLController,
    kl_estimate,
    kl_k1,
    kl_k2,
    kl_k3,
)

LOGP = torch.tensor([-1.0, -2.0])
REF = torch.tensor([-1.5, -1.0])
# log r = ref - logp = [-0.5, 1.0]


def test_kl_k1_hand_computed():
    assert close(kl_k1(LOGP, REF), [0.5, -1.0])  # -log r


def test_kl_k2_hand_computed():
    assert close(kl_k2(LOGP, REF), [0.125, 0.5])  # 0.5 * 0.25, 0.5 * 1


def test_kl_k3_hand_computed():
    # (r - 1) - log r: e^-0.5 - 1 + 0.5 = 0.106531; e^1 - 1 - 1 = 0.718282
    assert close(kl_k3(LOGP, REF), [math.exp(-0.5) - 0.5, math.e - 2.0])
    # clamping log r to [-0.5, 0.5]: second entry becomes e^0.5 - 1 - 0.5 = 0.148721
    assert close(kl_k3(LOGP, REF, max_log_ratio=0.5), [math.exp(-0.5) - 0.5, math.exp(0.5) - 1.5])


def test_kl_estimate_dispatch_and_unknown_name():
    for name, fn in (("k1", kl_k1), ("k2", kl_k2), ("k3", kl_k3)):
        assert torch.equal(kl_estimate(LOGP, REF, name), fn(LOGP, REF))
    with pytest.raises(ValueError, match="unknown KL estimator"):
        kl_estimate(LOGP, REF, "k4")


def test_kl_is_zero_when_policy_equals_reference_all_estimators():
    torch.manual_seed(0)
    logp = -torch.rand(4, 6) * 5
    for name in ("k1", "k2", "k3"):
        assert torch.all(kl_estimate(logp, logp.clone(), name) == 0), name


def test_k3_and_k2_are_nonnegative_always():
    torch.manual_seed(0)
    logp = torch.randn(10_000) * 5
    ref = torch.randn(10_000) * 5
    assert torch.all(kl_k3(logp, ref) >= 0)
    assert torch.all(kl_k2(logp, ref) >= 0)
    assert torch.any(kl_k1(logp, ref) < 0)  # k1 is unbiased but not per-token non-negative


def test_k1_and_k3_match_true_kl_in_expectation_monte_carlo():
    gen = torch.Generator().manual_seed(0)
    p_logits = torch.randn(6, generator=gen, dtype=torch.float64)
    q_logits = p_logits + 0.5 * torch.randn(6, generator=gen, dtype=torch.float64)
    logp_all, logq_all = torch.log_softmax(p_logits, 0), torch.log_softmax(q_logits, 0)
    true_kl = (logp_all.exp() * (logp_all - logq_all)).sum()  # KL(p || q) exactly
    tokens = torch.multinomial(logp_all.exp(), 200_000, replacement=True, generator=gen)
    logp, logq = logp_all[tokens], logq_all[tokens]
    assert abs(kl_k1(logp, logq).mean() - true_kl) < 0.1 * true_kl + 2e-3
    assert abs(kl_k3(logp, logq).mean() - true_kl) < 0.1 * true_kl + 2e-3


def test_adaptive_kl_controller_hand_computed_update():
    ctl = AdaptiveKLController(init_kl_coef=0.1, target=6.0, horizon=10_000)
    assert ctl.value == 0.1
    # e = 6.6 / 6 - 1 = 0.1 (inside clip); beta = 0.1 * (1 + 0.1 * 1000 / 10000) = 0.101
    assert math.isclose(ctl.update(6.6, n_steps=1000), 0.101, rel_tol=1e-12)
    assert math.isclose(ctl.value, 0.101, rel_tol=1e-12)


def test_adaptive_kl_controller_error_is_clipped_at_plus_minus_0_2():
    up = AdaptiveKLController(0.1, target=6.0, horizon=10_000)
    # e = 60/6 - 1 = 9 -> clipped to 0.2; beta = 0.1 * (1 + 0.2 * 0.1) = 0.102
    assert math.isclose(up.update(60.0, 1000), 0.102, rel_tol=1e-12)
    down = AdaptiveKLController(0.1, target=6.0, horizon=10_000)
    # e = 0/6 - 1 = -1 -> clipped to -0.2; beta = 0.1 * (1 - 0.2 * 0.1) = 0.098
    assert math.isclose(down.update(0.0, 1000), 0.098, rel_tol=1e-12)
    # a tensor KL is accepted too
    assert math.isclose(down.update(torch.tensor(6.0), 1000), 0.098, rel_tol=1e-12)  # e = 0


def test_fixed_kl_controller_stays_fixed():
    ctl = FixedKLController(0.05)
    for kl in (0.0, 6.0, 1e6):
        assert ctl.update(kl, 512) == 0.05
    assert ctl.value == 0.05


def test_kl_controller_state_dict_round_trip():
    ctl = AdaptiveKLController(0.2, target=3.0, horizon=5000)
    ctl.update(4.0, 256)
    resumed = AdaptiveKLController(0.7, target=1.0, horizon=10)
    resumed.load_state_dict(ctl.state_dict())
    assert resumed.state_dict() == ctl.state_dict()
    assert ctl.update(2.5, 128) == resumed.update(2.5, 128)
    fixed = FixedKLController(0.3)
    fixed2 = FixedKLController(0.0)
    fixed2.load_state_dict(fixed.state_dict())
    assert fixed2.value == 0.3


def test_adaptive_kl_controller_rejects_bad_args():
    with pytest.raises(ValueError):
        AdaptiveKLController(0.1, target=0.0, horizon=10)
    with pytest.raises(ValueError):
        AdaptiveKLController(0.1, target=1.0, horizon=0)


def test_kl_full_from_logits_hand_computed():
    from rlhfstack.losses import kl_full_from_logits

    # policy logits [0, ln 3] -> p = [1/4, 3/4]; reference q = [1/2, 1/2]
    # KL = 1/4 ln(1/4 / 1/2) + 3/4 ln(3/4 / 1/2) = 0.25 ln 0.5 + 0.75 ln 1.5 = 0.1308120
    logits = torch.tensor([[[0.0, math.log(3.0)]]])
    ref = torch.log(torch.tensor([[[0.5, 0.5]]]))
    got = kl_full_from_logits(logits, ref)
    assert got.shape == (1, 1)
    assert got.item() == pytest.approx(0.25 * math.log(0.5) + 0.75 * math.log(1.5), abs=1e-6)
    # temperature divides the policy logits: T=ln 3 turns [0, ln 3] into [0, 1]
    z = torch.tensor([0.0, 1.0])
    p = torch.softmax(z, -1)
    want = float((p * (p.log() - ref[0, 0])).sum())
    assert kl_full_from_logits(logits, ref, temperature=math.log(3.0)).item() == pytest.approx(
        want, abs=1e-6
    )


def test_kl_full_is_zero_against_itself_and_nonnegative():
    from rlhfstack.losses import kl_full_from_logits

    torch.manual_seed(0)
    logits = torch.randn(2, 3, 7)
    same = torch.log_softmax(logits / 0.7, -1)
    assert torch.allclose(kl_full_from_logits(logits, same, 0.7), torch.zeros(2, 3), atol=1e-6)
    other = torch.log_softmax(torch.randn(2, 3, 7), -1)
    assert (kl_full_from_logits(logits, other) >= -1e-7).all()
