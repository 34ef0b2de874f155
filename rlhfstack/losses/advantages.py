"""Rewards shaping and advantage estimators: KL-shaped token rewards, GAE, GRPO, RLOO.

:data:`ADVANTAGE_ESTIMATORS` names the token-level estimators PPO chooses from
(``ppo.advantage_estimator``); each maps per-token rewards (and values, for ``gae``) to per-token
advantages and, where a value model is trained, its return targets.

Shape legend: B = batch (number of sampled responses), T = response tokens, G = group size
(responses sampled per prompt).

Grouped estimators (GRPO / RLOO) assume the batch is laid out *group-contiguous*: the G samples of
prompt 0 first, then the G samples of prompt 1, ... i.e. ``rewards_B.view(B // G, G)`` puts one
prompt's samples in each row.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from rlhfstack.losses.kl import kl_estimate
from rlhfstack.losses.masking import masked_var

__all__ = [
    "last_token_index",
    "kl_shaped_rewards",
    "gae",
    "group_normalized_advantages",
    "leave_one_out_advantages",
    "explained_variance",
    "ADVANTAGE_ESTIMATORS",
    "CRITIC_FREE_ESTIMATORS",
    "gae_advantages",
    "grpo_advantages",
    "rloo_advantages",
]


def last_token_index(mask_BT: torch.Tensor) -> torch.Tensor:
    """Index of the last valid (non-zero) position in each row.

    Args:
        mask_BT: (B, T) bool or 0/1 mask.

    Returns:
        (B,) int64 indices; rows with no valid token get ``-1`` (callers that need a position must
        check for it, see :func:`kl_shaped_rewards`).
    """
    mask_b = mask_BT.bool()
    positions = torch.arange(mask_b.shape[-1], device=mask_b.device).expand_as(mask_b)
    minus_one = torch.full_like(positions, -1)
    return torch.where(mask_b, positions, minus_one).max(dim=-1).values  # max{t : m_t = 1}


def kl_shaped_rewards(
    scores_B: torch.Tensor,
    logprobs_BT: torch.Tensor,
    ref_logprobs_BT: torch.Tensor,
    response_mask_BT: torch.Tensor,
    kl_coef: float | torch.Tensor,
    estimator: str = "k1",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token rewards with a KL penalty, Ziegler et al. 2019 sec. 2 / Stiennon et al. 2020 eq. 1.

    ``R(x, y) = r(x, y) - beta * KL``, distributed over tokens: every valid response token gets
    ``-beta * kl_t`` and the sequence score ``r(x, y)`` is added on the **last valid response
    token** of each row (the EOS token for finished rows, the final generated token for rows
    truncated at the length limit). Padding positions are exactly 0.

    Args:
        scores_B: (B,) sequence-level reward-model scores.
        logprobs_BT: (B, T) policy log-probs of the sampled response tokens (at rollout time).
        ref_logprobs_BT: (B, T) reference-model log-probs of the same tokens.
        response_mask_BT: (B, T) 1 for response tokens, 0 for padding. Every row must contain at
            least one valid token (a ``ValueError`` is raised otherwise, since the score would
            have nowhere to go).
        kl_coef: beta, a float or 0-dim tensor.
        estimator: per-token KL estimator, ``"k1"`` (default, as in Ziegler 2019), ``"k2"``, ``"k3"``.

    Returns:
        ``(rewards_BT, kl_BT)``: the shaped rewards and the per-token KL estimate, both 0 on
        padding.
    """
    mask_b = response_mask_BT.bool()
    last_idx = last_token_index(mask_b)
    if bool((last_idx < 0).any()):
        bad = torch.nonzero(last_idx < 0).flatten().tolist()
        raise ValueError(f"rows {bad} of response_mask have no valid token; cannot place score")
    kl_BT = kl_estimate(logprobs_BT, ref_logprobs_BT, estimator)
    kl_BT = torch.where(mask_b, kl_BT, torch.zeros_like(kl_BT))
    rewards_BT = -kl_coef * kl_BT  # r_t = -beta * KL_t on every valid response token
    # r_{t_last} += score  (score on the last valid response token)
    rewards_BT = rewards_BT.scatter_add(
        1, last_idx.unsqueeze(1), scores_B.to(rewards_BT.dtype).reshape(-1, 1)
    )
    return rewards_BT, kl_BT


@torch.no_grad()
def gae(
    rewards_BT: torch.Tensor,
    values_BT: torch.Tensor,
    mask_BT: torch.Tensor,
    gamma: float = 1.0,
    lam: float = 0.95,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalized Advantage Estimation, Schulman et al. 2016 eq. 16.

    ``delta_t = r_t + gamma V(s_{t+1}) - V(s_t)``;  ``A_t = delta_t + gamma lam A_{t+1}``.

    A reverse loop over T, vectorised over B. Only valid positions are steps of the episode:
    masked positions are skipped (the recursion carries ``A`` and ``V(s_{t+1})`` across them), so
    right padding, left padding and holes are all handled; ``V(s) = 0`` after the last valid
    token (the episode ends there). Values/rewards at masked positions are never read.

    Runs under ``torch.no_grad``: advantages and returns are regression / policy-gradient targets.

    Args:
        rewards_BT: (B, T) per-token rewards (e.g. from :func:`kl_shaped_rewards`).
        values_BT: (B, T) value-head predictions V(s_t) at rollout time.
        mask_BT: (B, T) 1 for valid response tokens.
        gamma: discount factor.
        lam: GAE lambda.

    Returns:
        ``(advantages_BT, returns_BT)`` with ``returns = advantages + values`` (before any
        whitening); both 0 at masked positions; dtype is at least float32.
    """
    mask_b = mask_BT.bool()
    # accumulate in at least float32 (bf16 value heads would lose precision over long T)
    dtype = torch.promote_types(
        torch.promote_types(values_BT.dtype, rewards_BT.dtype), torch.float32
    )
    zero = torch.zeros((), dtype=dtype, device=values_BT.device)
    rewards = torch.where(mask_b, rewards_BT.to(dtype), zero)
    values = torch.where(mask_b, values_BT.to(dtype), zero)
    batch, length = values.shape
    next_value = values.new_zeros(batch)  # V(s_{t+1}); 0 beyond the last valid token
    last_adv = values.new_zeros(batch)  # A_{t+1}
    adv_reversed = []
    for t in reversed(range(length)):
        m = mask_b[:, t]
        delta = rewards[:, t] + gamma * next_value - values[:, t]  # r_t + g V_{t+1} - V_t
        adv_t = delta + gamma * lam * last_adv  # A_t = delta_t + g lam A_{t+1}
        last_adv = torch.where(m, adv_t, last_adv)
        next_value = torch.where(m, values[:, t], next_value)
        adv_reversed.append(torch.where(m, adv_t, zero))
    advantages = torch.stack(adv_reversed[::-1], dim=1) if adv_reversed else values.clone()
    returns = torch.where(mask_b, advantages + values, zero)  # R_t = A_t + V_t
    return advantages, returns


def _grouped(rewards_B: torch.Tensor, group_size: int) -> torch.Tensor:
    if group_size < 1:
        raise ValueError(f"group_size must be >= 1, got {group_size}")
    if rewards_B.dim() != 1 or rewards_B.shape[0] % group_size != 0:
        raise ValueError(
            f"rewards must be 1-D with length divisible by group_size={group_size}, "
            f"got shape {tuple(rewards_B.shape)}"
        )
    return rewards_B.reshape(-1, group_size)


def group_normalized_advantages(
    rewards_B: torch.Tensor,
    group_size: int,
    eps: float = 1e-6,
    scale: bool = True,
    unbiased: bool = True,
) -> torch.Tensor:
    """GRPO outcome advantages, Shao et al. 2024 (DeepSeekMath) eq. 3 / sec. 4.1.2.

    ``A_i = (r_i - mean_g(r)) / (std_g(r) + eps)`` within each group of G samples of the same
    prompt. ``scale=False`` drops the std division (Dr. GRPO, Liu et al. 2025).

    Args:
        rewards_B: (B,) sequence rewards, group-contiguous, B = num_prompts * G.
        group_size: G.
        eps: added to the std.
        scale: divide by the group std.
        unbiased: use the Bessel-corrected std (as most GRPO implementations do); ignored for
            G = 1 (whose advantages are all 0).

    Returns:
        (B,) advantages (broadcast to tokens by the caller).
    """
    grouped = _grouped(rewards_B, group_size)  # (B/G, G)
    mean = grouped.mean(dim=1, keepdim=True)
    adv = grouped - mean  # r_i - mean_g
    if scale:
        correction = 1 if (unbiased and group_size > 1) else 0
        std = grouped.std(dim=1, keepdim=True, correction=correction)
        adv = adv / (std + eps)  # (r_i - mean_g) / (std_g + eps)
    return adv.reshape(-1)


def leave_one_out_advantages(rewards_B: torch.Tensor, group_size: int) -> torch.Tensor:
    """RLOO advantages, Ahmadian et al. 2024 ("Back to Basics", eq. 5; Kool et al. 2019).

    ``A_i = r_i - 1/(G-1) sum_{j != i} r_j``. Within a group the advantages sum to zero.

    Args:
        rewards_B: (B,) sequence rewards, group-contiguous, B = num_prompts * G.
        group_size: G >= 2.

    Returns:
        (B,) advantages.
    """
    if group_size < 2:
        raise ValueError(f"RLOO needs group_size >= 2, got {group_size}")
    grouped = _grouped(rewards_B, group_size)  # (B/G, G)
    total = grouped.sum(dim=1, keepdim=True)
    baseline = (total - grouped) / (group_size - 1)  # mean_{j != i} r_j
    return (grouped - baseline).reshape(-1)  # A_i = r_i - baseline_i


@torch.no_grad()
def explained_variance(
    values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor
) -> torch.Tensor:
    """Explained variance of the value predictions: ``1 - Var[R - V] / Var[R]`` (valid entries).

    1 = perfect, 0 = no better than predicting the mean, < 0 = worse. Returns NaN when
    ``Var[R] == 0``.

    Args:
        values: (B, T) value predictions.
        returns: (B, T) return targets.
        mask: (B, T) validity mask.

    Returns:
        0-dim float tensor.
    """
    values = values.to(returns.dtype)
    var_returns = masked_var(returns, mask, unbiased=False)
    var_resid = masked_var(returns - values, mask, unbiased=False)
    ev = 1.0 - var_resid / var_returns  # 1 - Var[R - V] / Var[R]
    return torch.where(var_returns > 0, ev, torch.full_like(ev, float("nan")))


# ----------------------------------------------------------------------------- estimator registry


@torch.no_grad()
def gae_advantages(
    rewards_BT: torch.Tensor,
    values_BT: torch.Tensor | None,
    mask_BT: torch.Tensor,
    *,
    group_size: int = 1,
    gamma: float = 1.0,
    lam: float = 0.95,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """:func:`gae` in the registry's signature (``group_size`` unused); needs ``values_BT``."""
    if values_BT is None:
        raise ValueError("the gae estimator needs the value model's values (got None)")
    return gae(rewards_BT, values_BT, mask_BT, gamma, lam)


def _sequence_advantages(
    fn: Callable[[torch.Tensor, int], torch.Tensor],
    rewards_BT: torch.Tensor,
    mask_BT: torch.Tensor,
    group_size: int,
) -> torch.Tensor:
    mask = mask_BT.to(rewards_BT.dtype)
    seq_reward_B = (rewards_BT * mask).sum(-1)  # r = score - beta * sum_t KL_t
    return fn(seq_reward_B, group_size).unsqueeze(1) * mask  # the same A on every token


@torch.no_grad()
def grpo_advantages(
    rewards_BT: torch.Tensor,
    values_BT: torch.Tensor | None,
    mask_BT: torch.Tensor,
    *,
    group_size: int = 1,
    gamma: float = 1.0,
    lam: float = 0.95,
) -> tuple[torch.Tensor, None]:
    """GRPO: the sequence reward ``sum_t r_t`` normalized within its group
    (:func:`group_normalized_advantages`) on every valid token; no value model (``values_BT``,
    ``gamma`` and ``lam`` unused), so no returns."""
    return _sequence_advantages(group_normalized_advantages, rewards_BT, mask_BT, group_size), None


@torch.no_grad()
def rloo_advantages(
    rewards_BT: torch.Tensor,
    values_BT: torch.Tensor | None,
    mask_BT: torch.Tensor,
    *,
    group_size: int = 2,
    gamma: float = 1.0,
    lam: float = 0.95,
) -> tuple[torch.Tensor, None]:
    """RLOO: the sequence reward ``sum_t r_t`` minus the mean of the other G-1 of its group
    (:func:`leave_one_out_advantages`) on every valid token; no value model, so no returns."""
    return _sequence_advantages(leave_one_out_advantages, rewards_BT, mask_BT, group_size), None


AdvantageEstimator = Callable[..., tuple[torch.Tensor, torch.Tensor | None]]
"""``fn(rewards_BT, values_BT | None, mask_BT, *, group_size, gamma, lam) -> (advantages_BT,
returns_BT | None)``: token-level advantages (0 on padding) and value targets (None for the
critic-free estimators). Rows are group-contiguous (see the module docstring)."""

ADVANTAGE_ESTIMATORS: dict[str, AdvantageEstimator] = {
    "gae": gae_advantages,
    "grpo": grpo_advantages,
    "rloo": rloo_advantages,
}
"""Estimators by the name ``ppo.advantage_estimator`` takes."""

CRITIC_FREE_ESTIMATORS = ("grpo", "rloo")
"""Estimators that train no value model (their advantages come from the group of samples)."""
