"""Reward models behind the :class:`~rlhfstack.rewards.base.Reward` interface.

:class:`RewardModelReward` wraps a :class:`~rlhfstack.models.core.RewardModel` or a
:class:`~rlhfstack.models.core.RewardEnsemble` with the tokenizer it was trained with, and scores
on one of two paths:

* **ids** (``uses_policy_ids``): the policy's own token ids of prompt + response, read at the last
  real token, with no decoding. Only for a causal-LM reward model whose tokenizer equals the
  policy's (:func:`~rlhfstack.rewards.base.same_tokenizer`: vocabulary and BOS / EOS ids).
* **text**: the completion is decoded to text by the caller, re-tokenized with the reward model's
  own tokenizer and input layout (:func:`rlhfstack.models.encoders.encode_for_reward`: ``[BOS]
  prompt response EOS`` for a causal LM, ``[CLS] prompt [SEP] response [SEP]`` for an encoder),
  and scored. Every encoder reward model and every reward model with another tokenizer (a Gemma RM
  behind a Llama policy) takes it.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from rlhfstack.models.core import (
    RewardEnsemble,
    RewardModel,
    load_reward_model,
    load_tokenizer,
)
from rlhfstack.models.encoders import encode_for_reward, reward_max_len, score_token_ids
from rlhfstack.rewards.base import RewardOutput, same_tokenizer, tokenizer_label

#: ``input_path`` values: auto (ids when the tokenizers match, else text) | ids | text
INPUT_PATHS = ("auto", "ids", "text")


def reward_members(rm: RewardModel | RewardEnsemble) -> list[RewardModel]:
    """The reward models of an ensemble, or ``[rm]``."""
    return list(rm.members) if isinstance(rm, RewardEnsemble) else [rm]


class RewardModelReward:
    """A trained reward model (or an ensemble of them) as a :class:`~rlhfstack.rewards.base.Reward`.

    ``rm_tokenizer``: the tokenizer the reward model was trained with. ``policy_tokenizer``: the
    tokenizer of the token ids callers may pass (None: text only). ``input_path``: ``auto`` takes
    the ids path when the reward model is a causal LM and :func:`same_tokenizer` holds for the two
    tokenizers, else the text path; ``ids`` insists on the ids path and raises ``ValueError``
    naming both tokenizers when they differ (or the model is an encoder, whose input layout is not
    the policy's); ``text`` always re-tokenizes.

    Scores are the normalized rewards (``gain * raw + bias``); with two heads or more in all
    (``rm.ensemble_size``, or an ``ensemble.json`` directory) ``spread_B`` is their std.
    ``max_len`` caps the re-tokenized inputs (default: the length the model was trained with).
    On the text path an empty (or blank) completion is scored as ``"."``, so that every pair has
    a response token, and a causal-LM reward model reads ``... response EOS`` as it was trained,
    also for a response cut at the length limit (PPO's ``missing_eos_penalty`` marks those).
    """

    def __init__(
        self,
        rm: RewardModel | RewardEnsemble,
        rm_tokenizer: Any,
        policy_tokenizer: Any | None = None,
        *,
        input_path: str = "auto",
        device: str = "cpu",
        max_len: int | None = None,
        batch_size: int = 32,
        name: str = "rm",
    ) -> None:
        if input_path not in INPUT_PATHS:
            raise ValueError(
                f"reward_input: unknown value {input_path!r} ({' | '.join(INPUT_PATHS)})"
            )
        self.rm, self.tokenizer, self.policy_tokenizer = rm, rm_tokenizer, policy_tokenizer
        self.device, self.max_len, self.batch_size, self.name = device, max_len, batch_size, name
        self.num_heads = sum(m.head.linear.out_features for m in reward_members(rm))
        same = policy_tokenizer is not None and same_tokenizer(policy_tokenizer, rm_tokenizer)
        if input_path == "ids" and not (same and rm.kind == "causal_lm"):
            why = (
                "an encoder reads [CLS] prompt [SEP] response [SEP] in its own vocabulary"
                if rm.kind == "encoder"
                else "their vocabularies or BOS / EOS ids differ"
            )
            raise ValueError(
                "reward_input=ids: the reward model cannot read the policy's token ids: policy "
                f"tokenizer {tokenizer_label(policy_tokenizer) if policy_tokenizer else 'None'}, "
                f"reward model tokenizer {tokenizer_label(rm_tokenizer)} ({rm.kind}); {why}. "
                "Use reward_input=auto or text (decode, re-tokenize with the RM's tokenizer)."
            )
        self._ids = input_path != "text" and same and rm.kind == "causal_lm"

    @property
    def uses_policy_ids(self) -> bool:
        return self._ids

    @property
    def has_spread(self) -> bool:
        return self.num_heads >= 2

    def _output(self, mean_B: torch.Tensor, std_B: torch.Tensor) -> RewardOutput:
        return RewardOutput(scores_B=mean_B, spread_B=std_B if self.has_spread else None)

    @torch.no_grad()
    def score(
        self,
        prompts: Sequence[str],
        completions: Sequence[str],
        ids_BT: torch.Tensor | None = None,
        mask_BT: torch.Tensor | None = None,
    ) -> RewardOutput:
        if self._ids and ids_BT is not None:
            out = self.rm.score(ids_BT, mask_BT)
            return self._output(out["mean"], out["std"])
        if len(prompts) != len(completions):
            raise ValueError(f"{len(prompts)} prompts but {len(completions)} completions")
        if not prompts:
            empty = torch.zeros(0, device=self.device)
            return self._output(empty, empty)
        rm = self.rm
        enc = encode_for_reward(
            self.tokenizer,
            rm.kind,
            list(prompts),
            [c if c.strip() else "." for c in completions],
            reward_max_len(rm, self.max_len),
            getattr(rm, "max_response_tokens", None),
        )
        was_training = rm.training
        rm.eval()
        out = score_token_ids(
            rm, [e[0] for e in enc], self.tokenizer.pad_token_id, self.batch_size, self.device
        )
        rm.train(was_training)
        as_t = lambda a: torch.as_tensor(a, dtype=torch.float32, device=self.device)  # noqa: E731
        return self._output(as_t(out["mean"]), as_t(out["std"]))


def reward_tokenizer_path(path: str | os.PathLike) -> Path:
    """The directory holding a reward model's tokenizer: ``path``, or for an ensemble directory
    (``ensemble.json``) its first member's."""
    spec = Path(path) / "ensemble.json"
    if spec.exists():
        return Path(path) / json.loads(spec.read_text())["members"][0]
    return Path(path)


def load_reward(
    path: str | os.PathLike,
    policy_tokenizer: Any | None = None,
    *,
    input_path: str = "auto",
    dtype: str = "float32",
    device: str = "cpu",
    max_len: int | None = None,
) -> RewardModelReward:
    """A reward model directory (or an ``ensemble.json`` directory) with its own tokenizer, as a
    :class:`RewardModelReward` (see there for ``input_path``)."""
    if input_path not in INPUT_PATHS:  # before any weights load
        raise ValueError(f"reward_input: unknown value {input_path!r} ({' | '.join(INPUT_PATHS)})")
    rm_tok = load_tokenizer(str(reward_tokenizer_path(path)))
    rm = load_reward_model(path, dtype=dtype, device=device)
    return RewardModelReward(
        rm, rm_tok, policy_tokenizer, input_path=input_path, device=device, max_len=max_len
    )
