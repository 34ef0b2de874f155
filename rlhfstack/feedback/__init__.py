"""AI feedback for RLAIF / Constitutional AI: a constitution as data and the models that apply it.

Use::

    from rlhfstack.feedback import build_feedback_model, load_constitution

    constitution = load_constitution("stories")            # conf/constitution/stories.yaml
    fb = build_feedback_model(cfg.feedback, device="cpu")  # a FeedbackConfig
    cmp = fb.compare(prompts, a, b, constitution.principle("happiness"))
    cmp.p_a_N               # debiased P(A better), (N,): asked in both orders and averaged
    cmp.order_disagreement  # fraction of pairs whose two orders disagree

``compare`` takes one principle or one per pair; :func:`compare_principles` gives each
principle's comparison and their ensemble (the mean). See :mod:`rlhfstack.feedback.model`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from rlhfstack.evaluation.judges import ChatClient, JudgmentCache
from rlhfstack.feedback.constitution import (
    Constitution,
    Principle,
    load_constitution,
    resolve_constitution_path,
)
from rlhfstack.feedback.model import (
    CausalLMFeedback,
    Comparison,
    EmbeddingFeedback,
    EndpointFeedback,
    FeedbackModel,
    comparison_prompt,
    debias,
    parse_choice,
)

__all__ = [
    "CausalLMFeedback",
    "Comparison",
    "Constitution",
    "EmbeddingFeedback",
    "EndpointFeedback",
    "FeedbackModel",
    "Principle",
    "build_feedback_model",
    "compare_principles",
    "label_pairs_with_feedback",
    "preference_rows",
    "comparison_prompt",
    "debias",
    "load_constitution",
    "parse_choice",
    "resolve_constitution_path",
]


def build_feedback_model(cfg: Any, device: str = "cpu") -> FeedbackModel:
    """The feedback model a :class:`~rlhfstack.configs.FeedbackConfig` names."""
    if cfg.kind == "embedding":
        return EmbeddingFeedback(cfg.model_path, temperature=cfg.temperature, device=device)
    if cfg.kind == "causal_lm":
        return CausalLMFeedback(cfg.model_path, device=device)
    if cfg.kind == "endpoint":
        e = cfg.endpoint
        client = ChatClient.from_config(e)
        return EndpointFeedback(
            client,
            JudgmentCache(cfg.cache_path),
            logprobs=cfg.logprobs,
            max_tokens=cfg.max_tokens,
            concurrency=e.concurrency,
            temperature=e.temperature,
        )
    raise ValueError(f"feedback.kind: unknown {cfg.kind!r} (embedding | causal_lm | endpoint)")


def label_pairs_with_feedback(
    fb: FeedbackModel,
    prompts: Sequence[str],
    a: Sequence[str],
    b: Sequence[str],
    principles: Sequence[Principle],
    mode: str,
    rng: np.random.Generator,
) -> tuple[Comparison, list[str], dict[str, Comparison]]:
    """Soft labels P(A better) of each pair; the principle named per pair ("ensemble" or the
    drawn one); each principle's comparison (``ensemble``: on every pair; ``sample``: none)."""
    if mode == "ensemble":
        ens, per = compare_principles(fb, prompts, a, b, principles)
        return ens, ["ensemble"] * len(prompts), per
    if mode != "sample":
        raise ValueError(f"feedback.principles: unknown {mode!r} (ensemble | sample)")
    drawn = [principles[int(rng.integers(len(principles)))] for _ in prompts]
    return fb.compare(prompts, a, b, drawn), [p.name for p in drawn], {}


def preference_rows(
    prompts: Sequence[str],
    a: Sequence[str],
    b: Sequence[str],
    cmp: Comparison,
    principles: Sequence[str],
) -> list[dict[str, Any]]:
    """Soft-labeled preference rows ``{prompt, chosen, rejected, p_chosen, principle}`` from a
    comparison: the text with P(better) >= 0.5 is chosen and ``p_chosen`` (>= 0.5) is its soft
    label, the Bradley-Terry target (``principles``: the principle named per pair)."""
    rows = []
    for i in range(len(prompts)):
        a_wins = cmp.p_a_N[i] >= 0.5
        rows.append(
            {
                "prompt": prompts[i],
                "chosen": a[i] if a_wins else b[i],
                "rejected": b[i] if a_wins else a[i],
                "p_chosen": float(max(cmp.p_a_N[i], 1.0 - cmp.p_a_N[i])),
                "principle": principles[i],
            }
        )
    return rows


def compare_principles(
    fb: FeedbackModel,
    prompts: Sequence[str],
    a: Sequence[str],
    b: Sequence[str],
    principles: Sequence[Principle],
) -> tuple[Comparison, dict[str, Comparison]]:
    """Each principle's both-order comparison of every pair, and their ensemble: the mean of
    the principles' debiased probabilities (and of each order's)."""
    per = {p.name: fb.compare(prompts, a, b, p) for p in principles}
    mean = lambda attr: np.mean([getattr(c, attr) for c in per.values()], axis=0)  # noqa: E731
    ens = Comparison(
        p_a_N=mean("p_a_N"), p_a_first_N=mean("p_a_first_N"), p_a_second_N=mean("p_a_second_N")
    )
    return ens, per
