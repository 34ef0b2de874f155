"""The reward interface: (prompts, completions [+ the policy's token ids]) -> scores.

Every reward here (a causal-LM reward model on the policy's tokenizer, a reward model with its own
tokenizer, an ensemble, a plain Python function of text) satisfies :class:`Reward`, so PPO, the
critic-free estimators, best-of-n and evaluation call one method whatever scores them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import torch

from rlhfstack.rollout.generate import SampledTokens


@dataclass
class RewardOutput:
    """What a reward returns for B (prompt, completion) pairs.

    scores_B: ``[B]`` float32 scores (for reward models: the normalized reward; for an ensemble:
        the mean over its heads / members).
    spread_B: ``[B]`` disagreement of an ensemble (the unbiased std over its heads / members), or
        None for a reward with a single opinion.
    components: named ``[B]`` parts of the score (the terms of a weighted sum, a function's own
        output); empty when the score has one part.
    """

    scores_B: torch.Tensor
    spread_B: torch.Tensor | None = None
    components: dict[str, torch.Tensor] = field(default_factory=dict)


@runtime_checkable
class Reward(Protocol):
    """Scores of (prompt, completion) pairs.

    ``score(prompts, completions)`` scores text. Callers that hold the policy's token ids (PPO's
    rollout) also pass ``ids_BT`` / ``mask_BT`` (prompt + response, left-padded prompt,
    right-padded response): a reward that reads the policy's tokenizer (``uses_policy_ids``) scores
    those ids directly; every other reward ignores them and reads the text.
    """

    name: str
    """Short label for logs and the keys of ``components``."""

    @property
    def uses_policy_ids(self) -> bool:
        """True if ``score`` reads ``ids_BT`` / ``mask_BT`` when they are given."""
        ...

    @property
    def has_spread(self) -> bool:
        """True if ``score`` returns a ``spread_B`` (an ensemble of two heads / members or more)."""
        ...

    def score(
        self,
        prompts: Sequence[str],
        completions: Sequence[str],
        ids_BT: torch.Tensor | None = None,
        mask_BT: torch.Tensor | None = None,
    ) -> RewardOutput: ...


def tokenizer_label(tok: Any) -> str:
    """``name (vocab N)`` of a tokenizer, for messages."""
    name = getattr(tok, "name_or_path", "") or type(tok).__name__
    return f"{name} (vocab {len(tok)})"


def same_tokenizer(a: Any, b: Any) -> bool:
    """Whether two HF tokenizers map text to the same ids: the same vocabulary (every token string
    with the same id, added tokens included) and the same BOS / EOS ids. The names are not compared
    (an SFT directory and the reward model trained from it hold one tokenizer under two paths)."""
    if a is b:
        return True
    if len(a) != len(b) or (a.bos_token_id, a.eos_token_id) != (b.bos_token_id, b.eos_token_id):
        return False
    return a.get_vocab() == b.get_vocab()


@torch.no_grad()
def score_samples(
    reward: Reward,
    prompts: Sequence[str],
    samples: SampledTokens,
    pad_id: int,
    *,
    batch_size: int = 64,
    device: str = "cpu",
) -> torch.Tensor:
    """``reward``'s scores ``[N]`` of sampled completions, on exactly the tokens that were sampled.

    A reward on the policy's tokenizer reads the sampled prompt + response ids at the last sampled
    token (the EOS where one was sampled, none appended where the length budget cut the response):
    what PPO's rollout scoring reads. Any other reward reads the decoded texts."""
    out = []
    for i in range(0, len(samples), batch_size):
        ids, mask, _ = samples.batch(i, i + batch_size, pad_id, device)
        j = min(i + batch_size, len(samples))
        r = reward.score(prompts[i:j], samples.texts[i:j], ids_BT=ids, mask_BT=mask)
        out.append(r.scores_B.float().cpu())
    return torch.cat(out) if out else torch.zeros(0)


@torch.no_grad()
def label_pairs_by_reward(
    reward: Reward,
    prompts: Sequence[str],
    completions_a: Sequence[str],
    completions_b: Sequence[str],
    *,
    batch_size: int = 64,
) -> list[dict[str, Any]]:
    """Preference labels from a reward: of each (prompt, A, B) the higher-scored text is chosen.

    Scores the texts (``reward.score`` without token ids: the texts a DPO step trains on). Pairs
    of identical texts and exact score ties carry no preference and are dropped. Returns one dict
    per labeled pair: ``prompt``, ``chosen``, ``rejected``, ``index`` (position in the inputs),
    ``a_is_chosen`` and ``score_margin`` (chosen's score minus rejected's, > 0)."""
    if not (len(prompts) == len(completions_a) == len(completions_b)):
        raise ValueError("prompts, completions_a and completions_b differ in length")

    def scores(texts: Sequence[str]) -> list[float]:
        out: list[float] = []
        for i in range(0, len(texts), batch_size):
            r = reward.score(prompts[i : i + batch_size], texts[i : i + batch_size])
            out.extend(r.scores_B.float().cpu().tolist())
        return out

    s_a, s_b = scores(completions_a), scores(completions_b)
    rows = []
    for i, (p, a, b, x, y) in enumerate(zip(prompts, completions_a, completions_b, s_a, s_b)):
        if a == b or x == y:
            continue
        rows.append(
            {
                "prompt": p,
                "chosen": a if x > y else b,
                "rejected": b if x > y else a,
                "index": i,
                "a_is_chosen": x > y,
                "score_margin": abs(x - y),
            }
        )
    return rows
