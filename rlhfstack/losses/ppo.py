"""PPO clipped surrogate policy loss, clipped value loss and entropy bonus.

Schulman et al. 2017, "Proximal Policy Optimization Algorithms", eq. 7 (clipped surrogate) and
eq. 9 (combined objective), applied per token as in Ziegler et al. 2019 / Ouyang et al. 2022.

Reduction: a token-level mean over valid tokens of the *local* batch, or, when ``normalizer`` is
given (e.g. the number of valid tokens across all micro-batches / ranks of one optimizer step),
``masked_sum / normalizer`` so that gradient accumulation reproduces the global token mean.

Shape legend: B = batch, T = response tokens.
"""

from __future__ import annotations

import torch

from rlhfstack.losses.masking import masked_mean, masked_sum

__all__ = ["ppo_policy_loss", "ppo_value_loss", "entropy_bonus"]


def _reduce(x_BT: torch.Tensor, mask_BT: torch.Tensor, normalizer: float | None) -> torch.Tensor:
    if normalizer is None:
        return masked_mean(x_BT, mask_BT)  # sum(m * x) / sum(m)
    if normalizer <= 0:
        raise ValueError(f"normalizer must be > 0, got {normalizer}")
    return masked_sum(x_BT, mask_BT) / normalizer  # sum(m * x) / N_global


def ppo_policy_loss(
    logprobs_BT: torch.Tensor,
    old_logprobs_BT: torch.Tensor,
    advantages_BT: torch.Tensor,
    mask_BT: torch.Tensor,
    clip_eps: float = 0.2,
    normalizer: float | None = None,
    clip_eps_high: float | None = None,
    is_weights_BT: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """PPO clipped surrogate loss, Schulman et al. 2017 eq. 7 (negated, to minimise).

    ``rho_t = exp(log pi(a_t) - log pi_old(a_t))``;
    ``L_t = max(-A_t rho_t, -A_t clip(rho_t, 1 - eps, 1 + eps))``; loss = mean of ``L_t`` over
    valid tokens (or ``sum / normalizer``).

    ``old_logprobs_BT`` and ``advantages_BT`` are treated as constants (detached).

    Args:
        logprobs_BT: (B, T) log-probs of the taken tokens under the current policy (with grad).
        old_logprobs_BT: (B, T) log-probs under the behaviour policy (rollout time).
        advantages_BT: (B, T) advantage estimates (already whitened if desired).
        mask_BT: (B, T) 1 for valid response tokens.
        clip_eps: epsilon of the clip range.
        normalizer: if given, divide the masked sum by this (global valid-token count).
        clip_eps_high: optional separate upper epsilon (``clip(rho, 1 - eps, 1 + eps_high)``,
            "clip-higher" of DAPO, Yu et al. 2025). ``None`` means symmetric.
        is_weights_BT: optional (B, T) constant per-token weights ``w_t`` (detached), the loss
            becoming the mean of ``w_t * L_t``: the truncated importance weights of the rollout
            engine vs trainer correction (:func:`rlhfstack.losses.mismatch.truncated_is_weights`).
            The statistics below stay those of the unweighted ratio.

    Returns:
        ``(loss, stats)``: 0-dim loss; stats is a dict of detached 0-dim tensors over valid tokens:
        ``approx_kl`` = mean((rho - 1) - log rho) (k3 of pi_old vs pi), ``clipfrac`` = fraction of
        tokens where the clipped term is the active (larger) one, i.e. whose gradient is zeroed,
        ``ratio_mean``, ``ratio_max``.
    """
    eps_high = clip_eps if clip_eps_high is None else clip_eps_high
    mask_b = mask_BT.bool()
    zero = torch.zeros((), dtype=logprobs_BT.dtype, device=logprobs_BT.device)
    # Neutralise padded positions *before* any arithmetic (ratio 1, advantage 0) so that garbage
    # there (inf / NaN / huge log-ratios) cannot produce NaN in the loss or its gradient.
    advantages_BT = torch.where(mask_b, advantages_BT.detach().to(logprobs_BT.dtype), zero)
    log_ratio = torch.where(mask_b, logprobs_BT - old_logprobs_BT.detach(), zero)
    ratio = torch.exp(log_ratio)  # rho = pi / pi_old
    loss_unclipped = -advantages_BT * ratio  # -A rho
    clipped_ratio = torch.clamp(ratio, 1.0 - clip_eps, 1.0 + eps_high)  # clip(rho, 1-e, 1+e)
    loss_clipped = -advantages_BT * clipped_ratio  # -A clip(rho)
    per_token = torch.maximum(loss_unclipped, loss_clipped)  # max(-A rho, -A clip(rho))
    if is_weights_BT is not None:  # w_t * L_t (TIS: w = min(pi_old / mu, C))
        one = torch.ones((), dtype=per_token.dtype, device=per_token.device)
        per_token = per_token * torch.where(mask_b, is_weights_BT.detach().to(per_token.dtype), one)
    loss = _reduce(per_token, mask_BT, normalizer)

    with torch.no_grad():
        neg_inf = torch.full_like(ratio, float("-inf"))
        stats = {
            "approx_kl": masked_mean((ratio - 1.0) - log_ratio, mask_b),  # k3: (rho-1) - log rho
            "clipfrac": masked_mean((loss_clipped > loss_unclipped).to(ratio.dtype), mask_b),
            "ratio_mean": masked_mean(ratio, mask_b),
            "ratio_max": torch.where(mask_b, ratio, neg_inf).max(),
        }
    return loss, {k: v.detach() for k, v in stats.items()}


def ppo_value_loss(
    values_BT: torch.Tensor,
    old_values_BT: torch.Tensor,
    returns_BT: torch.Tensor,
    mask_BT: torch.Tensor,
    clip_range: float | None = 0.2,
    normalizer: float | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Clipped value loss (PPO2 / Ziegler et al. 2019 reference implementation).

    ``v_clip = v_old + clip(v - v_old, -c, c)``;
    ``L_t = 0.5 * max((v - R)^2, (v_clip - R)^2)``; loss = mean over valid tokens (or
    ``sum / normalizer``). ``clip_range=None`` gives the plain ``0.5 (v - R)^2``.

    Args:
        values_BT: (B, T) current value predictions (with grad).
        old_values_BT: (B, T) value predictions at rollout time.
        returns_BT: (B, T) return targets (from :func:`~rlhfstack.losses.advantages.gae`).
        mask_BT: (B, T) 1 for valid response tokens.
        clip_range: c, the value clip range (in reward units), or ``None``.
        normalizer: if given, divide the masked sum by this (global valid-token count).

    Returns:
        ``(loss, stats)``: stats (detached 0-dim tensors): ``vf_clipfrac`` (fraction of valid
        tokens where the clipped error is the larger one), ``value_mean``, ``value_error`` (mean
        squared error (v - R)^2).
    """
    mask_b = mask_BT.bool()
    zero = torch.zeros((), dtype=values_BT.dtype, device=values_BT.device)
    # Zero padded positions before any arithmetic so garbage there cannot reach the gradient.
    values_BT = torch.where(mask_b, values_BT, zero)
    old_values_BT = torch.where(mask_b, old_values_BT.detach().to(values_BT.dtype), zero)
    returns_BT = torch.where(mask_b, returns_BT.detach().to(values_BT.dtype), zero)
    err_unclipped = (values_BT - returns_BT).square()  # (v - R)^2
    if clip_range is None:
        per_token = 0.5 * err_unclipped
        clipped_active = torch.zeros_like(err_unclipped, dtype=torch.bool)
    else:
        v_clip = old_values_BT + torch.clamp(values_BT - old_values_BT, -clip_range, clip_range)
        err_clipped = (v_clip - returns_BT).square()  # (clip(v, v_old +- c) - R)^2
        per_token = 0.5 * torch.maximum(err_unclipped, err_clipped)  # 0.5 max(., .)
        clipped_active = err_clipped > err_unclipped
    loss = _reduce(per_token, mask_BT, normalizer)
    with torch.no_grad():
        stats = {
            "vf_clipfrac": masked_mean(clipped_active.to(err_unclipped.dtype), mask_b),
            "value_mean": masked_mean(values_BT, mask_b),
            "value_error": masked_mean(err_unclipped, mask_b),
        }
    return loss, {k: v.detach() for k, v in stats.items()}


def entropy_bonus(
    entropy_BT: torch.Tensor, mask_BT: torch.Tensor, normalizer: float | None = None
) -> torch.Tensor:
    """Mean per-token entropy over valid tokens, the ``S[pi](s_t)`` term of Schulman 2017 eq. 9.

    The caller *subtracts* ``c_ent * entropy_bonus(...)`` from the loss to encourage exploration.

    Args:
        entropy_BT: (B, T) per-token entropies (e.g. from ``entropy_from_logits``).
        mask_BT: (B, T) 1 for valid response tokens.
        normalizer: if given, divide the masked sum by this instead of the local count.

    Returns:
        0-dim tensor.
    """
    return _reduce(entropy_BT, mask_BT, normalizer)
