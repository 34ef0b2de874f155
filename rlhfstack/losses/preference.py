"""Preference losses: Bradley-Terry reward modelling, DPO / cDPO / IPO, KTO.

Shape legend: B = batch of comparisons (or of single responses for KTO), T = tokens.
All ``*_logps_B`` arguments are *sequence* log-probabilities (sum over response tokens, see
:func:`sequence_logprobs`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from rlhfstack.losses.masking import masked_mean, masked_sum

__all__ = ["bradley_terry_loss", "dpo_loss", "kto_loss", "sequence_logprobs", "DPO_LOSS_TYPES"]

DPO_LOSS_TYPES = ("sigmoid", "ipo")


def sequence_logprobs(
    logprobs_BT: torch.Tensor, mask_BT: torch.Tensor, average: bool = False
) -> torch.Tensor:
    """Sequence log-probability ``log pi(y|x) = sum_t m_t log pi(y_t | x, y_<t)``.

    Args:
        logprobs_BT: (B, T) per-token log-probs.
        mask_BT: (B, T) 1 for response tokens.
        average: return the per-token mean instead of the sum (length-normalised, as in IPO/SimPO
            variants).

    Returns:
        (B,) tensor.
    """
    if average:
        return masked_mean(logprobs_BT, mask_BT, dim=-1)  # (1/|y|) sum_t log pi(y_t)
    return masked_sum(logprobs_BT, mask_BT, dim=-1)  # sum_t log pi(y_t)


def bradley_terry_loss(
    chosen_B: torch.Tensor,
    rejected_B: torch.Tensor,
    margin_B: torch.Tensor | None = None,
    p_chosen_B: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Pairwise reward-model loss, Ouyang et al. 2022 eq. 1 (Bradley-Terry), with the optional
    margin of Touvron et al. 2023 (Llama 2) eq. 2 and optional soft labels.

    ``loss = -mean log sigmoid(r(x, y_c) - r(x, y_r) - m(r))``; with soft labels ``p`` (the
    probability that y_c is the better response, e.g. an AI labeler's debiased preference as in
    Bai et al. 2022 and Lee et al. 2023) it is the cross-entropy against ``p``:
    ``loss = -mean [p log sigmoid(d) + (1 - p) log sigmoid(-d)]``, ``d = r_c - r_r``
    (p = 1 gives the hard-label loss; p = 0.5 pulls d towards 0). Margins and soft labels do not
    combine (ValueError).

    Args:
        chosen_B: (B,) scalar rewards of the preferred responses.
        rejected_B: (B,) scalar rewards of the rejected responses.
        margin_B: optional (B,) non-negative margins (e.g. from preference strength).
        p_chosen_B: optional (B,) soft labels in [0, 1].

    Returns:
        ``(loss, stats)``; stats (detached 0-dim): ``accuracy`` (fraction with r_c > r_r),
        ``margin_mean`` (mean r_c - r_r), ``chosen_mean``, ``rejected_mean``.
    """
    if margin_B is not None and p_chosen_B is not None:
        # the margin says how much y_c is better; a soft label says y_c may not be: no one d fits
        raise ValueError("bradley_terry_loss: give a margin or soft labels, not both")
    diff = chosen_B - rejected_B  # r_c - r_r
    logits = diff if margin_B is None else diff - margin_B.to(diff.dtype)  # r_c - r_r - m
    if p_chosen_B is None:
        loss = -F.logsigmoid(logits).mean()  # -log sigma(r_c - r_r - m)
    else:
        p = p_chosen_B.to(logits.dtype)
        # -[p log sigma(d) + (1 - p) log sigma(-d)]
        loss = -(p * F.logsigmoid(logits) + (1 - p) * F.logsigmoid(-logits)).mean()
    with torch.no_grad():
        stats = {
            "accuracy": (chosen_B > rejected_B).to(diff.dtype).mean(),
            "margin_mean": diff.mean(),
            "chosen_mean": chosen_B.mean(),
            "rejected_mean": rejected_B.mean(),
        }
    return loss, {k: v.detach() for k, v in stats.items()}


def dpo_loss(
    policy_chosen_logps_B: torch.Tensor,
    policy_rejected_logps_B: torch.Tensor,
    ref_chosen_logps_B: torch.Tensor,
    ref_rejected_logps_B: torch.Tensor,
    beta: float = 0.1,
    label_smoothing: float = 0.0,
    loss_type: str = "sigmoid",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Direct Preference Optimization and variants.

    With ``h = [log pi(y_c) - log pi_ref(y_c)] - [log pi(y_r) - log pi_ref(y_r)]``:

    * ``"sigmoid"``: Rafailov et al. 2023 eq. 7, ``-log sigmoid(beta h)``; with
      ``label_smoothing = eps > 0`` this is conservative DPO (Mitchell 2023),
      ``-(1 - eps) log sigmoid(beta h) - eps log sigmoid(-beta h)``.
    * ``"ipo"``: Azar et al. 2023 eq. 17, ``(h - 1 / (2 beta))^2`` (``label_smoothing`` is
      ignored). Here ``beta`` plays the role of the paper's tau.

    Args:
        policy_chosen_logps_B: (B,) sequence log-probs of chosen responses under the policy.
        policy_rejected_logps_B: (B,) same for rejected responses.
        ref_chosen_logps_B: (B,) chosen log-probs under the frozen reference.
        ref_rejected_logps_B: (B,) rejected log-probs under the reference.
        beta: KL-regularisation strength (> 0).
        label_smoothing: assumed label-noise rate eps in [0, 0.5).
        loss_type: ``"sigmoid"`` or ``"ipo"``.

    Returns:
        ``(losses_B, chosen_rewards_B, rejected_rewards_B)``: per-pair losses (the caller takes
        the mean) and the detached implicit rewards ``beta (log pi - log pi_ref)``.
    """
    if loss_type not in DPO_LOSS_TYPES:
        raise ValueError(f"unknown DPO loss_type {loss_type!r}; expected one of {DPO_LOSS_TYPES}")
    if beta <= 0:
        raise ValueError(f"beta must be > 0, got {beta}")
    if not 0.0 <= label_smoothing < 0.5:
        raise ValueError(f"label_smoothing must be in [0, 0.5), got {label_smoothing}")
    chosen_logratio = policy_chosen_logps_B - ref_chosen_logps_B  # log pi/pi_ref (y_c)
    rejected_logratio = policy_rejected_logps_B - ref_rejected_logps_B  # log pi/pi_ref (y_r)
    h = chosen_logratio - rejected_logratio
    if loss_type == "sigmoid":
        # -(1 - eps) log sigma(beta h) - eps log sigma(-beta h)
        losses = -(1.0 - label_smoothing) * F.logsigmoid(beta * h)
        if label_smoothing > 0:
            losses = losses - label_smoothing * F.logsigmoid(-beta * h)
    else:
        losses = (h - 1.0 / (2.0 * beta)).square()  # IPO: (h - 1/(2 tau))^2
    chosen_rewards = (beta * chosen_logratio).detach()  # beta log pi/pi_ref (y_c)
    rejected_rewards = (beta * rejected_logratio).detach()
    return losses, chosen_rewards, rejected_rewards


def kto_loss(
    policy_logps_B: torch.Tensor,
    ref_logps_B: torch.Tensor,
    is_desirable_B: torch.Tensor,
    kl_ref_point: torch.Tensor,
    beta: float = 0.1,
    desirable_weight: float = 1.0,
    undesirable_weight: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Kahneman-Tversky Optimization, Ethayarajh et al. 2024 eq. 8.

    ``r = log pi(y|x) - log pi_ref(y|x)``; ``z0 = KL(pi || pi_ref)`` reference point;
    ``v = lambda_D sigma(beta (r - z0))`` if y is desirable, ``lambda_U sigma(beta (z0 - r))``
    otherwise; ``loss = lambda_y - v``.

    ``kl_ref_point`` is detached and clamped at 0 (it is an estimate of a KL, which is >= 0, and no
    gradient flows through it, as in the paper). It is typically the batch mean of
    ``log pi - log pi_ref`` on mismatched (x, y') pairs.

    Args:
        policy_logps_B: (B,) sequence log-probs under the policy.
        ref_logps_B: (B,) sequence log-probs under the reference.
        is_desirable_B: (B,) bool, True for desirable (thumbs-up) examples.
        kl_ref_point: 0-dim tensor z0.
        beta: risk-aversion / KL strength.
        desirable_weight: lambda_D.
        undesirable_weight: lambda_U.

    Returns:
        ``(losses_B, rewards_B)``: per-example losses and detached implicit rewards ``beta r``.
    """
    z0 = torch.as_tensor(kl_ref_point, dtype=policy_logps_B.dtype, device=policy_logps_B.device)
    z0 = z0.detach().clamp(min=0)
    logratio = policy_logps_B - ref_logps_B  # r = log pi / pi_ref
    desirable = is_desirable_B.bool()
    loss_des = desirable_weight * (1.0 - torch.sigmoid(beta * (logratio - z0)))  # l_D - v
    loss_und = undesirable_weight * (1.0 - torch.sigmoid(beta * (z0 - logratio)))  # l_U - v
    losses = torch.where(desirable, loss_des, loss_und)
    return losses, (beta * logratio).detach()
