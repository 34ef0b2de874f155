"""Rewards built from other things: plain Python functions of text, ensembles, weighted sums."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

from rlhfstack.rewards.base import Reward, RewardOutput


class FunctionReward:
    """``fn(prompts, completions) -> [B] scores`` (a list, array or tensor) as a reward: a gold
    scorer of a task (:func:`rlhfstack.tasks.demo.gold_scorer_for`), a rule, a penalty. Reads
    text only; ``components`` holds the scores under ``name``."""

    def __init__(
        self, fn: Callable[[list[str], list[str]], Any], name: str = "fn", device: str = "cpu"
    ) -> None:
        self.fn, self.name, self.device = fn, name, device

    uses_policy_ids = False
    has_spread = False

    def score(
        self,
        prompts: Sequence[str],
        completions: Sequence[str],
        ids_BT: torch.Tensor | None = None,
        mask_BT: torch.Tensor | None = None,
    ) -> RewardOutput:
        out = self.fn(list(prompts), list(completions))
        s_B = torch.as_tensor(out, dtype=torch.float32, device=self.device).reshape(-1)
        if s_B.shape[0] != len(completions):
            raise ValueError(f"reward {self.name}: {s_B.shape[0]} scores for {len(completions)}")
        return RewardOutput(scores_B=s_B, components={self.name: s_B})


def length_penalty(
    coef: float, name: str = "length_penalty", device: str = "cpu"
) -> FunctionReward:
    """``-coef * (number of whitespace-separated words)`` of each completion."""
    return FunctionReward(
        lambda prompts, completions: [-coef * len(c.split()) for c in completions], name, device
    )


class EnsembleReward:
    """Several rewards of the same pairs: ``scores_B`` = their mean, ``spread_B`` = their
    unbiased std (as :class:`~rlhfstack.models.core.RewardEnsemble` over heads; Coste et al.
    2023). Members may read different tokenizers: each takes the ids path only if it can.
    ``components`` holds each member's scores under its ``name`` (made unique by position)."""

    def __init__(self, members: Sequence[Reward], name: str = "ensemble") -> None:
        if not members:
            raise ValueError("EnsembleReward needs at least one member")
        self.members, self.name = list(members), name

    @property
    def uses_policy_ids(self) -> bool:
        return any(m.uses_policy_ids for m in self.members)

    @property
    def has_spread(self) -> bool:
        return len(self.members) >= 2

    def score(
        self,
        prompts: Sequence[str],
        completions: Sequence[str],
        ids_BT: torch.Tensor | None = None,
        mask_BT: torch.Tensor | None = None,
    ) -> RewardOutput:
        outs = [m.score(prompts, completions, ids_BT, mask_BT).scores_B for m in self.members]
        s_BM = torch.stack([o.to(outs[0].device) for o in outs], -1)
        spread = s_BM.std(-1) if s_BM.shape[-1] > 1 else None
        names = [f"{i}:{m.name}" for i, m in enumerate(self.members)]
        return RewardOutput(
            scores_B=s_BM.mean(-1), spread_B=spread, components=dict(zip(names, outs, strict=True))
        )


class WeightedSum:
    """``sum_i w_i * score_i`` of named rewards (an RM plus a length penalty, say); the spread is
    that of the terms that have one, combined as independent (``sqrt(sum w_i^2 spread_i^2)``).
    ``components`` holds each term's unweighted scores under its name."""

    def __init__(self, terms: dict[str, tuple[Reward, float]], name: str = "sum") -> None:
        if not terms:
            raise ValueError("WeightedSum needs at least one term")
        self.terms, self.name = dict(terms), name

    @property
    def uses_policy_ids(self) -> bool:
        return any(r.uses_policy_ids for r, _ in self.terms.values())

    @property
    def has_spread(self) -> bool:
        return any(r.has_spread for r, _ in self.terms.values())

    def score(
        self,
        prompts: Sequence[str],
        completions: Sequence[str],
        ids_BT: torch.Tensor | None = None,
        mask_BT: torch.Tensor | None = None,
    ) -> RewardOutput:
        total, var, parts = None, None, {}
        for key, (reward, w) in self.terms.items():
            out = reward.score(prompts, completions, ids_BT, mask_BT)
            parts[key] = out.scores_B
            total = w * out.scores_B if total is None else total + w * out.scores_B.to(total.device)
            if out.spread_B is not None:
                v = (w * out.spread_B.to(total.device)) ** 2
                var = v if var is None else var + v
        return RewardOutput(
            scores_B=total, spread_B=None if var is None else var.sqrt(), components=parts
        )
