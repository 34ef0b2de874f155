"""Rollout engine vs trainer mismatch: the per-token log-prob gap and its truncated importance
weights.

The tokens of a PPO batch are sampled by the rollout engine ``mu`` (the project's KV-cache loop,
vLLM in bf16, ...); the update treats them as samples of the trainer's policy at the same weights,
``pi_old`` (the trainer's own forward pass). Different kernels, precisions or sampling settings
make the two differ, and with the old log-probs recomputed by the trainer the PPO ratio
``pi / pi_old`` starts at 1 whatever that gap is. Per valid token ``t``:

* ``gap_t = log pi_old(y_t) - log mu(y_t)`` (trainer minus engine);
* ``k3_t = (e^gap_t - 1) - gap_t``, Schulman's k3 estimate of ``KL(mu || pi_old)`` from samples
  of ``mu`` (:func:`rlhfstack.losses.kl.kl_k3`), >= 0;
* truncated importance sampling (TIS; Yao et al. 2025, "Your Efficient RL Framework Secretly
  Brings You Off-Policy RL Training"): the policy loss of token ``t`` is multiplied by
  ``w_t = min(pi_old(y_t) / mu(y_t), C) = min(e^gap_t, C)``, a constant (no gradient), so the
  expectation over ``mu``'s samples approaches the one over ``pi_old``'s, with the variance
  bounded by the cap ``C``.

The statistics come as sums (and one maximum) so that data-parallel ranks can add them before
:func:`mismatch_metrics` turns them into means; entries where ``mask`` is 0 are never read
arithmetically (the convention of :mod:`rlhfstack.losses.masking`).

Shape legend: B = batch, T = response tokens.
"""

from __future__ import annotations

import math

import torch

from rlhfstack.losses.kl import kl_k3

__all__ = [
    "ROLLOUT_IS_MODES",
    "logprob_gap",
    "mismatch_metrics",
    "mismatch_sums",
    "truncated_is_weights",
]

#: ``ppo.rollout_is``: none (no correction) | token_tis (per-token truncated importance weights)
ROLLOUT_IS_MODES = ("none", "token_tis")


def logprob_gap(
    trainer_logprobs_BT: torch.Tensor, rollout_logprobs_BT: torch.Tensor, mask_BT: torch.Tensor
) -> torch.Tensor:
    """``gap_t = log pi_old(y_t) - log mu(y_t)`` on valid tokens, 0 elsewhere: ``(B, T)``."""
    mask_b = mask_BT.bool()
    zero = torch.zeros((), dtype=trainer_logprobs_BT.dtype, device=trainer_logprobs_BT.device)
    return torch.where(mask_b, trainer_logprobs_BT - rollout_logprobs_BT, zero)


def truncated_is_weights(
    trainer_logprobs_BT: torch.Tensor,
    rollout_logprobs_BT: torch.Tensor,
    mask_BT: torch.Tensor,
    cap: float,
) -> torch.Tensor:
    """Per-token TIS weights ``w_t = min(pi_old(y_t) / mu(y_t), cap)``, 1 where ``mask`` is 0.

    Computed in log space (``exp(min(gap, log cap))``) so a huge ratio cannot overflow. Where the
    two log-probs are equal, ``w_t`` is exactly 1. Returned detached: the weights scale each
    token's policy-gradient term and carry no gradient themselves.

    Args:
        trainer_logprobs_BT: (B, T) the trainer's old log-probs of the sampled tokens.
        rollout_logprobs_BT: (B, T) the rollout engine's log-probs of the same tokens.
        mask_BT: (B, T) 1 for valid response tokens.
        cap: C >= 1, the truncation (Yao et al. 2025 use 2).
    """
    if cap < 1.0:
        raise ValueError(f"cap must be >= 1 (a weight of 1 is no correction), got {cap}")
    gap = logprob_gap(trainer_logprobs_BT.detach(), rollout_logprobs_BT.detach(), mask_BT)
    return torch.exp(gap.clamp(max=math.log(cap)))  # min(e^gap, C); e^0 = 1 on padding


def mismatch_sums(
    trainer_logprobs_BT: torch.Tensor,
    rollout_logprobs_BT: torch.Tensor,
    mask_BT: torch.Tensor,
    threshold: float,
    cap: float | None = None,
) -> dict[str, float]:
    """Sums over the valid tokens of one batch (add them over ranks, then :func:`mismatch_metrics`).

    Returns ``tokens`` (count), ``abs_gap_sum`` (sum |gap|), ``gap_sum`` (sum gap), ``k3_sum``
    (sum k3), ``above`` (count of |gap| > ``threshold``), ``abs_gap_max`` (a maximum: reduce it
    with max, 0 without valid tokens) and, with ``cap``, ``is_weight_sum`` (sum of the truncated
    weights) and ``is_capped`` (count of tokens whose ratio exceeds ``cap``).
    """
    mask_b = mask_BT.bool()
    t = trainer_logprobs_BT.detach().double()
    r = rollout_logprobs_BT.detach().double()
    gap = logprob_gap(t, r, mask_b)
    zero = torch.zeros((), dtype=gap.dtype, device=gap.device)
    k3 = torch.where(mask_b, kl_k3(r, t), zero)  # (e^gap - 1) - gap, gap = log(pi_old / mu)
    out = {
        "tokens": float(mask_b.sum()),
        "abs_gap_sum": float(gap.abs().sum()),
        "gap_sum": float(gap.sum()),
        "k3_sum": float(k3.sum()),
        "above": float((mask_b & (gap.abs() > threshold)).sum()),
        "abs_gap_max": float(gap.abs().max()) if gap.numel() else 0.0,
    }
    if cap is not None:
        w = truncated_is_weights(t, r, mask_b, cap)
        out["is_weight_sum"] = float(torch.where(mask_b, w, zero).sum())
        out["is_capped"] = float((mask_b & (gap > math.log(cap))).sum())
    return out


def mismatch_metrics(sums: dict[str, float]) -> dict[str, float]:
    """The logged ``mismatch/*`` row from (rank-summed) :func:`mismatch_sums`: means per valid
    token (0 without valid tokens).

    ``logp_gap_mean`` = mean |gap| (nats), ``logp_gap_signed_mean`` = mean gap (> 0: the trainer
    gives the sampled tokens more probability than the engine did), ``logp_gap_max`` = max |gap|,
    ``frac_above`` = share of tokens with |gap| above the threshold, ``kl_k3`` = mean k3 (an
    estimate of ``KL(mu || pi_old)`` per token); with a cap, ``is_weight_mean`` (mean truncated
    weight) and ``is_capped_frac`` (share of tokens whose weight was cut to the cap).
    """
    n = max(sums["tokens"], 1.0)
    out = {
        "mismatch/logp_gap_mean": sums["abs_gap_sum"] / n,
        "mismatch/logp_gap_signed_mean": sums["gap_sum"] / n,
        "mismatch/logp_gap_max": sums["abs_gap_max"],
        "mismatch/frac_above": sums["above"] / n,
        "mismatch/kl_k3": sums["k3_sum"] / n,
    }
    if "is_weight_sum" in sums:
        out["mismatch/is_weight_mean"] = sums["is_weight_sum"] / n if sums["tokens"] else 1.0
        out["mismatch/is_capped_frac"] = sums["is_capped"] / n
    return out
