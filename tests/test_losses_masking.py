"""Tests for rlhfstack.losses.masking (hand-computed values, arithmetic in comments)."""

import math

import pytest
import torch
from helpers import close

from rlhfstack.losses.masking import (
    entropy_from_logits,
    logprobs_from_logits,
    masked_mean,
    masked_sum,
    masked_var,
    masked_whiten,
)

NAN = float("nan")


X = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
M = torch.tensor([[1, 1, 0], [1, 0, 0]])


def test_masked_sum_hand_computed():
    assert close(masked_sum(X, M), 7.0)  # 1 + 2 + 4
    assert close(masked_sum(X, M, dim=-1), [3.0, 4.0])  # row0: 1 + 2, row1: 4
    assert close(masked_sum(X, M.bool(), dim=0), [5.0, 2.0, 0.0])  # columns: 1+4, 2, -


def test_masked_mean_hand_computed_and_empty_rows_are_zero():
    assert close(masked_mean(X, M), 7.0 / 3.0)  # (1 + 2 + 4) / 3
    assert close(masked_mean(X, M, dim=-1), [1.5, 4.0])  # (1+2)/2, 4/1
    empty = torch.tensor([[1, 0, 0], [0, 0, 0]])
    assert close(masked_mean(X, empty, dim=-1), [1.0, 0.0])  # empty row -> 0, not NaN


def test_masked_reductions_ignore_nan_in_padding():
    x = torch.tensor([[1.0, 2.0, NAN], [4.0, math.inf, -math.inf]])
    assert close(masked_sum(x, M), 7.0)
    assert close(masked_mean(x, M), 7.0 / 3.0)
    assert torch.isfinite(masked_var(x, M))


def test_masked_var_hand_computed():
    # valid {1, 2, 4}: mean 7/3; deviations -4/3, -1/3, 5/3; squares 16/9 + 1/9 + 25/9 = 42/9
    assert close(masked_var(X, M, unbiased=False), 42.0 / 9.0 / 3.0)  # 14/9
    assert close(masked_var(X, M, unbiased=True), 42.0 / 9.0 / 2.0)  # 7/3
    # single valid entry: Bessel skipped -> 0 (not NaN / inf)
    assert close(masked_var(X, torch.tensor([[1, 0, 0], [0, 0, 0]])), 0.0)


def test_masked_whiten_hand_computed():
    x = torch.tensor([1.0, 2.0, 3.0, 100.0])
    m = torch.tensor([1, 1, 1, 0])
    # mean 2, unbiased var ((-1)^2 + 0 + 1^2) / 2 = 1 -> (x - 2) / 1; padding -> 0
    assert close(masked_whiten(x, m), [-1.0, 0.0, 1.0, 0.0], tol=1e-6)
    assert close(masked_whiten(x, m, shift_mean=False), [1.0, 2.0, 3.0, 0.0], tol=1e-6)


def test_masked_whiten_padding_values_change_nothing():
    torch.manual_seed(0)
    x = torch.randn(3, 5)
    m = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]])
    y = x.clone()
    y[m == 0] = torch.tensor([NAN, 1e6, -3.0, 7.0, NAN, 2.0, 0.0][: int((m == 0).sum())])
    out_x, out_y = masked_whiten(x, m), masked_whiten(y, m)
    assert torch.equal(out_x, out_y)
    assert close(masked_mean(out_x, m), 0.0, tol=1e-6)
    assert close(masked_var(out_x, m), 1.0, tol=1e-5)
    assert torch.all(out_x[m == 0] == 0)


def test_logprobs_from_logits_hand_computed():
    logits = torch.tensor([[[0.0, 0.0], [0.0, math.log(3.0)]]])  # (B=1, T=2, V=2)
    labels = torch.tensor([[0, 1]])
    # t0: softmax([0,0]) = [1/2, 1/2] -> log(1/2); t1: softmax([0, ln3]) = [1/4, 3/4] -> log(3/4)
    assert close(logprobs_from_logits(logits, labels), [[math.log(0.5), math.log(0.75)]])
    # temperature 2 on [0, 2 ln3] gives [0, ln3] -> p(1) = 3/4
    logits_t = torch.tensor([[[0.0, 2.0 * math.log(3.0)]]])
    assert close(
        logprobs_from_logits(logits_t, torch.tensor([[1]]), temperature=2.0), [[math.log(0.75)]]
    )
    assert close(logits_t, [[[0.0, 2.0 * math.log(3.0)]]])  # input not modified in place


def test_logprobs_from_logits_matches_log_softmax_chunked_and_grad():
    torch.manual_seed(0)
    logits = torch.randn(3, 4, 11, dtype=torch.float64, requires_grad=True)
    labels = torch.randint(0, 11, (3, 4))
    ref = torch.log_softmax(logits / 0.7, dim=-1).gather(-1, labels.unsqueeze(-1)).squeeze(-1)
    for chunk in (11, 22, 5 * 11, 2**26):  # 1 row, 2 rows, 5 rows, everything per chunk
        out = logprobs_from_logits(logits, labels, temperature=0.7, max_chunk_numel=chunk)
        assert out.shape == (3, 4)
        assert torch.allclose(out, ref, atol=1e-12)
    (g_ref,) = torch.autograd.grad(ref.sum(), logits)
    out = logprobs_from_logits(logits, labels, temperature=0.7, max_chunk_numel=22)
    (g_out,) = torch.autograd.grad(out.sum(), logits)
    assert torch.allclose(g_out, g_ref, atol=1e-12)


def test_logprobs_from_logits_ignore_index_and_bf16_upcast():
    torch.manual_seed(0)
    logits = torch.randn(2, 3, 7).to(torch.bfloat16)
    labels = torch.tensor([[1, 2, -100], [0, -100, -100]])
    out = logprobs_from_logits(logits, labels)
    assert out.dtype == torch.float32
    assert torch.all(out[labels == -100] == 0)
    ref = torch.log_softmax(logits.float(), -1).gather(-1, labels.clamp(min=0).unsqueeze(-1))
    assert torch.allclose(out[labels != -100], ref.squeeze(-1)[labels != -100], atol=1e-5)
    with pytest.raises(ValueError):
        logprobs_from_logits(logits, labels[:, :2])


def test_entropy_from_logits_hand_computed_and_matches_categorical():
    logits = torch.tensor([[[0.0, 0.0, 0.0, 0.0], [0.0, math.log(3.0), -math.inf, -math.inf]]])
    # uniform over 4 -> ln 4; [1/4, 3/4, 0, 0] -> -(1/4 ln 1/4 + 3/4 ln 3/4) = 0.562335
    expected = [[math.log(4.0), -(0.25 * math.log(0.25) + 0.75 * math.log(0.75))]]
    assert close(entropy_from_logits(logits), expected, tol=1e-6)
    torch.manual_seed(0)
    z = torch.randn(2, 5, 13, dtype=torch.float64)
    ref = torch.distributions.Categorical(logits=z / 1.3).entropy()
    assert torch.allclose(
        entropy_from_logits(z, temperature=1.3, max_chunk_numel=26), ref, atol=1e-12
    )


def _entropy_plain(z: torch.Tensor, tau: float) -> torch.Tensor:
    """The formula through plain autograd (keeps p alive): the reference for the custom backward."""
    z = z / tau
    lse = torch.logsumexp(z, -1, keepdim=True)
    p = torch.exp(z - lse)
    return lse.squeeze(-1) - torch.where(p > 0, p * z, torch.zeros((), dtype=z.dtype)).sum(-1)


def test_entropy_gradient_matches_plain_autograd_chunked_and_masked():
    torch.manual_seed(0)
    z = torch.randn(3, 4, 11, dtype=torch.float64)
    z[0, 1, 3:] = -math.inf  # masked vocabulary entries: gradient 0 there, no NaN anywhere
    w = torch.randn(3, 4, dtype=torch.float64)  # upstream gradient
    z_ref = z.clone().requires_grad_(True)
    (g_ref,) = torch.autograd.grad((_entropy_plain(z_ref, 0.7) * w).sum(), z_ref)
    # plain autograd gives NaN on the masked row (0 * -inf in the backward of p * z); its
    # reference is the same row without the masked entries
    z_row = z[0, 1, :3].clone().requires_grad_(True)
    (g_row,) = torch.autograd.grad(_entropy_plain(z_row, 0.7) * w[0, 1], z_row)
    assert torch.isnan(g_ref[0, 1]).all()
    g_ref[0, 1] = 0.0
    g_ref[0, 1, :3] = g_row
    for chunk in (11, 22, 5 * 11, 2**26):
        z_new = z.clone().requires_grad_(True)
        out = entropy_from_logits(z_new, temperature=0.7, max_chunk_numel=chunk)
        (g_new,) = torch.autograd.grad((out * w).sum(), z_new)
        assert torch.allclose(out, _entropy_plain(z, 0.7), atol=1e-12)
        assert torch.allclose(g_new, g_ref, atol=1e-12)
        assert torch.all(g_new[0, 1, 3:] == 0)
    # gradcheck of the custom backward (float64, temperature != 1)
    zc = torch.randn(2, 3, 5, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: entropy_from_logits(t, 1.3, 10), (zc,))
    # bf16 logits: float32 entropy, gradient in bf16 close to the float32 one
    zb = torch.randn(2, 3, 7).to(torch.bfloat16).requires_grad_(True)
    eb = entropy_from_logits(zb)
    assert eb.dtype == torch.float32
    (gb,) = torch.autograd.grad(eb.sum(), zb)
    zf = zb.detach().float().requires_grad_(True)
    (gf,) = torch.autograd.grad(_entropy_plain(zf, 1.0).sum(), zf)
    assert gb.dtype == torch.bfloat16 and torch.allclose(gb.float(), gf, atol=1e-2)


def test_logprobs_gradient_custom_backward_matches_log_softmax_and_gradcheck():
    torch.manual_seed(0)
    z = torch.randn(3, 4, 11, dtype=torch.float64)
    labels = torch.randint(0, 11, (3, 4))
    labels[1, 2] = -100  # ignored: log-prob 0, no gradient
    w = torch.randn(3, 4, dtype=torch.float64)
    z_ref = z.clone().requires_grad_(True)
    lsm = torch.log_softmax(z_ref / 0.7, -1).gather(-1, labels.clamp(min=0).unsqueeze(-1))
    ref = torch.where(labels == -100, torch.zeros(()), lsm.squeeze(-1))
    (g_ref,) = torch.autograd.grad((ref * w).sum(), z_ref)
    for chunk in (11, 33, 2**22):  # 1 row, 3 rows, everything per chunk
        z_new = z.clone().requires_grad_(True)
        out = logprobs_from_logits(z_new, labels, temperature=0.7, max_chunk_numel=chunk)
        (g_new,) = torch.autograd.grad((out * w).sum(), z_new)
        assert torch.allclose(out, ref, atol=1e-12)
        assert torch.allclose(g_new, g_ref, atol=1e-12)
        assert torch.all(g_new[1, 2] == 0)
    zc = torch.randn(2, 3, 5, dtype=torch.float64, requires_grad=True)
    lab = torch.randint(0, 5, (2, 3))
    assert torch.autograd.gradcheck(lambda t: logprobs_from_logits(t, lab, 1.3, None, 10), (zc,))
