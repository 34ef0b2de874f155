"""RLHF math as pure functions of tensors (imports torch and the standard library only).

Submodules: :mod:`.masking` (masked reductions, log-probs, entropy), :mod:`.kl` (KL estimators and
controllers), :mod:`.advantages` (KL-shaped rewards, GAE, GRPO, RLOO), :mod:`.ppo` (PPO losses),
:mod:`.preference` (Bradley-Terry, DPO/cDPO/IPO, KTO), :mod:`.mismatch` (rollout engine vs trainer
log-prob gap, truncated importance weights).
"""

from rlhfstack.losses.advantages import (
    ADVANTAGE_ESTIMATORS,
    CRITIC_FREE_ESTIMATORS,
    explained_variance,
    gae,
    group_normalized_advantages,
    kl_shaped_rewards,
    last_token_index,
    leave_one_out_advantages,
)
from rlhfstack.losses.kl import (
    KL_ESTIMATORS,
    AdaptiveKLController,
    FixedKLController,
    kl_estimate,
    kl_full_from_logits,
    kl_k1,
    kl_k2,
    kl_k3,
)
from rlhfstack.losses.masking import (
    entropy_from_logits,
    logprobs_from_logits,
    masked_mean,
    masked_sum,
    masked_var,
    masked_whiten,
)
from rlhfstack.losses.mismatch import (
    ROLLOUT_IS_MODES,
    logprob_gap,
    mismatch_metrics,
    mismatch_sums,
    truncated_is_weights,
)
from rlhfstack.losses.ppo import entropy_bonus, ppo_policy_loss, ppo_value_loss
from rlhfstack.losses.preference import (
    DPO_LOSS_TYPES,
    bradley_terry_loss,
    dpo_loss,
    kto_loss,
    sequence_logprobs,
)

__all__ = [
    "ADVANTAGE_ESTIMATORS",
    "CRITIC_FREE_ESTIMATORS",
    "AdaptiveKLController",
    "DPO_LOSS_TYPES",
    "FixedKLController",
    "KL_ESTIMATORS",
    "ROLLOUT_IS_MODES",
    "bradley_terry_loss",
    "dpo_loss",
    "entropy_bonus",
    "entropy_from_logits",
    "explained_variance",
    "gae",
    "group_normalized_advantages",
    "kl_estimate",
    "kl_full_from_logits",
    "kl_k1",
    "kl_k2",
    "kl_k3",
    "kl_shaped_rewards",
    "kto_loss",
    "last_token_index",
    "leave_one_out_advantages",
    "logprob_gap",
    "logprobs_from_logits",
    "masked_mean",
    "masked_sum",
    "masked_var",
    "masked_whiten",
    "mismatch_metrics",
    "mismatch_sums",
    "ppo_policy_loss",
    "ppo_value_loss",
    "sequence_logprobs",
    "truncated_is_weights",
]
