"""Value models for PPO, behind one small interface (:class:`ValueModel`).

* ``shared`` (:class:`SharedValueHead`): a linear head on the *policy's* trunk. It reads the
  policy's hidden states, so its values come out of the policy's own forward passes: the
  rollout's (``Generation.hidden_BRD``) and the training pass's
  (:func:`rlhfstack.models.core.response_logprobs` with ``value_head=``).
* ``separate`` (:class:`Critic`): its own trunk (a copy of the reward model's, as InstructGPT
  initializes it) and head, run on the policy's token ids; so the reward model must read the
  policy's tokenizer.
* ``none``: the critic-free estimators (grpo, rloo) train no value model; callers hold None.

Values are read at the position that predicts each response token: ``V(s_j)`` for response token
``j`` (index ``start + j``) comes from the hidden state at ``start + j - 1``, as the log-probs.
"""

from __future__ import annotations

import copy
import os
from typing import Protocol, runtime_checkable

import torch
from safetensors.torch import load_model, save_model
from torch import nn

from rlhfstack.models.core import RewardModel, ValueHead, causal_lm_parts, trunk_hidden

VALUE_MODELS = ("shared", "separate")
"""``ppo.value_model`` choices (used by the estimators that need a value model)."""


@runtime_checkable
class ValueModel(Protocol):
    """``values(ids_BT, mask_BT, start, hidden_BRD=None) -> values_BR`` (float32), where
    ``R = T - start``. ``shares_policy_trunk``: the model reads the policy's hidden states
    ``hidden_BRD`` (required then) instead of running a trunk of its own."""

    shares_policy_trunk: bool

    def values(
        self,
        ids_BT: torch.Tensor,
        mask_BT: torch.Tensor,
        start: int,
        hidden_BRD: torch.Tensor | None = None,
    ) -> torch.Tensor: ...


class SharedValueHead(ValueHead):
    """A :class:`~rlhfstack.models.core.ValueHead` on the policy trunk (``ppo.value_model=shared``)."""

    shares_policy_trunk = True

    def values(
        self,
        ids_BT: torch.Tensor,
        mask_BT: torch.Tensor,
        start: int,
        hidden_BRD: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if hidden_BRD is None:
            raise ValueError("a value head on the policy trunk reads the policy's hidden states")
        return self(hidden_BRD).squeeze(-1).float()


class Critic(nn.Module):
    """A separate value model (``ppo.value_model=separate``): a trunk initialized from the reward
    model's and a value head initialized from its (first) reward head."""

    shares_policy_trunk = False

    def __init__(self, rm: RewardModel) -> None:
        super().__init__()
        self.lm = copy.deepcopy(rm.backbone)
        # only the trunk runs (values()): a head it never runs (an exported RM's ``score``) stays
        # frozen, else it would be a trainable weight with no gradient and no optimizer state,
        # which a checkpoint cannot restore
        self.lm.requires_grad_(False)
        causal_lm_parts(self.lm)[0].requires_grad_(True)
        self.head = ValueHead(rm.backbone.config.hidden_size)
        with torch.no_grad():  # start from the RM's head (its first ensemble member)
            self.head.linear.weight.copy_(rm.head.linear.weight[:1])
            self.head.linear.bias.copy_(rm.head.linear.bias[:1])

    def values(
        self,
        ids_BT: torch.Tensor,
        mask_BT: torch.Tensor,
        start: int,
        hidden_BRD: torch.Tensor | None = None,
    ) -> torch.Tensor:
        trunk, _ = causal_lm_parts(self.lm)
        h_BRD = trunk_hidden(trunk, ids_BT, mask_BT)[:, start - 1 : -1]
        return self.head(h_BRD).squeeze(-1).float()


def build_value_model(
    kind: str, *, policy_hidden_size: int, reward_model: RewardModel | None = None
) -> nn.Module:
    """A fresh :class:`SharedValueHead` (``shared``) or :class:`Critic` from ``reward_model``
    (``separate``, a causal-LM reward model)."""
    if kind == "shared":
        return SharedValueHead(policy_hidden_size)
    if kind == "separate":
        if reward_model is None or reward_model.kind != "causal_lm":
            raise ValueError(
                "ppo.value_model=separate copies the reward model's causal-LM trunk and runs it "
                "on the policy's token ids: it needs a causal-LM reward model on the policy's "
                "tokenizer (use ppo.value_model=shared with this reward model)"
            )
        return Critic(reward_model)
    raise ValueError(f"ppo.value_model: unknown value {kind!r} ({' | '.join(VALUE_MODELS)})")


VALUE_FILE = "value_model.safetensors"
"""The file name of a trained value model in a PPO ``run_dir``."""


def save_value_model(value: nn.Module, path: str | os.PathLike) -> None:
    """Write ``value``'s parameters to ``path`` in safetensors (tensors shared inside it, such as
    tied embeddings, once; no pickle)."""
    save_model(value, str(path))


def load_value_model(value: nn.Module, path: str | os.PathLike) -> nn.Module:
    """Load parameters written by :func:`save_value_model` into ``value`` (built the same way,
    e.g. by :func:`build_value_model`); strict: every parameter must be present."""
    missing, unexpected = load_model(value, str(path))
    if missing or unexpected:
        raise ValueError(f"{path}: missing {sorted(missing)}, unexpected {sorted(unexpected)}")
    return value
