"""Embedded demo task: continue a TinyStories opening *positively* while staying fluent.

This is the sentiment-continuation task of Ziegler et al. 2019 ("Fine-Tuning Language Models
from Human Preferences", lm-human-preferences), shrunk to a 260K-parameter TinyStories Llama
(stories260K), and set up like AlpacaFarm (Dubois et al. 2023: simulated annotators with
label noise) and Gao et al. 2022 ("Scaling Laws for Reward Model Overoptimization": a hidden
*gold* reward used only for measurement).

Pieces:
    * :func:`make_story_prompts` / :func:`split_prompts` -- templated story openings.
    * :class:`GoldReward` -- the hidden, deterministic gold reward (sentiment + fluency -
      repetition). The policy never sees it; it is used to (a) simulate labelers and (b) measure
      over-optimisation of the learned proxy reward model.
    * :class:`Labeler`, :func:`default_labeler_pool`, :func:`label_pair`, :func:`label_pairs` --
      AlpacaFarm-style simulated annotators: each has its own weighting of the gold features
      (one of them likes long texts, which a proxy RM can learn and a policy can exploit) and
      flips its label with probability ``flip_prob`` (25% by default, as in AlpacaFarm).
    * :func:`best_of_k_pairs` -- turn k samples per prompt into pairs to label.
    * :func:`judge_pool_noiseless` / :func:`gold_judge` / :func:`judge_outcomes` -- per-prompt
      verdicts for the "judge" and "gold" win-rates (feed them to
      ``rlhfstack.evaluation.metrics.winrate_from_outcomes``).

Texts: a *completion* is the continuation string; the full story is
``join_prompt_completion(prompt, completion)``, which inserts one space at the seam unless there
is whitespace there already or the completion starts with closing punctuation (so it works for
decoders that keep the leading space, like GPT-2, and ones that strip it, like SentencePiece).
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

from rlhfstack.data.text_stats import repetition_rate

__all__ = [
    "GoldReward",
    "LMFluencyScorer",
    "Labeler",
    "best_of_k_pairs",
    "calibrate_fluency",
    "default_labeler_pool",
    "gold_judge",
    "join_prompt_completion",
    "judge_outcomes",
    "judge_pool_noiseless",
    "label_pair",
    "label_pairs",
    "labeler_agreement_with_gold",
    "labeler_utilities",
    "make_story_prompts",
    "normalize_words",
    "split_prompts",
]

# --------------------------------------------------------------------------------------------
# Prompts
# --------------------------------------------------------------------------------------------

# Only simple words that a TinyStories model has seen many times. Every noun that follows "a"
# starts with a consonant (no "a owl").
_GIRLS = (
    "Lily",
    "Sue",
    "Mia",
    "Anna",
    "Lucy",
    "Sara",
    "Amy",
    "Emma",
    "Jane",
    "Ella",
    "Zoe",
    "Kate",
)
_BOYS = ("Tom", "Ben", "Tim", "Sam", "Jack", "Max", "Bob", "Joe", "Leo", "Jake", "Timmy", "Billy")
_ANIMALS = (
    "dog", "cat", "bird", "bunny", "bear", "fish", "frog", "duck",
    "mouse", "puppy", "kitten", "lion", "fox", "pig", "cow", "horse",
)  # fmt: skip
_ADJS = ("little", "big", "small", "kind", "shy", "funny", "tiny", "brave", "silly", "friendly")
_PLACE_ADJS = ("big", "small", "quiet", "green", "sunny", "pretty")
_PLACES = (
    "park", "garden", "forest", "lake", "farm", "zoo", "yard", "woods", "pond", "town", "beach",
)  # fmt: skip
_OBJECTS = (
    "ball", "toy car", "kite", "doll", "teddy bear", "red hat", "book", "box",
    "boat", "truck", "drum", "cake", "balloon", "shell", "flower", "blue bike",
)  # fmt: skip

# Slots: {name} {name2} {he} {He} {his} {His} {animal} {animal2} {adj} {padj} {place} {object}
# ({he}/{his} agree with {name}). Each template ends mid-sentence or at a sentence boundary.
_TEMPLATES = (
    "Once upon a time, there was a {adj} {animal} named {name}. One day, {name}",
    "Once upon a time, there was a {adj} girl named {girl}. She liked to play with her {object}. One day,",
    "Once upon a time, there was a {adj} boy named {boy}. He had a {object}",
    "Once upon a time, in a {padj} {place}, there lived a {adj} {animal}.",
    "{name} and {name2} went to the {place}. They saw",
    "{name} had a {adj} {object}. {He} loved to",
    "One day, {name} went to the {place} with {his} mom. {He} saw a",
    "There was a {adj} {animal} who lived in the {place}. Every day, the {animal}",
    "{name} wanted to play with the {object}, but",
    "{name} was sad because {he} lost {his} {object}.",
    "It was a sunny day. {name} and {his} {animal} went to the {place}.",
    "{name} found a {object} in the {place}. {He} said,",
    "Mom gave {name} a {adj} {object}. {name} was",
    "One night, {name} could not sleep. {He} looked out the window and saw",
    "{name} liked to help {his} dad. One day, they went to the {place} and",
    "The {animal} and the {animal2} were friends. They liked to",
    "{name} saw a {adj} {animal} at the {place}. The {animal} was",
    "One day, a {adj} {animal} came to the {place}.",
    "{name} and {his} friend {name2} played with a {object} all day. Then",
    "It was raining outside, so {name} stayed at home. {He}",
    "{name} ran to the {place} to find {his} {object}, but",
    "The {adj} {animal} was hungry. It looked for food at the {place} and found",
    "{name} did not want to share {his} {object} with {name2}.",
    "Once upon a time, there was a {adj} {animal}. The {animal} wanted to",
    "{name} was walking in the {place} when {he}",
)


def _fill(template: str, rng: np.random.Generator) -> str:
    """Fill one template's slots with random words (pronouns agree with {name})."""

    def pick(words: Sequence[str], exclude: str = "") -> str:
        while True:
            w = words[int(rng.integers(len(words)))]
            if w != exclude:
                return w

    is_girl = bool(rng.integers(2))
    name = pick(_GIRLS if is_girl else _BOYS)
    animal = pick(_ANIMALS)
    slots = {
        "name": name,
        "name2": pick(_GIRLS + _BOYS, exclude=name),
        "girl": pick(_GIRLS),
        "boy": pick(_BOYS),
        "he": "she" if is_girl else "he",
        "He": "She" if is_girl else "He",
        "his": "her" if is_girl else "his",
        "animal": animal,
        "animal2": pick(_ANIMALS, exclude=animal),
        "adj": pick(_ADJS),
        "padj": pick(_PLACE_ADJS),
        "place": pick(_PLACES),
        "object": pick(_OBJECTS),
    }
    return template.format(**slots)


def make_story_prompts(n: int, seed: int = 0) -> list[str]:
    """``n`` distinct TinyStories-style openings, deterministic given ``seed``.

    Each prompt is drawn by picking one of ~25 templates uniformly and filling its slots
    (names, animals, places, objects, adjectives); duplicates are rejected. The template space
    holds well over 10^4 distinct openings, so a few thousand are cheap.

    Raises:
        ValueError: if ``n`` distinct prompts cannot be found (n far above the space size).
    """
    if n < 0:
        raise ValueError("n must be >= 0")
    rng = np.random.default_rng(seed)
    seen: set[str] = set()
    out: list[str] = []
    attempts = 0
    max_attempts = 50 * n + 1000
    while len(out) < n:
        attempts += 1
        if attempts > max_attempts:
            raise ValueError(f"could only make {len(out)} distinct prompts (asked for {n})")
        prompt = _fill(_TEMPLATES[int(rng.integers(len(_TEMPLATES)))], rng)
        if prompt not in seen:
            seen.add(prompt)
            out.append(prompt)
    return out


def split_prompts(
    prompts: Sequence[str], n_heldout: int, seed: int = 0
) -> tuple[list[str], list[str]]:
    """Shuffle ``prompts`` (deterministically) and split off ``n_heldout`` of them.

    Returns ``(train, heldout)``; the two lists are disjoint and together are all prompts.
    """
    if not 0 <= n_heldout <= len(prompts):
        raise ValueError(f"n_heldout={n_heldout} not in [0, {len(prompts)}]")
    perm = np.random.default_rng(seed).permutation(len(prompts))
    heldout = [prompts[i] for i in perm[:n_heldout]]
    train = [prompts[i] for i in perm[n_heldout:]]
    return train, heldout


# --------------------------------------------------------------------------------------------
# Text helpers
# --------------------------------------------------------------------------------------------

_NO_SPACE_BEFORE = frozenset(".,!?;:)'\u2019\u201d-")
_WORD_RE = re.compile(r"[a-z0-9']+|[^a-z0-9'\s]")


def join_prompt_completion(prompt: str, completion: str) -> str:
    """The full story text: prompt + completion, with one space inserted at a word seam.

    A space is added iff both sides are non-empty, the prompt does not end with whitespace, and
    the completion starts with neither whitespace nor closing punctuation (``.,!?;:)'’”-``).
    """
    if (
        prompt
        and completion
        and not prompt[-1].isspace()
        and not completion[0].isspace()
        and completion[0] not in _NO_SPACE_BEFORE
    ):
        return prompt + " " + completion
    return prompt + completion


def normalize_words(text: str) -> list[str]:
    """Lower-cased words with punctuation split off: ``"Happy, happy!" -> [happy , happy !]``."""
    return _WORD_RE.findall(text.lower())


# --------------------------------------------------------------------------------------------
# Fluency under the frozen base model
# --------------------------------------------------------------------------------------------


class LMFluencyScorer:
    """Mean per-token log-prob of each completion given its prompt under a frozen causal LM.

    ``fluency_i = mean_t log p(c_t | prompt_i, c_<t)`` over the completion's tokens.

    Tokenisation: the full text ``join_prompt_completion(p, c)`` and the prompt are tokenised
    with the tokenizer's defaults (BOS included if the tokenizer adds one); the completion is the
    part of the full token sequence after its longest common prefix with the prompt's tokens
    (a token merged across the seam counts as completion). If there is no prompt context at all,
    the first token cannot be scored and is skipped. Completions with no scorable token (empty or
    whitespace only) get ``empty_fluency``. Sequences longer than ``max_length`` are
    left-truncated (prompt tokens dropped first).

    Args:
        model: any HF causal LM (``model(input_ids, attention_mask).logits``). Used in eval mode
            under ``torch.no_grad``; it is never updated.
        tokenizer: the matching HF tokenizer (a pad token is not required).
        batch_size: sequences per forward pass.
        max_length: max tokens per sequence (default: ``model.config.max_position_embeddings``).
        empty_fluency: value returned for completions with no tokens.
    """

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        batch_size: int = 32,
        max_length: int | None = None,
        empty_fluency: float = -10.0,
    ) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.batch_size = int(batch_size)
        cfg_len = getattr(getattr(model, "config", None), "max_position_embeddings", None)
        self.max_length = int(max_length or cfg_len or 2048)
        self.empty_fluency = float(empty_fluency)
        pad = getattr(tokenizer, "pad_token_id", None)
        if pad is None:
            pad = getattr(tokenizer, "eos_token_id", None)
        self.pad_id = int(pad) if pad is not None else 0

    def _encode(self, prompt: str, completion: str) -> tuple[list[int], int]:
        """Token ids of the full text and the index of the first completion token."""
        tok = self.tokenizer
        prompt_ids = list(tok(prompt)["input_ids"]) if prompt else []
        full_ids = list(tok(join_prompt_completion(prompt, completion))["input_ids"])
        lcp = 0
        for x, y in zip(prompt_ids, full_ids):
            if x != y:
                break
            lcp += 1
        start = max(lcp, 1)  # token 0 has no context to be predicted from
        if len(full_ids) > self.max_length:
            cut = len(full_ids) - self.max_length
            full_ids = full_ids[cut:]
            start = max(start - cut, 1)
        return full_ids, start

    def __call__(self, prompts: Sequence[str], completions: Sequence[str]) -> np.ndarray:
        """Fluency per completion; returns shape (B,) float64."""

        if len(prompts) != len(completions):
            raise ValueError("prompts and completions differ in length")
        out_B = np.full(len(prompts), self.empty_fluency, dtype=np.float64)
        items: list[tuple[int, list[int], int]] = []
        for i, (p, c) in enumerate(zip(prompts, completions)):
            if not c.strip():
                continue
            ids, start = self._encode(p, c)
            if start < len(ids):
                items.append((i, ids, start))
        if not items:
            return out_B
        items.sort(key=lambda it: len(it[1]))  # length-bucketed batches: less padding
        model = self.model
        was_training = bool(getattr(model, "training", False))
        model.eval()
        device = next(model.parameters()).device
        try:
            with torch.no_grad():
                for b0 in range(0, len(items), self.batch_size):
                    batch = items[b0 : b0 + self.batch_size]
                    T = max(len(ids) for _, ids, _ in batch)
                    input_ids_BT = torch.full((len(batch), T), self.pad_id, dtype=torch.long)
                    attn_BT = torch.zeros((len(batch), T), dtype=torch.long)
                    # score_mask_BT[b, t] = 1 if token t is a completion token to score.
                    score_mask_BT = torch.zeros((len(batch), T), dtype=torch.float32)
                    for r, (_, ids, start) in enumerate(batch):
                        input_ids_BT[r, : len(ids)] = torch.tensor(ids, dtype=torch.long)
                        attn_BT[r, : len(ids)] = 1
                        score_mask_BT[r, start : len(ids)] = 1.0
                    input_ids_BT = input_ids_BT.to(device)
                    attn_BT = attn_BT.to(device)
                    logits_BTV = model(input_ids=input_ids_BT, attention_mask=attn_BT).logits
                    logp_BTV = torch.log_softmax(logits_BTV[:, :-1].float(), dim=-1)
                    tok_logp_BT = logp_BTV.gather(-1, input_ids_BT[:, 1:, None]).squeeze(-1)
                    mask_BT = score_mask_BT[:, 1:].to(tok_logp_BT.device)
                    mean_B = (tok_logp_BT * mask_BT).sum(-1) / mask_BT.sum(-1).clamp_min(1.0)
                    for r, (i, _, _) in enumerate(batch):
                        out_B[i] = float(mean_B[r])
        finally:
            if was_training:
                model.train()
        return out_B


def calibrate_fluency(
    fluency_values: Sequence[float] | np.ndarray, min_scale: float = 0.5
) -> tuple[float, float]:
    """``(f0, f_scale)`` = (mean, max(std, min_scale)) of base-model sample fluencies.

    Typical use: sample completions from the frozen base model on training prompts, compute
    ``GoldReward(...).features(...)["fluency"]`` and pass it here, then build the GoldReward with
    ``f0=..., f_scale=...``. The scale is floored at ``min_scale`` nats/token because a tiny
    model's samples spread narrowly (std ~0.3 for stories260K) and a scale that small would put
    fluent-but-unusual text on the -3 floor next to word salad.
    """
    f_N = np.asarray(fluency_values, dtype=np.float64)
    f_N = f_N[np.isfinite(f_N)]
    if f_N.size == 0:
        raise ValueError("no finite fluency values")
    return float(f_N.mean()), float(max(f_N.std(), min_scale))


# --------------------------------------------------------------------------------------------
# Gold reward
# --------------------------------------------------------------------------------------------

FluencyFn = Callable[[Sequence[str], Sequence[str]], np.ndarray]


class GoldReward:
    """Hidden gold reward for the positive-continuation task (never shown to the policy).

    Features of a (prompt, completion) pair, all deterministic functions of the text:

    * ``sentiment`` in [-1, 1]: VADER compound score of the completion (the prompt is excluded,
      so a sad opening does not penalise a happy continuation).
    * ``fluency``: mean per-token log-prob of the completion given the prompt under the FROZEN
      base model (:class:`LMFluencyScorer`), or under an injected ``fluency_fn``.
    * ``fluency_norm`` = clip((fluency - f0) / f_scale, -3, 1): fluency in units of the spread
      of base-model samples. Capped at +1 so that being *more* predictable than a typical base
      sample earns little (very predictable text is often a loop); floored at -3 so that
      hopeless text is not penalised without bound.
    * ``repetition`` in [0, 1): fraction of repeated word 3-grams in the normalised completion
      (:func:`normalize_words`), ~1 - 1/k for a phrase looped k times.
    * ``length_words``: number of normalised words (not part of the gold score; labelers use it).

    ``gold = w_sentiment * sentiment + w_fluency * fluency_norm - w_repetition * repetition``,
    default weights (1.0, 0.5, 2.0). Why these:

    * Sentiment dominates: it spans 2.0 (from -1 to 1), while the fluency term of base-like
      completions varies by about +-0.3 (one std). Among fluent texts sentiment decides.
    * Word salad loses: a string of positive words ("happy love best joy") has compound ~0.9 but
      fluency far below base samples, so fluency_norm hits -3 (-1.5 in gold, ~-0.6 in all); it
      scores below any fluent, mildly positive continuation (though above a fluent, clearly
      negative one: salad is bad, misery is worse).
    * Loops lose: "and they were happy and they were happy ..." keeps a high compound and may get
      a high LM likelihood (LMs often like repetition; at most +0.5 here thanks to the cap), but
      repetition ~0.6-0.8 costs 1.2-1.6, so it ends below a fluent positive continuation.

    ``f0`` / ``f_scale`` come from base-model samples (:func:`calibrate_fluency`). Defaults
    (-1.5, 0.5): stories260K samples (temperature 1, 48 new tokens, 200 prompts) have fluency
    mean -1.47, std 0.29, 5-95% range [-1.95, -1.06]. The scale is set wider than that std so
    that fluent but unusual hand-written sentences (about -2 to -2.7 nats/token) are not floored
    together with word salad and loops (below -2.5 to -5 and beyond). Measured with those
    defaults, after "Lily and Tom went to the park.": "They saw a big dog. The dog was very
    friendly and they became best friends." -> gold 1.28; "ball the the happy happy happy tree
    the" -> -0.60; "They were happy and they were happy and ..." (x4) -> -1.38; "She was sad and
    angry and cried." -> -1.29.

    Args:
        model, tokenizer: frozen base LM and tokenizer for the fluency feature.
        fluency_fn: alternative to model/tokenizer: ``(prompts, completions) -> (B,) array``
            (used by unit tests and for custom scorers).
        batch_size: batch size for the fluency forward passes.
    """

    def __init__(
        self,
        model: Any = None,
        tokenizer: Any = None,
        *,
        fluency_fn: FluencyFn | None = None,
        w_sentiment: float = 1.0,
        w_fluency: float = 0.5,
        w_repetition: float = 2.0,
        f0: float = -1.5,
        f_scale: float = 0.5,
        fluency_clip: tuple[float, float] = (-3.0, 1.0),
        batch_size: int = 32,
        empty_fluency: float = -10.0,
    ) -> None:

        if fluency_fn is None:
            if model is None or tokenizer is None:
                raise ValueError("GoldReward needs model+tokenizer or fluency_fn")
            fluency_fn = LMFluencyScorer(
                model, tokenizer, batch_size=batch_size, empty_fluency=empty_fluency
            )
        if f_scale <= 0:
            raise ValueError("f_scale must be > 0")
        self.fluency_fn = fluency_fn
        self.w_sentiment = float(w_sentiment)
        self.w_fluency = float(w_fluency)
        self.w_repetition = float(w_repetition)
        self.f0 = float(f0)
        self.f_scale = float(f_scale)
        self.fluency_clip = (float(fluency_clip[0]), float(fluency_clip[1]))
        self._vader = SentimentIntensityAnalyzer()

    # -- individual features -----------------------------------------------------------------
    def sentiment(self, completions: Sequence[str]) -> np.ndarray:
        """VADER compound score per completion, shape (B,), in [-1, 1] (0 for empty text)."""
        return np.array(
            [self._vader.polarity_scores(c)["compound"] if c.strip() else 0.0 for c in completions],
            dtype=np.float64,
        )

    @staticmethod
    def repetition(completions: Sequence[str]) -> np.ndarray:
        """Fraction of repeated word 3-grams per completion, shape (B,)."""
        return np.array(
            [repetition_rate(" ".join(normalize_words(c)), n=3) for c in completions],
            dtype=np.float64,
        )

    def normalize_fluency(self, fluency: np.ndarray) -> np.ndarray:
        """clip((fluency - f0) / f_scale, lo, hi), elementwise."""
        lo, hi = self.fluency_clip
        return np.clip((np.asarray(fluency, dtype=np.float64) - self.f0) / self.f_scale, lo, hi)

    # -- public API ----------------------------------------------------------------------------
    def features(self, prompts: Sequence[str], completions: Sequence[str]) -> dict[str, np.ndarray]:
        """All features (each shape (B,) float64): sentiment, fluency, fluency_norm, repetition,
        length_words, and gold (the score)."""
        if len(prompts) != len(completions):
            raise ValueError("prompts and completions differ in length")
        fluency_B = np.asarray(self.fluency_fn(prompts, completions), dtype=np.float64)
        feats = {
            "sentiment": self.sentiment(completions),
            "fluency": fluency_B,
            "fluency_norm": self.normalize_fluency(fluency_B),
            "repetition": self.repetition(completions),
            "length_words": np.array(
                [len(normalize_words(c)) for c in completions], dtype=np.float64
            ),
        }
        feats["gold"] = self.score_from_features(feats)
        return feats

    def score_from_features(self, feats: Mapping[str, np.ndarray]) -> np.ndarray:
        """Gold score from precomputed ``sentiment``, ``fluency_norm``, ``repetition``; (B,)."""
        return (
            self.w_sentiment * np.asarray(feats["sentiment"], dtype=np.float64)
            + self.w_fluency * np.asarray(feats["fluency_norm"], dtype=np.float64)
            - self.w_repetition * np.asarray(feats["repetition"], dtype=np.float64)
        )

    def score(self, prompts: Sequence[str], completions: Sequence[str]) -> np.ndarray:
        """Gold reward per (prompt, completion), shape (B,) float64."""
        return self.features(prompts, completions)["gold"]

    __call__ = score


# --------------------------------------------------------------------------------------------
# Simulated labelers (AlpacaFarm-style)
# --------------------------------------------------------------------------------------------


@dataclass
class Labeler:
    """A simulated annotator with its own taste and label noise.

    Its (noiseless) utility for a completion is
    ``w_sentiment * sentiment + w_fluency * fluency_norm - w_repetition * repetition
    + w_length * length_words`` (features from :meth:`GoldReward.features`). It prefers the
    completion with the higher utility, then flips that choice with probability ``flip_prob``
    (AlpacaFarm uses 25% flips to mimic human inter-annotator disagreement).
    """

    name: str
    w_sentiment: float
    w_fluency: float
    w_repetition: float
    w_length: float
    flip_prob: float = 0.25

    def utility(self, features: Mapping[str, Any]) -> np.ndarray | float:
        """Utility of one completion (scalar features) or many (array features, shape (B,))."""
        return (
            self.w_sentiment * np.asarray(features["sentiment"], dtype=np.float64)
            + self.w_fluency * np.asarray(features["fluency_norm"], dtype=np.float64)
            - self.w_repetition * np.asarray(features["repetition"], dtype=np.float64)
            + self.w_length * np.asarray(features["length_words"], dtype=np.float64)
        )


def default_labeler_pool(flip_prob: float = 0.25) -> list[Labeler]:
    """Four simulated labelers that weigh the criteria differently.

    * ``balanced``: the gold weights (sentiment 1, fluency 0.5, repetition 2).
    * ``sentiment_fan``: mostly sentiment, lenient on fluency and loops.
    * ``stickler``: cares a lot about fluency and repetition, less about sentiment.
    * ``length_lover``: like ``balanced`` but +0.03 utility per word, so 20 extra words are worth
      as much as a 0.6 jump in VADER compound. A proxy RM trained on this pool learns a partial
      length bonus that the gold reward does not have: the policy can game it.
    """
    return [
        Labeler("balanced", 1.0, 0.5, 2.0, 0.0, flip_prob),
        Labeler("sentiment_fan", 1.0, 0.2, 0.5, 0.0, flip_prob),
        Labeler("stickler", 0.6, 1.0, 3.0, 0.0, flip_prob),
        Labeler("length_lover", 0.8, 0.4, 1.5, 0.03, flip_prob),
    ]


def labeler_utilities(features: Mapping[str, np.ndarray], pool: Sequence[Labeler]) -> np.ndarray:
    """Noiseless utility of every labeler for every completion; shape (L, B)."""
    return np.stack([np.atleast_1d(lab.utility(features)) for lab in pool])


def label_pair(
    features_a: Mapping[str, float],
    features_b: Mapping[str, float],
    labeler: Labeler,
    rng: np.random.Generator,
) -> dict[str, Any]:
    """One noisy preference of ``labeler`` between completions A and B (scalar features).

    Exact utility ties are broken by a fair coin; then the choice is flipped with probability
    ``labeler.flip_prob``.

    Returns:
        ``{"prefers_a": bool, "noiseless_prefers_a": bool, "flipped": bool,
        "utility_a": float, "utility_b": float}``.
    """
    u_a = float(labeler.utility(features_a))
    u_b = float(labeler.utility(features_b))
    noiseless = bool(rng.random() < 0.5) if u_a == u_b else u_a > u_b
    flipped = bool(rng.random() < labeler.flip_prob)
    return {
        "prefers_a": noiseless != flipped,
        "noiseless_prefers_a": noiseless,
        "flipped": flipped,
        "utility_a": u_a,
        "utility_b": u_b,
    }


def _row(feats: Mapping[str, np.ndarray], i: int) -> dict[str, float]:
    return {k: float(v[i]) for k, v in feats.items()}


def label_pairs(
    prompts: Sequence[str],
    completions_a: Sequence[str],
    completions_b: Sequence[str],
    gold: GoldReward,
    pool: Sequence[Labeler] | None = None,
    seed: int = 0,
    assignment: str = "round_robin",
    features_fn: Callable[[Sequence[str], Sequence[str]], dict[str, np.ndarray]] | None = None,
) -> list[dict[str, Any]]:
    """Label (prompt, A, B) pairs with a simulated labeler pool.

    Pairs with identical completions are skipped. Each remaining pair gets one labeler, assigned
    round-robin (``assignment="round_robin"``) or uniformly at random (``"random"``).

    Returns:
        One dict per labeled pair: ``prompt``, ``chosen``, ``rejected``, ``labeler`` (name),
        ``index`` (position in the input lists), ``a_is_chosen``, ``flipped``,
        ``gold_chosen`` / ``gold_rejected`` (gold scores), ``gold_margin``
        (gold_chosen - gold_rejected) and ``agrees_with_gold`` (gold_margin > 0).
    """
    if not (len(prompts) == len(completions_a) == len(completions_b)):
        raise ValueError("prompts, completions_a and completions_b differ in length")
    if assignment not in ("round_robin", "random"):
        raise ValueError(f"unknown assignment {assignment!r}")
    pool = list(pool) if pool is not None else default_labeler_pool()
    if not pool:
        raise ValueError("empty labeler pool")
    keep = [i for i in range(len(prompts)) if completions_a[i] != completions_b[i]]
    if not keep:
        return []
    p = [prompts[i] for i in keep]
    feats = features_fn or gold.features  # features_fn: e.g. a lookup of precomputed features
    fa = feats(p, [completions_a[i] for i in keep])
    fb = feats(p, [completions_b[i] for i in keep])
    rng = np.random.default_rng(seed)
    out: list[dict[str, Any]] = []
    for j, i in enumerate(keep):
        if assignment == "round_robin":
            labeler = pool[j % len(pool)]
        else:
            labeler = pool[int(rng.integers(len(pool)))]
        res = label_pair(_row(fa, j), _row(fb, j), labeler, rng)
        a_chosen = res["prefers_a"]
        g_a, g_b = float(fa["gold"][j]), float(fb["gold"][j])
        g_c, g_r = (g_a, g_b) if a_chosen else (g_b, g_a)
        out.append(
            {
                "prompt": prompts[i],
                "chosen": completions_a[i] if a_chosen else completions_b[i],
                "rejected": completions_b[i] if a_chosen else completions_a[i],
                "labeler": labeler.name,
                "index": i,
                "a_is_chosen": a_chosen,
                "flipped": res["flipped"],
                "gold_chosen": g_c,
                "gold_rejected": g_r,
                "gold_margin": g_c - g_r,
                "agrees_with_gold": g_c > g_r,
            }
        )
    return out


def labeler_agreement_with_gold(labels: Sequence[Mapping[str, Any]]) -> dict[str, float]:
    """Per-labeler fraction of labels whose chosen text has the higher gold score.

    Pairs with equal gold scores count half. Labelers with no labels are absent.
    """
    sums: dict[str, float] = {}
    counts: dict[str, int] = {}
    for lab in labels:
        name = lab["labeler"]
        margin = float(lab["gold_margin"])
        sums[name] = sums.get(name, 0.0) + (1.0 if margin > 0 else 0.5 if margin == 0 else 0.0)
        counts[name] = counts.get(name, 0) + 1
    return {name: sums[name] / counts[name] for name in sums}


def best_of_k_pairs(
    prompts: Sequence[str],
    completions_per_prompt: Sequence[Sequence[str]],
    pairs_per_prompt: int = 1,
    seed: int = 0,
    strategy: str = "random",
) -> tuple[list[str], list[str], list[str]]:
    """Form (prompt, A, B) pairs from k sampled completions per prompt, for labeling.

    Only pairs of *different* texts are formed (duplicates among the k samples are collapsed
    first), so a prompt whose k samples are all identical yields nothing.

    Args:
        prompts: shape (N,).
        completions_per_prompt: N lists of k completions each (k may vary per prompt).
        pairs_per_prompt: with ``strategy="random"``, up to this many distinct unordered pairs
            per prompt, drawn without replacement (A/B order randomised).
        seed: RNG seed.
        strategy: ``"random"`` or ``"all"`` (every unordered pair of distinct texts).

    Returns:
        ``(pair_prompts, completions_a, completions_b)``, three equal-length lists.
    """
    if len(prompts) != len(completions_per_prompt):
        raise ValueError("prompts and completions_per_prompt differ in length")
    if strategy not in ("random", "all"):
        raise ValueError(f"unknown strategy {strategy!r}")
    rng = np.random.default_rng(seed)
    out_p: list[str] = []
    out_a: list[str] = []
    out_b: list[str] = []
    for prompt, comps in zip(prompts, completions_per_prompt):
        uniq = list(dict.fromkeys(comps))  # order-preserving dedup
        pairs = list(itertools.combinations(range(len(uniq)), 2))
        if not pairs:
            continue
        if strategy == "random":
            m = min(pairs_per_prompt, len(pairs))
            chosen = rng.choice(len(pairs), size=m, replace=False)
            pairs = [pairs[int(c)] for c in chosen]
        for x, y in pairs:
            if strategy == "random" and rng.random() < 0.5:
                x, y = y, x
            out_p.append(prompt)
            out_a.append(uniq[x])
            out_b.append(uniq[y])
    return out_p, out_a, out_b


# --------------------------------------------------------------------------------------------
# Judges for evaluation win-rates
# --------------------------------------------------------------------------------------------


def judge_pool_noiseless(
    features_a: Mapping[str, np.ndarray],
    features_b: Mapping[str, np.ndarray],
    pool: Sequence[Labeler] | None = None,
) -> np.ndarray:
    """The pool's noiseless majority vote, used as the evaluation "judge" (AlpacaFarm's eval).

    Each labeler votes for the completion with its higher utility (0.5 each on an exact tie, no
    flips). Outcome per pair: 1.0 if A gets more than half the votes, 0.0 if fewer, 0.5 if
    exactly half. Note that the judge inherits the pool's biases (e.g. the length lover), which
    is the point: judge win-rate vs gold win-rate shows how much of a gain is real.

    Args:
        features_a, features_b: outputs of :meth:`GoldReward.features`, arrays of shape (B,).

    Returns:
        Outcomes for A, shape (B,), values in {0, 0.5, 1}.
    """
    pool = list(pool) if pool is not None else default_labeler_pool()
    u_a_LB = labeler_utilities(features_a, pool)
    u_b_LB = labeler_utilities(features_b, pool)
    votes_a_B = (u_a_LB > u_b_LB).sum(0) + 0.5 * (u_a_LB == u_b_LB).sum(0)
    half = len(pool) / 2
    return np.where(votes_a_B > half, 1.0, np.where(votes_a_B < half, 0.0, 0.5))


def gold_judge(
    features_a: Mapping[str, np.ndarray], features_b: Mapping[str, np.ndarray]
) -> np.ndarray:
    """Gold verdicts: 1.0 / 0.5 / 0.0 as A's gold score is higher / equal / lower; shape (B,)."""
    g_a = np.asarray(features_a["gold"], dtype=np.float64)
    g_b = np.asarray(features_b["gold"], dtype=np.float64)
    return (g_a > g_b).astype(np.float64) + 0.5 * (g_a == g_b)


def judge_outcomes(
    prompts: Sequence[str],
    completions_a: Sequence[str],
    completions_b: Sequence[str],
    gold: GoldReward,
    pool: Sequence[Labeler] | None = None,
) -> dict[str, np.ndarray]:
    """Both verdicts for A vs B on the same prompts.

    Returns ``{"gold": (B,), "judge": (B,)}`` outcomes in {0, 0.5, 1}; pass each to
    ``rlhfstack.evaluation.metrics.winrate_from_outcomes`` for a win-rate with a CI.
    """
    fa = gold.features(prompts, completions_a)
    fb = gold.features(prompts, completions_b)
    return {"gold": gold_judge(fa, fb), "judge": judge_pool_noiseless(fa, fb, pool)}
