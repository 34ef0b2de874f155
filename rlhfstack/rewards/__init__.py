"""One reward interface: (prompts, completions as text [+ the policy's token ids]) -> scores
[+ spread, named components].

* :class:`Reward` / :class:`RewardOutput` (:mod:`.base`): the protocol and its result;
  :func:`score_samples` scores sampled completions on exactly their sampled tokens;
  :func:`label_pairs_by_reward` turns a reward into preference labels (online DPO).
* :class:`RewardModelReward` / :func:`load_reward` (:mod:`.models`): a trained reward model or
  ensemble directory, on the policy's token ids when it shares the policy's tokenizer, else
  through text re-tokenized with its own tokenizer.
* :class:`FunctionReward`, :func:`length_penalty`, :class:`EnsembleReward`,
  :class:`WeightedSum` (:mod:`.combine`): functions of text, ensembles of any rewards, sums.
"""

from rlhfstack.rewards.base import (
    Reward,
    RewardOutput,
    label_pairs_by_reward,
    same_tokenizer,
    score_samples,
    tokenizer_label,
)
from rlhfstack.rewards.combine import EnsembleReward, FunctionReward, WeightedSum, length_penalty
from rlhfstack.rewards.models import (
    INPUT_PATHS,
    RewardModelReward,
    load_reward,
    reward_members,
    reward_tokenizer_path,
)

__all__ = [
    "INPUT_PATHS",
    "EnsembleReward",
    "FunctionReward",
    "Reward",
    "RewardModelReward",
    "RewardOutput",
    "WeightedSum",
    "label_pairs_by_reward",
    "length_penalty",
    "load_reward",
    "reward_members",
    "reward_tokenizer_path",
    "same_tokenizer",
    "score_samples",
    "tokenizer_label",
]
