"""One typed config per stage (SFT, RM, DPO, PPO, demo data, evaluation) and the pipeline's."""

from __future__ import annotations

from dataclasses import dataclass, field

from rlhfstack.configs.checks import (
    at_least,
    checked,
    choice,
    free,
    in_range,
    nonnegative,
    positive,
    reason,
)
from rlhfstack.configs.common import DATA_ROOT_INTERP, StageConfig
from rlhfstack.configs.rlaif import FeedbackConfig

# ----------------------------------------------------------------------------- stages

#: every stage the pipeline can run (RLAIF's: ``rlhfstack/configs/rlaif.py``; ``online_dpo``: the DPO
#: stage in ``artifacts_dir/online_dpo``)
PIPELINE_STAGES = (
    "data", "sft", "rm", "ppo", "dpo", "eval", "rlaif_data", "cai_sl", "ai_labels", "rlaif_eval",
    "online_dpo", "online_dpo_eval",
)  # fmt: skip


@dataclass
class SFTConfig(StageConfig):
    stage: str = free("sft", "the stage name")
    """Stage name."""
    loss_on_prompt: bool = False
    """Also train on prompt tokens (default: loss on completion tokens only)."""


@dataclass
class RMHyperparams:
    backbone: str = choice("causal_lm", "encoder")
    """causal_lm (scalar head read at the last non-pad token) | encoder (BERT-style, pooled scalar head)."""
    head_init_std: float | None = positive(None)
    """Std of the scalar head init; None = 1/sqrt(d_model + 1) (Stiennon et al. 2020; Huang et al. 2024)."""
    ensemble_size: int = at_least(1, lo=1)
    """Number of scalar heads on a shared trunk; reward = mean, uncertainty = std across heads."""
    normalize: bool = True
    """After training, shift/scale rewards so SFT-policy samples average 0 with std 1 (records gain and bias)."""
    normalize_samples: int = at_least(256, lo=1)
    """Completions sampled from the starting (SFT) model on training prompts to fit the normalization
    (causal-LM backbones); encoders normalize on the training pairs' chosen responses."""
    normalize_max_new_tokens: int = at_least(48, lo=1)
    """Length cap of those samples."""
    extra_eval: dict[str, str] = field(
        default_factory=dict,
        metadata=reason("data paths: read (and named when missing) after training"),
    )
    """More held-out preference files to report accuracy on, by name (the demo adds ``gold``)."""
    epochs: int = at_least(1, lo=1)
    """Passes over the training pairs (1 by default: RMs overfit after one epoch, Ouyang et al. 2022)."""
    long_pairs: str = choice("drop", "truncate")
    """Causal-LM backbones: a pair longer than ``data.max_prompt_tokens`` / ``data.max_response_tokens``
    is dropped (``drop``, counted in the run log) or kept and cut to their sum (``truncate``: the
    prompt keeps its end, the response its start, so every pair stays in the held-out split).
    Encoders always truncate."""
    pooling: str = choice("mean", "response_mean", "cls")
    """Encoders: mean (all real tokens) | response_mean (the response segment) | cls."""
    freeze_embeddings: bool = False
    """Keep the token/position embeddings frozen (fewer trainable parameters, faster on CPU)."""
    freeze_layers: int = nonnegative(0)
    """Also freeze this many of the lowest transformer layers."""
    normalize_policy_path: str | None = free(
        None, "a model path: checked when the stage starts (training.check_paths)"
    )
    """Encoders: fit the normalization on samples of this causal LM (e.g. the SFT policy) instead of
    the training pairs' responses."""
    shared_prompt: bool = True
    """Causal-LM backbones: run each pair's prompt once for chosen and rejected (its keys and values
    reused for both responses): the same scores with fewer FLOPs (``rollout/fast.py``). Encoders,
    batches whose prompts differ (one process) and runs where any pair's prompts differ or with
    tensor / pipeline parallelism (several processes) use the ``[2B, T]`` pass."""
    probes: bool = True
    """Run the bias probes (length, flattery, refusals, sanity) and write the model card (README.md) beside the model."""
    probe_max_items: int = at_least(100, lo=1)
    """Cap on responses / XSTest prompts used per probe."""
    xstest_path: str = free(
        "safety/xstest_prompts.csv",
        "optional probe input under data_root: a missing file skips that probe",
    )
    """XSTest prompts (label == safe ones feed the over-refusal probe), relative to ``data_root``."""


@dataclass
class RMConfig(StageConfig):
    stage: str = free("rm", "the stage name")
    """Stage name."""
    rm: RMHyperparams = field(default_factory=RMHyperparams)
    """Reward-model hyperparameters."""


@dataclass
class DPOHyperparams:
    beta: float = positive(0.1)
    """KL strength beta (Rafailov et al. 2023 use 0.1 for most experiments)."""
    loss_type: str = choice("sigmoid", "ipo", "kto")
    """sigmoid (DPO) | ipo (Azar et al. 2023) | kto (Ethayarajh et al. 2024: each pair is split
    into a desirable and an undesirable example; ``beta`` is KTO's beta, 0.1 in the paper)."""
    label_smoothing: float = in_range(0.0, lo=0.0, hi=0.5, hi_open=True)
    """Conservative DPO: assumed label-flip rate (Mitchell 2023); 0 = plain DPO."""
    kto_desirable_weight: float = positive(1.0)
    """KTO lambda_D. The paper keeps lambda_D n_D / (lambda_U n_U) in [1, 4/3]; pairs give
    n_D = n_U, so 1.0 / 1.0 is inside that range."""
    kto_undesirable_weight: float = positive(1.0)
    """KTO lambda_U."""
    kto_unpaired: bool = False
    """KTO on unpaired data: ``data.train_path`` holds ``{"prompt", "completion", "label"}`` rows
    (TRL's KTO format; ``label`` true = desirable) instead of pairs. Needs ``loss_type=kto``; the
    weights should keep lambda_D n_D / (lambda_U n_U) in [1, 4/3] (a warning says when not)."""
    ref_path: str | None = free(
        None, "a model path: checked when the stage starts (training.check_paths)"
    )
    """Reference model; None = the starting model (``model.path``), frozen."""
    epochs: int = at_least(1, lo=1)
    """Passes over the preference pairs."""
    shared_prompt: bool = True
    """Run each pair's prompt once for chosen and rejected (its keys and values reused for both
    responses) and the LM head on response tokens only: the same log-probs with fewer FLOPs
    (``rollout/fast.py``). Batches whose chosen and rejected prompts differ after truncation (one
    process), and runs where any pair's do or with tensor / pipeline parallelism (several
    processes), use the plain ``[2B, T]`` pass."""
    rounds: int = at_least(1, lo=1)
    """Iterative (online) DPO: rounds of sample -> label -> DPO, each from the policy the previous
    round ended with (Xiong et al. 2024; Yuan et al. 2024). 1 = offline DPO on ``data.train_path``
    (no sampling). Round 1 trains on ``data.train_path`` unless ``online_first_round``; every later
    round on ``online_pairs`` pairs sampled from the current policy and labeled by
    ``online_labeler``. A finished round is saved in ``run_dir/round-<r>/`` and not redone on
    resume."""
    online_first_round: bool = False
    """Round 1 also samples its pairs from the starting policy (every round on-policy, as in Guo
    et al. 2024 and Llama 2's rounds) instead of training on ``data.train_path`` (the hybrid of
    Xiong et al. 2024: offline data first, then online rounds)."""
    online_pairs: int = at_least(1024, lo=1)
    """Prompts drawn (seeded, without replacement while enough remain) from
    ``online_prompts_path`` per online round; two completions each make one pair, so this is the
    round's label budget (pairs of two identical completions are dropped, not labeled)."""
    online_prompts_path: str | None = free(
        None, "a data file: checked when the stage starts when rounds > 1"
    )
    """Prompts of the online rounds (jsonl rows with ``prompt``); required when ``rounds > 1``."""
    online_labeler: str = choice("simulated", "reward_model", "ai_feedback")
    """Who labels the sampled pairs: simulated (the demo's pool of noisy simulated annotators,
    ``rlhfstack.tasks.stories``; the stories task only: reads ``online_gold_dir``) |
    reward_model (the higher score of ``online_reward_path`` is chosen; ties dropped) |
    ai_feedback (``online_feedback``: the AI feedback model applies its constitution, both answer
    orders asked; the preferred text is chosen)."""
    online_reference: str = choice("previous", "sft")
    """The frozen reference of round r: previous (the policy round r-1 ended with, so each round
    is a KL-regularized step from the last one; Yuan et al. 2024, Snorkel's iterative DPO) | sft
    (``ref_path`` or the starting model in every round: the whole run stays anchored to it)."""
    online_max_new_tokens: int = at_least(48, lo=1)
    """Length cap of the sampled completions (the demo's data stage samples 48 tokens)."""
    online_temperature: float = positive(1.0)
    """Sampling temperature of the online rounds (1.0: the policy's own distribution)."""
    online_cut_at_sentence: bool = False
    """Cut each sampled completion after its last sentence end (``.``, ``!``, ``?``), as the demo's
    data stage cuts the base-model samples of the offline pairs, so both train on text of one form."""
    online_flip_prob: float = in_range(0.25, lo=0.0, hi=0.5, hi_open=True)
    """online_labeler=simulated: each simulated annotator flips this fraction of its labels (the
    demo's ``flip_prob``, AlpacaFarm's 25%)."""
    online_gold_dir: str | None = free(
        None, "a directory: checked when the stage starts when online_labeler=simulated"
    )
    """online_labeler=simulated: the demo's artifacts directory (``data/gold.json`` and
    ``base_model/``: the features the simulated annotators read); None = ``artifacts_dir``."""
    online_reward_path: str | None = free(
        None, "a reward model path: checked when the stage starts when online_labeler=reward_model"
    )
    """online_labeler=reward_model: the reward model directory (RM stage output or ensemble)."""
    online_feedback: FeedbackConfig = field(default_factory=FeedbackConfig)
    """online_labeler=ai_feedback: the AI feedback model and constitution (RLAIF's
    ``feedback.*``: ``rlhfstack/configs/rlaif.py``)."""


@dataclass
class DPOConfig(StageConfig):
    stage: str = free("dpo", "the stage name")
    """Stage name."""
    dpo: DPOHyperparams = field(default_factory=DPOHyperparams)
    """DPO hyperparameters."""


@dataclass
class RolloutConfig:
    max_new_tokens: int = at_least(48, lo=1)
    """Response length cap in tokens."""
    temperature: float = positive(1.0)
    """Sampling temperature; the same T divides logits in rollout, reference and training passes."""
    top_k: int = checked(0, lambda v: v == 0, "0 (truncated sampling breaks the log-probs)")
    """Must stay 0: truncated sampling breaks the log-prob semantics (Huang et al. 2024)."""
    top_p: float = checked(1.0, lambda v: v == 1.0, "1.0 (truncated sampling breaks the log-probs)")
    """Must stay 1.0 for the same reason."""
    backend: str = choice("native", "vllm")
    """native (the project's batched KV-cache engine) | vllm (GPU only; weights synced each iteration)."""
    compile: bool = False
    """native backend, Llama-family policies without LoRA: ``torch.compile`` the one-token decode
    step with static shapes (cache length rounded up to a multiple of 64); the first rollout of
    each (batch, length) shape compiles (about 20 s for a 35.7M-parameter model on CPU). It runs
    the products on ``F.linear`` (no packed weights), so on CPU it is slower than the default
    packed eager steps (docs/performance.md) and is off by default."""
    packed_weights: bool = True
    """native backend, Llama-family policies without LoRA, CPU float32, eager steps: multiply by
    copies of the weights packed into oneDNN's layout at the start of each rollout (freed at its
    end) instead of calling MKL's sgemm through ``F.linear``. The same products in another
    summation order (logits within 1e-5 in the tests); on CPU the decode loop's matmuls at few
    rows run faster than MKL's sgemm (docs/performance.md)."""
    tp_decode: str = choice("replica", "sharded")
    """How rollouts decode under ``parallel.tp > 1`` (one process: ignored). ``replica``: every
    rank gathers the trained policy (and critic) into a full, frozen copy after each update and
    decodes on it without collectives (the hybrid-engine design); costs one whole model copy per
    rank on top of its 1/tp shard (policy + critic parameters, plus the KV cache of all heads),
    and one all-gather of the trained weights per iteration. The reference and reward model stay
    sharded (1/tp each) and score over the tensor-parallel group. ``sharded``: decode with the
    tensor-parallel modules themselves, every rank of the group in step: no extra copy and 1/tp
    of the KV cache per rank, but two all-reduces per layer per decoded token, the plain
    KV-cache loop (not the fast, packed one), and a scoring pass over the batch for the old
    log-probs (the rollout's are not kept). Not with ``parallel.dp_shard > 1`` (FSDP2 gathers
    weights at every forward: the data-parallel ranks would have to decode in step),
    ``parallel.pp > 1`` (stages hold parts of the policy) nor ``ppo.rollout_is`` (the sampler
    is the trainer: no gap to correct)."""
    samples_per_prompt: int = at_least(1, lo=1)
    """G responses sampled per prompt (contiguous groups; each prompt's pass runs once):
    ``trainer.batch_size`` counts responses, so a step draws ``batch_size / G`` prompts. The
    critic-free estimators (``ppo.advantage_estimator=grpo | rloo``) need G >= 2."""


@dataclass
class KLConfig:
    controller: str = choice("adaptive", "fixed")
    """adaptive (Ziegler et al. 2019, eq. 2) | fixed."""
    init_coef: float = nonnegative(0.1)
    """Initial beta for the per-token KL penalty (Ziegler et al. 2019 use 0.1 for sentiment)."""
    target: float = positive(6.0)
    """Adaptive controller's target KL in nats per sequence (Ziegler et al. 2019: 6)."""
    horizon: int = at_least(10000, lo=1)
    """Adaptive controller horizon in samples (Ziegler et al. 2019: 10000)."""
    estimator: str = choice("k1", "k2", "k3")
    """Per-token KL estimator in the reward: k1 | k2 | k3 (Schulman 2020)."""
    stop_multiple: float = nonnegative(10.0)
    """Runaway-KL guard: stop the run (``RunawayKLError``, non-zero exit, nothing saved after the
    last checkpoint) when the batch's mean sequence KL to the reference (``kl/seq_k1``, measured
    before the update) exceeds ``stop_multiple`` x ``target`` for ``stop_patience`` iterations in
    a row; 0 disables it. It uses ``target`` with the fixed controller, too. The count starts
    afresh on resume."""
    stop_patience: int = at_least(3, lo=1)
    """Consecutive iterations above ``stop_multiple`` x ``target`` that trip the guard (>= 1)."""


@dataclass
class PPOHyperparams:
    advantage_estimator: str = choice("gae", "grpo", "rloo")
    """gae (a value model and GAE, Schulman et al. 2016: PPO as in Ziegler et al. 2019 / Ouyang et
    al. 2022) | grpo (no value model; the group-normalized sequence reward of the G samples of a
    prompt, Shao et al. 2024) | rloo (no value model; the sequence reward minus the mean of the
    other G-1 samples, Ahmadian et al. 2024). For grpo / rloo the sequence reward is the RM score
    minus beta x the summed per-token KL (``kl.*``), every response token gets its sequence's
    advantage, and the clipped policy loss is PPO's. GRPO as in DeepSeekMath (KL in the loss, not
    the reward): ``kl.controller=fixed kl.init_coef=0 ppo.kl_loss_coef=...``."""
    epochs: int = at_least(4, lo=1)
    """PPO epochs over each rollout batch (Ziegler et al. 2019: 4)."""
    num_minibatches: int = at_least(4, lo=1)
    """Minibatches per epoch."""
    clip_eps: float = positive(0.2)
    """Policy ratio clip (Schulman et al. 2017)."""
    value_clip: float = positive(0.2)
    """Value clip range around the rollout values."""
    vf_coef: float = nonnegative(0.1)
    """Value-loss coefficient (Huang et al. 2024 / lm-human-preferences: 0.1)."""
    gamma: float = in_range(1.0, lo=0.0, hi=1.0)
    """Discount (1.0 for episodic text, Ziegler et al. 2019)."""
    lam: float = in_range(0.95, lo=0.0, hi=1.0)
    """GAE lambda (Ziegler et al. 2019: 0.95)."""
    whiten_advantages: bool = True
    """Whiten advantages over valid tokens of the batch (gae and rloo; grpo's are normalized
    within each group already)."""
    whiten_rewards: bool = False
    """Whiten scores over the batch before shaping."""
    missing_eos_penalty: float = nonnegative(1.0)
    """Subtracted from the score of responses that never emit EOS (0 disables)."""
    entropy_coef: float = nonnegative(0.0)
    """Entropy bonus coefficient."""
    kl_loss_coef: float = nonnegative(0.0)
    """Coefficient of the exact per-token KL(pi || pi_ref) over the whole vocabulary, added to the
    loss (besides the sampled-token KL penalty in the reward). 0 disables. Keeps the reference's
    full log-softmax of each rollout batch in memory (B x R x V floats): for small vocabularies."""
    value_model: str = choice("shared", "separate")
    """shared (value head on the policy trunk) | separate (critic initialized from the reward model).
    Unused by the critic-free estimators (grpo, rloo)."""
    reward_clip: float = nonnegative(10.0)
    """Clip scores to +-reward_clip; 0 disables."""
    reward_uncertainty_coef: float = nonnegative(0.0)
    """Uncertainty-penalized reward (Coste et al. 2023): score = mean - coef x std over the reward
    model's heads (``rm.ensemble_size``) or the members of an ensemble directory (``ensemble.json``,
    ``RewardEnsemble``). 0 disables; > 0 needs at least two heads in all."""
    logprobs_from_rollout: bool = True
    """Take the old log-probs (and the shared value head's values) from the rollout's KV-cache
    forward passes instead of a second forward over the batch (same function, equal up to float
    rounding; native HF rollouts only, others always score separately). false: the separate pass,
    and the rollout engine's own log-probs are kept beside it to measure the gap (``mismatch/*``
    metrics, docs/algorithms/ppo.md)."""
    rollout_is: str = choice("none", "token_tis")
    """Correction for the gap between the rollout engine's sampling distribution mu and the
    trainer's pi_old (kernels, precision, vLLM): none | token_tis (truncated importance sampling,
    Yao et al. 2025: each token's policy loss times ``min(pi_old / mu, rollout_is_cap)``,
    detached). Needs the trainer's own old log-probs: with the native backend set
    ``logprobs_from_rollout=false`` (one extra forward per iteration)."""
    rollout_is_cap: float = at_least(2.0, lo=1.0)
    """C, the cap of the truncated importance weights (Yao et al. 2025 and verl's default: 2)."""
    mismatch_threshold: float = positive(0.1)
    """``mismatch/frac_above`` counts the tokens whose |log pi_old - log mu| exceeds this (nats;
    0.1 is a ratio outside [0.905, 1.105]). Logging only."""


@dataclass
class PPOConfig(StageConfig):
    stage: str = free("ppo", "the stage name")
    """Stage name."""
    reward_model_path: str = free(
        "${artifacts_dir}/rm/model",
        "a reward-model directory: checked when the stage starts (training.check_paths)",
    )
    """Frozen reward model directory."""
    reward_input: str = choice("auto", "ids", "text")
    """How the reward model reads each response (``rlhfstack.rewards.RewardModelReward``): auto
    (the policy's token ids when the RM is a causal LM whose tokenizer equals the policy's: same
    vocabulary and BOS / EOS ids; else the decoded text re-tokenized with the RM's own tokenizer
    and input layout, e.g. an encoder RM) | ids (insist on the token ids: an error naming both
    tokenizers when they differ) | text (always re-tokenize)."""
    ref_path: str | None = free(
        None, "a model path: checked when the stage starts (training.check_paths)"
    )
    """Reference model; None = the starting policy (``model.path``), frozen (or adapter-disabled with LoRA)."""
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    """Generation settings."""
    kl: KLConfig = field(default_factory=KLConfig)
    """KL penalty settings."""
    ppo: PPOHyperparams = field(default_factory=PPOHyperparams)
    """PPO update hyperparameters."""
    gold_eval_every: int = nonnegative(0)
    """Score held-out prompts with the task's gold reward every N steps (embedded task only); 0 = never."""
    gold_eval_prompts: int = at_least(64, lo=1)
    """Dev prompts (the first N of ``data.eval_path``) for the periodic gold evaluation."""
    gold_task: str | None = choice("stories")
    """Task whose hidden gold reward is tracked during training (``stories`` = the embedded demo); None = none."""


@dataclass
class DemoDataConfig(StageConfig):
    stage: str = free("data", "the stage name")
    """Stage name."""
    n_prompts: int = at_least(3000, lo=1)
    """Story openings generated for training and dev (``n_prompts - n_dev`` train prompts)."""
    n_dev: int = at_least(256, lo=1)
    """Dev prompts, split off the ``n_prompts``: PPO's periodic gold evaluation and any tuning
    (never trained on)."""
    n_test: int = at_least(256, lo=1)
    """Test prompts, generated after the ``n_prompts`` by the same generator (so train and dev do
    not depend on it): the evaluation report only, nothing is tuned on them."""
    completions_per_prompt: int = at_least(4, lo=2)
    """Samples per training prompt from the base model, paired for labeling."""
    pairs_per_prompt: int = at_least(3, lo=1)
    """Distinct pairs labeled per prompt (at most k(k-1)/2); labels are cheap, samples are not."""
    n_pref_prompts: int = at_least(2000, lo=1)
    """Training prompts that get labeled pairs."""
    max_new_tokens: int = at_least(48, lo=1)
    """Completion length cap."""
    temperature: float = positive(1.0)
    """Base-model sampling temperature for the preference data."""
    flip_prob: float = in_range(0.25, lo=0.0, hi=0.5, hi_open=True)
    """Each simulated labeler flips this fraction of its labels (AlpacaFarm)."""
    sft_source: str = choice("chosen")
    """SFT targets: chosen completions of the labeled pairs (as the DPO paper does for HH)."""


@dataclass
class EvalConfig(StageConfig):
    stage: str = free("eval", "the stage name")
    """Stage name."""
    policies: list[str] = free(
        ["sft", "dpo", "ppo"], "run names: artifacts_dir/<name>/model is read by the eval stage"
    )
    """Policies evaluated, read from ``artifacts_dir/<name>/model``."""
    test_prompts_path: str = free(
        "${abspath:${artifacts_dir}}/data/prompts_test.jsonl",
        "written by the data stage, read (and named when missing) by the eval stage",
    )
    """Test split: every metric, win-rate and target of the report (nothing is tuned on it)."""
    dev_prompts_path: str | None = free(
        "${data.eval_path}",
        "written by the data stage, read (and named when missing) by the eval stage",
    )
    """Dev split (PPO's periodic gold evaluation, tuning): gold win-rates only, reported as
    ``winrate_dev`` beside the test split's; None skips it."""
    max_new_tokens: int = at_least(48, lo=1)
    """Completion length cap for evaluation samples."""
    temperature: float = positive(1.0)
    """Sampling temperature for evaluation samples."""
    n_bootstrap: int = at_least(2000, lo=1)
    """Bootstrap resamples for confidence intervals."""


@dataclass
class OnlineDPOEvalConfig(StageConfig):
    stage: str = free("online_dpo_eval", "the stage name")
    """Stage name."""
    demo_dir: str = free(
        "runs/demo", "a directory: the demo's artifacts, read (and named when missing) by the stage"
    )
    """The demo's artifacts: ``sft/model`` (the baseline and the KL anchor), ``base_model`` and
    ``data/gold.json`` (the gold judge), ``data/prompts_test.jsonl``."""
    arms: dict[str, str] = field(
        default_factory=lambda: {"offline_dpo": "dpo", "online_dpo": "online_dpo"},
        metadata=reason("run names: artifacts_dir/<run>/model is read by the stage"),
    )
    """Each compared policy by name: the run under ``artifacts_dir`` whose ``model/`` it is."""
    test_prompts_path: str = free(
        "${abspath:${demo_dir}}/data/prompts_test.jsonl",
        "written by the demo's data stage, read (and named when missing) by this stage",
    )
    """The demo's test split: the prompts its evaluation samples."""
    max_new_tokens: int = at_least(48, lo=1)
    """Completion length cap (the demo's evaluation: 48)."""
    temperature: float = positive(1.0)
    """Sampling temperature (the demo's evaluation: 1.0)."""
    n_bootstrap: int = at_least(2000, lo=1)
    """Bootstrap resamples for confidence intervals."""


@dataclass
class PipelineConfig:
    artifacts_dir: str = free("runs/demo", "an output directory: created by the run")
    """Where every stage writes (``runs/demo/<stage>``)."""
    data_root: str = free(DATA_ROOT_INTERP, "passed to every stage, whose checks read it")
    """Root for relative data paths."""
    seed: int = free(0, "any integer seeds python, numpy and torch")
    """Seed passed to every stage."""
    stages: list[str] = checked(
        ["data", "sft", "rm", "ppo", "dpo", "eval"],
        lambda v: all(s in PIPELINE_STAGES for s in v),
        "names among " + " | ".join(PIPELINE_STAGES),
    )
    """Stages to run, in order."""
    stage_overrides: dict[str, list[str]] = field(
        default_factory=dict,
        metadata=reason("Hydra overrides: each stage's composition checks them"),
    )
    """Extra Hydra overrides per stage, e.g. ``{ppo: ["trainer.max_steps=10"]}``."""
    common_overrides: list[str] = field(
        default_factory=list,
        metadata=reason("Hydra overrides: each stage's composition checks them"),
    )
    """Overrides passed to every stage. A stage whose ``run_dir`` holds ``done.json`` is skipped
    unless it is given ``overwrite=true`` (here for every stage, or in ``stage_overrides``)."""
    overwrite: bool = False
    """Train every stage again, finished ones too: passes ``overwrite=true`` to each stage (its
    checkpoints, ``metrics.jsonl`` and ``done.json`` are deleted first)."""
    jobs: int = at_least(1, lo=1)
    """Stages in flight at once. 1: one after another, in this process. N > 1: later stages whose
    inputs are ready also start, in up to N-1 background processes (DPO beside RM -> PPO)."""


# ----------------------------------------------------------------------------- win-rate / judges
# Entry points eval/winrate.py, eval/generate_samples.py, eval/hh_eval.py
# (logic in rlhfstack/evaluation/judges.py and rlhfstack/evaluation/winrate.py).
