"""The record PPO's rollout phase hands to its update phase.

Shape legend: B = responses (this rank's rows, group-contiguous: the G samples of a prompt in a
row), T = prompt + response tokens, R = response tokens (``T = P + R``, P = the left-padded
prompt length), V = vocabulary.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Experience:
    """One rollout batch, scored, shaped and with its advantages: everything the PPO update reads.

    Sequences:
        prompts: the B prompt strings (a prompt repeated G times in a row for G samples).
        completions: the B responses decoded with the policy's tokenizer (EOS and PAD dropped).
        ids_BT: prompt + response token ids (left-padded prompt, right-padded response).
        mask_BT: attention mask of ``ids_BT`` (1 = real token).
        response_start: P, the index in T of the first response token.
        response_mask_BR: float 1.0 on response tokens up to and including the first EOS.
        ended_B: True where the response emitted EOS within ``rollout.max_new_tokens``.

    Rollout-time passes (no grad):
        old_logprobs_BR: the sampling policy's ``log softmax(logits / T)`` of each response token.
        ref_logprobs_BR: the reference's log-probs of the same tokens.
        ref_logsoftmax_BRV: the reference's whole log-softmax (only with ``ppo.kl_loss_coef > 0``),
            else None.
        values_BR: the value model's ``V(s_t)`` before each response token; None when critic-free.

    Reward (:mod:`rlhfstack.rewards`) and its shaping:
        raw_scores_B: the reward's scores (an ensemble's mean).
        score_std_B: the ensemble's spread (std over heads / members); zeros for one head.
        scores_B: ``raw - reward_uncertainty_coef * std - missing_eos_penalty * (not ended)``,
            clipped to ``+-reward_clip`` and optionally whitened: the score PPO optimizes.
        kl_coef: beta of the KL penalty this batch was shaped with.
        kl_BR: per-token KL estimate (``kl.estimator``) of policy vs reference, 0 on padding.
        rewards_BR: ``-beta * kl_t`` on every response token, + ``scores_B`` on the last one.
        seq_kl_B: the summed k1 KL of each response (what the KL controller tracks).

    Advantages (``ppo.advantage_estimator``):
        advantages_BR: per-token advantages (whitened when ``ppo.whiten_advantages``), 0 on padding.
        returns_BR: the value targets ``A + V`` (before whitening); None when critic-free.

    Rollout engine vs trainer (:mod:`rlhfstack.losses.mismatch`):
        rollout_logprobs_BR: the rollout engine's log-probs of the sampled tokens, kept when the
            trainer recomputed ``old_logprobs_BR`` (NaN where the engine gave none); else None.
        is_weights_BR: truncated importance weights ``min(pi_old / mu, C)`` multiplying each
            token's policy loss (``ppo.rollout_is=token_tis``); None without the correction.
    """

    prompts: list[str]
    completions: list[str]
    ids_BT: torch.Tensor
    mask_BT: torch.Tensor
    response_start: int
    response_mask_BR: torch.Tensor
    ended_B: torch.Tensor
    old_logprobs_BR: torch.Tensor
    ref_logprobs_BR: torch.Tensor
    ref_logsoftmax_BRV: torch.Tensor | None
    values_BR: torch.Tensor | None
    raw_scores_B: torch.Tensor
    score_std_B: torch.Tensor
    scores_B: torch.Tensor
    kl_coef: float
    kl_BR: torch.Tensor
    rewards_BR: torch.Tensor
    seq_kl_B: torch.Tensor
    advantages_BR: torch.Tensor
    returns_BR: torch.Tensor | None
    rollout_logprobs_BR: torch.Tensor | None = None
    is_weights_BR: torch.Tensor | None = None

    @property
    def batch_size(self) -> int:
        """B, the number of responses (rows) in this record."""
        return self.ids_BT.shape[0]
