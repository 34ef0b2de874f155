"""Structured configs for every stage, registered with Hydra's ConfigStore.

Each stage has one typed dataclass (``SFTConfig``, ``RMConfig``, ``PPOConfig``, ``DPOConfig``, ...).
The YAML trees under ``conf/`` are validated against these schemas: a misspelled or unknown key
is an error, not a silently ignored value. Every field carries a docstring (the string literal
under it) and, where a paper fixes the default, the paper is cited there.

Composition (see ``conf/``)::

    conf/sft.yaml        defaults: [sft_schema, model: ..., data: ..., cluster: local, _self_]
    conf/experiment/X    a named bundle of overrides, used as ``+experiment=X``

``load_config(stage, overrides)`` composes the same tree without ``@hydra.main`` (the pipeline
recipe and the tests use it).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, OmegaConf

from rlhfstack.evaluation.detectors import DetectorThresholds

REPO_ROOT = Path(__file__).resolve().parent.parent
CONF_DIR = REPO_ROOT / "conf"


def default_data_root() -> str:
    """``$RLHF_DATA_ROOT`` if set, else ``../shared/data`` beside the repository."""
    return os.environ.get("RLHF_DATA_ROOT", str(REPO_ROOT.parent / "shared" / "data"))


# Resolved when the config is resolved (not when the schema is registered), so that the
# environment at run time decides.
DATA_ROOT_INTERP = "${oc.env:RLHF_DATA_ROOT,'" + str(REPO_ROOT.parent / "shared" / "data") + "'}"


# ----------------------------------------------------------------------------- groups


@dataclass
class LoraConfig:
    enabled: bool = False
    """Train LoRA adapters instead of all weights (Hu et al. 2021)."""
    r: int = 8
    """Adapter rank."""
    alpha: float = 16.0
    """LoRA scaling numerator (scale = alpha / r)."""
    dropout: float = 0.0
    """Adapter dropout. 0 for RL: dropout breaks ratio == 1 before the first update."""
    target_modules: list[str] = field(
        default_factory=lambda: [
            "q_proj",
            "k_proj",
            "v_proj",
            "o_proj",
            "gate_proj",
            "up_proj",
            "down_proj",
        ]
    )
    """Module names that receive adapters."""
    quantize_4bit: bool = False
    """QLoRA (Dettmers et al. 2023): load the frozen base in bitsandbytes NF4. GPU only."""


@dataclass
class ModelConfig:
    name: str = "stories260k"
    """Human-readable name for logs and reports."""
    path: str = MISSING
    """Local HF directory (or a hub id, for users with hub access) of the starting checkpoint."""
    tokenizer_path: str | None = None
    """Tokenizer directory; defaults to ``path``."""
    pad_token: str | None = None
    """An existing vocabulary entry used as PAD when the tokenizer has none or reuses EOS
    (never EOS itself: masks built from ``ids != pad`` would hide real EOS tokens)."""
    dtype: str = "float32"
    """Parameter dtype: float32 | bfloat16 | float16. bf16 is the GPU default for large models."""
    activation_checkpointing: bool = False
    """Recompute activations in the backward pass to save memory."""
    lora: LoraConfig = field(default_factory=LoraConfig)
    """LoRA / QLoRA settings."""
    arch: dict[str, Any] = field(default_factory=dict)
    """Architecture of the model for meta-device checks when the weights are not local: HF
    ``config.json`` fields, ``model_type`` included; empty = not given. Unused by training."""


@dataclass
class DataConfig:
    train_path: str | None = None
    """Training file (json, jsonl, jsonl.gz, csv), relative to ``data_root`` unless absolute; or ``hf://org/name:split``."""
    eval_path: str | None = None
    """Validation file; when unset, ``validation_fraction`` of the training file is held out."""
    adapter: str = "auto"
    """Record format: auto | plain | hh | ultrafeedback | alpaca | sharegpt."""
    template: str = "plain"
    """Chat template applied to prompts: plain | hh | chatml | tokenizer."""
    on_error: str = "raise"
    """Malformed rows: ``raise`` (error naming file, line and field) or ``skip`` (counted in the run log)."""
    validation_fraction: float = 0.1
    """Fraction of the training file held out when ``eval_path`` is unset."""
    max_prompt_tokens: int = 64
    """Examples whose prompt is longer are filtered out (counted)."""
    max_response_tokens: int = 64
    """Examples whose response is longer are filtered out (counted)."""
    max_examples: int | None = None
    """Use at most this many training examples (after shuffling); None for all."""


@dataclass
class ClusterConfig:
    name: str = "local"
    """local | slurm."""
    backend: str = "gloo"
    """torch.distributed backend: gloo on CPU, nccl on GPU."""
    device: str = "cpu"
    """cpu | cuda."""
    num_threads: int = 0
    """torch intra-op threads; 0 leaves torch's default."""
    nodes: int = 1
    """Number of nodes (SLURM)."""
    gpus_per_node: int = 0
    """Accelerators per node (SLURM)."""
    partition: str | None = None
    """SLURM partition."""
    account: str | None = None
    """SLURM account."""
    time_limit: str = "04:00:00"
    """SLURM wall-clock limit."""


@dataclass
class ParallelConfig:
    dp_shard: int = 1
    """FSDP2 sharded data-parallel degree; -1 = world size / (tp * pp)."""
    tp: int = 1
    """DTensor tensor-parallel degree."""
    pp: int = 1
    """Pipeline-parallel degree."""
    mixed_precision: str = "none"
    """none | bf16: bf16 compute with fp32 master weights and fp32 gradient reduction
    (FSDP2 MixedPrecisionPolicy under dp_shard > 1, torch.autocast otherwise)."""


@dataclass
class TrainerConfig:
    max_steps: int = 100
    """Optimizer steps (PPO: rollout + update iterations)."""
    save_every: int = 0
    """Save a checkpoint every N steps; 0 saves only the final model."""
    batch_size: int = 32
    """Global batch size in sequences (pairs for preference stages; prompts for PPO rollouts)."""
    micro_batch_size: int = 32
    """Sequences per forward/backward; gradient accumulation = batch_size / micro_batch_size."""
    lr: float = 1e-4
    """Peak learning rate."""
    lr_schedule: str = "linear"
    """linear (anneal to 0, as in the PPO details of Huang et al. 2024) | cosine | constant."""
    warmup_steps: int = 0
    """Linear warm-up steps."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    adam_eps: float = 1e-8
    """Adam epsilon."""
    adam_betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    """Adam betas."""
    grad_clip: float = 1.0
    """Max global gradient norm; 0 disables clipping."""
    eval_every: int = 0
    """Evaluate every N steps; 0 only at the end."""
    log_every: int = 1
    """Write metrics every N steps."""


@dataclass
class LoggingConfig:
    tensorboard: bool = True
    """Write TensorBoard event files into ``run_dir/tb``."""
    wandb: bool = False
    """Log to Weights & Biases."""
    wandb_mode: str = "offline"
    """W&B mode: offline (default, no network) | online."""
    wandb_project: str = "rlhfstack"
    """W&B project name."""
    plots: bool = True
    """Write PNG plots of the logged metrics at the end of the run."""


@dataclass
class StageConfig:
    """Fields every stage shares."""

    stage: str = MISSING
    """Stage name (set by the stage's primary YAML)."""
    run_dir: str = "${artifacts_dir}/${stage}"
    """Where this run writes its model, metrics.jsonl, TensorBoard events and resolved config."""
    artifacts_dir: str = "runs/demo"
    """Where the artifacts of earlier stages are found (``base_model/``, ``sft/model``, ...)."""
    data_root: str = DATA_ROOT_INTERP
    """Root for relative data paths (``$RLHF_DATA_ROOT``, else ``../shared/data``)."""
    seed: int = 0
    """Seed for python, numpy and torch."""
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)


# ----------------------------------------------------------------------------- stages


@dataclass
class SFTConfig(StageConfig):
    stage: str = "sft"
    """Stage name."""
    loss_on_prompt: bool = False
    """Also train on prompt tokens (default: loss on completion tokens only)."""


@dataclass
class RMHyperparams:
    backbone: str = "causal_lm"
    """causal_lm (scalar head read at the last non-pad token) | encoder (BERT-style, pooled scalar head)."""
    head_init_std: float | None = None
    """Std of the scalar head init; None = 1/sqrt(d_model + 1) (Stiennon et al. 2020; Huang et al. 2024)."""
    ensemble_size: int = 1
    """Number of scalar heads on a shared trunk; reward = mean, uncertainty = std across heads."""
    normalize: bool = True
    """After training, shift/scale rewards so SFT-policy samples average 0 with std 1 (records gain and bias)."""
    normalize_samples: int = 256
    """Completions sampled from the starting (SFT) model on training prompts to fit the normalization
    (causal-LM backbones); encoders normalize on the training pairs' chosen responses."""
    normalize_max_new_tokens: int = 48
    """Length cap of those samples."""
    extra_eval: dict[str, str] = field(default_factory=dict)
    """More held-out preference files to report accuracy on, by name (the demo adds ``gold``)."""
    epochs: int = 1
    """Passes over the training pairs (1 by default: RMs overfit after one epoch, Ouyang et al. 2022)."""
    long_pairs: str = "drop"
    """Causal-LM backbones: a pair longer than ``data.max_prompt_tokens`` / ``data.max_response_tokens``
    is dropped (``drop``, counted in the run log) or kept and cut to their sum (``truncate``: the
    prompt keeps its end, the response its start, so every pair stays in the held-out split).
    Encoders always truncate."""
    pooling: str = "mean"
    """Encoders: mean (all real tokens) | response_mean (the response segment) | cls."""
    freeze_embeddings: bool = False
    """Keep the token/position embeddings frozen (fewer trainable parameters, faster on CPU)."""
    freeze_layers: int = 0
    """Also freeze this many of the lowest transformer layers."""
    normalize_policy_path: str | None = None
    """Encoders: fit the normalization on samples of this causal LM (e.g. the SFT policy) instead of
    the training pairs' responses."""
    shared_prompt: bool = True
    """Causal-LM backbones: run each pair's prompt once for chosen and rejected (its keys and values
    reused for both responses): the same scores with fewer FLOPs (``rollout/fast.py``). Encoders,
    batches whose prompts differ (one process) and runs where any pair's prompts differ or with
    tensor / pipeline parallelism (several processes) use the ``[2B, T]`` pass."""
    probes: bool = True
    """Run the bias probes (length, flattery, refusals, sanity) and write MODEL_CARD.md beside the model."""
    probe_max_items: int = 100
    """Cap on responses / XSTest prompts used per probe."""
    xstest_path: str = "safety/xstest_prompts.csv"
    """XSTest prompts (label == safe ones feed the over-refusal probe), relative to ``data_root``."""


@dataclass
class RMConfig(StageConfig):
    stage: str = "rm"
    """Stage name."""
    rm: RMHyperparams = field(default_factory=RMHyperparams)
    """Reward-model hyperparameters."""


@dataclass
class DPOHyperparams:
    beta: float = 0.1
    """KL strength beta (Rafailov et al. 2023 use 0.1 for most experiments)."""
    loss_type: str = "sigmoid"
    """sigmoid (DPO) | ipo (Azar et al. 2023) | kto (Ethayarajh et al. 2024: each pair is split
    into a desirable and an undesirable example; ``beta`` is KTO's beta, 0.1 in the paper)."""
    label_smoothing: float = 0.0
    """Conservative DPO: assumed label-flip rate (Mitchell 2023); 0 = plain DPO."""
    kto_desirable_weight: float = 1.0
    """KTO lambda_D. The paper keeps lambda_D n_D / (lambda_U n_U) in [1, 4/3]; pairs give
    n_D = n_U, so 1.0 / 1.0 is inside that range."""
    kto_undesirable_weight: float = 1.0
    """KTO lambda_U."""
    kto_unpaired: bool = False
    """KTO on unpaired data: ``data.train_path`` holds ``{"prompt", "completion", "label"}`` rows
    (TRL's KTO format; ``label`` true = desirable) instead of pairs. Needs ``loss_type=kto``; the
    weights should keep lambda_D n_D / (lambda_U n_U) in [1, 4/3] (a warning says when not)."""
    ref_path: str | None = None
    """Reference model; None = the starting model (``model.path``), frozen."""
    epochs: int = 1
    """Passes over the preference pairs."""
    shared_prompt: bool = True
    """Run each pair's prompt once for chosen and rejected (its keys and values reused for both
    responses) and the LM head on response tokens only: the same log-probs with fewer FLOPs
    (``rollout/fast.py``). Batches whose chosen and rejected prompts differ after truncation (one
    process), and runs where any pair's do or with tensor / pipeline parallelism (several
    processes), use the plain ``[2B, T]`` pass."""


@dataclass
class DPOConfig(StageConfig):
    stage: str = "dpo"
    """Stage name."""
    dpo: DPOHyperparams = field(default_factory=DPOHyperparams)
    """DPO hyperparameters."""


@dataclass
class RolloutConfig:
    max_new_tokens: int = 48
    """Response length cap in tokens."""
    temperature: float = 1.0
    """Sampling temperature; the same T divides logits in rollout, reference and training passes."""
    top_k: int = 0
    """Must stay 0: truncated sampling breaks the log-prob semantics (Huang et al. 2024)."""
    top_p: float = 1.0
    """Must stay 1.0 for the same reason."""
    backend: str = "native"
    """native (the project's batched KV-cache engine) | vllm (GPU only; weights synced each iteration)."""
    compile: bool = False
    """native backend, Llama-family policies without LoRA: ``torch.compile`` the one-token decode
    step with static shapes (cache length rounded up to a multiple of 64); the first rollout of
    each (batch, length) shape compiles (about 20 s on 35.7M parameters and 2 CPU cores). It
    runs the products on ``F.linear`` (no packed weights), and on that CPU it is now 1.3-1.5x
    slower than the default eager steps on packed weights (README "Performance"), so it is off
    by default."""
    packed_weights: bool = True
    """native backend, Llama-family policies without LoRA, CPU float32, eager steps: multiply by
    copies of the weights packed into oneDNN's layout at the start of each rollout (freed at its
    end) instead of calling MKL's sgemm through ``F.linear``. The same products in another
    summation order (logits within 1e-5 in the tests); on 35.7M parameters and 2 CPU cores the
    decode loop's matmuls run 2-3x faster (README "Performance")."""
    samples_per_prompt: int = 1
    """G responses sampled per prompt (contiguous groups; each prompt's pass runs once):
    ``trainer.batch_size`` counts responses, so a step draws ``batch_size / G`` prompts. The
    critic-free estimators (``ppo.advantage_estimator=grpo | rloo``) need G >= 2."""


@dataclass
class KLConfig:
    controller: str = "adaptive"
    """adaptive (Ziegler et al. 2019, eq. 2) | fixed."""
    init_coef: float = 0.1
    """Initial beta for the per-token KL penalty (Ziegler et al. 2019 use 0.1 for sentiment)."""
    target: float = 6.0
    """Adaptive controller's target KL in nats per sequence (Ziegler et al. 2019: 6)."""
    horizon: int = 10000
    """Adaptive controller horizon in samples (Ziegler et al. 2019: 10000)."""
    estimator: str = "k1"
    """Per-token KL estimator in the reward: k1 | k2 | k3 (Schulman 2020)."""


@dataclass
class PPOHyperparams:
    advantage_estimator: str = "gae"
    """gae (a value model and GAE, Schulman et al. 2016: PPO as in Ziegler et al. 2019 / Ouyang et
    al. 2022) | grpo (no value model; the group-normalized sequence reward of the G samples of a
    prompt, Shao et al. 2024) | rloo (no value model; the sequence reward minus the mean of the
    other G-1 samples, Ahmadian et al. 2024). For grpo / rloo the sequence reward is the RM score
    minus beta x the summed per-token KL (``kl.*``), every response token gets its sequence's
    advantage, and the clipped policy loss is PPO's. GRPO as in DeepSeekMath (KL in the loss, not
    the reward): ``kl.controller=fixed kl.init_coef=0 ppo.kl_loss_coef=...``."""
    epochs: int = 4
    """PPO epochs over each rollout batch (Ziegler et al. 2019: 4)."""
    num_minibatches: int = 4
    """Minibatches per epoch."""
    clip_eps: float = 0.2
    """Policy ratio clip (Schulman et al. 2017)."""
    value_clip: float = 0.2
    """Value clip range around the rollout values."""
    vf_coef: float = 0.1
    """Value-loss coefficient (Huang et al. 2024 / lm-human-preferences: 0.1)."""
    gamma: float = 1.0
    """Discount (1.0 for episodic text, Ziegler et al. 2019)."""
    lam: float = 0.95
    """GAE lambda (Ziegler et al. 2019: 0.95)."""
    whiten_advantages: bool = True
    """Whiten advantages over valid tokens of the batch (gae and rloo; grpo's are normalized
    within each group already)."""
    whiten_rewards: bool = False
    """Whiten scores over the batch before shaping."""
    missing_eos_penalty: float = 1.0
    """Subtracted from the score of responses that never emit EOS (0 disables)."""
    entropy_coef: float = 0.0
    """Entropy bonus coefficient."""
    kl_loss_coef: float = 0.0
    """Coefficient of the exact per-token KL(pi || pi_ref) over the whole vocabulary, added to the
    loss (besides the sampled-token KL penalty in the reward). 0 disables. Keeps the reference's
    full log-softmax of each rollout batch in memory (B x R x V floats): for small vocabularies."""
    value_model: str = "shared"
    """shared (value head on the policy trunk) | separate (critic initialized from the reward model).
    Unused by the critic-free estimators (grpo, rloo)."""
    reward_clip: float = 10.0
    """Clip scores to +-reward_clip; 0 disables."""
    reward_uncertainty_coef: float = 0.0
    """Uncertainty-penalized reward (Coste et al. 2023): score = mean - coef x std over the reward
    model's heads (``rm.ensemble_size``) or the members of an ensemble directory (``ensemble.json``,
    ``RewardEnsemble``). 0 disables; > 0 needs at least two heads in all."""
    logprobs_from_rollout: bool = True
    """Take the old log-probs (and the shared value head's values) from the rollout's KV-cache
    forward passes instead of a second forward over the batch (same function, equal up to float
    rounding; native HF rollouts only, others always score separately). false: the separate pass."""


@dataclass
class PPOConfig(StageConfig):
    stage: str = "ppo"
    """Stage name."""
    reward_model_path: str = "${artifacts_dir}/rm/model"
    """Frozen reward model directory."""
    ref_path: str | None = None
    """Reference model; None = the starting policy (``model.path``), frozen (or adapter-disabled with LoRA)."""
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    """Generation settings."""
    kl: KLConfig = field(default_factory=KLConfig)
    """KL penalty settings."""
    ppo: PPOHyperparams = field(default_factory=PPOHyperparams)
    """PPO update hyperparameters."""
    gold_eval_every: int = 0
    """Score held-out prompts with the task's gold reward every N steps (embedded task only); 0 = never."""
    gold_eval_prompts: int = 64
    """Held-out prompts for the periodic gold evaluation."""
    gold_task: str | None = "stories"
    """Task whose hidden gold reward is tracked during training (``stories`` = the embedded demo); None = none."""


@dataclass
class DemoDataConfig(StageConfig):
    stage: str = "data"
    """Stage name."""
    n_prompts: int = 3000
    """Story openings generated for training and dev (``n_prompts - n_dev`` train prompts)."""
    n_dev: int = 256
    """Dev prompts, split off the ``n_prompts``: PPO's periodic gold evaluation and any tuning
    (never trained on)."""
    n_test: int = 256
    """Test prompts, generated after the ``n_prompts`` by the same generator (so train and dev do
    not depend on it): the evaluation report only, nothing is tuned on them."""
    completions_per_prompt: int = 4
    """Samples per training prompt from the base model, paired for labeling."""
    pairs_per_prompt: int = 3
    """Distinct pairs labeled per prompt (at most k(k-1)/2); labels are cheap, samples are not."""
    n_pref_prompts: int = 2000
    """Training prompts that get labeled pairs."""
    max_new_tokens: int = 48
    """Completion length cap."""
    temperature: float = 1.0
    """Base-model sampling temperature for the preference data."""
    flip_prob: float = 0.25
    """Each simulated labeler flips this fraction of its labels (AlpacaFarm)."""
    sft_source: str = "chosen"
    """SFT targets: chosen completions of the labeled pairs (as the DPO paper does for HH)."""


@dataclass
class EvalConfig(StageConfig):
    stage: str = "eval"
    """Stage name."""
    policies: list[str] = field(default_factory=lambda: ["sft", "dpo", "ppo"])
    """Policies evaluated, read from ``artifacts_dir/<name>/model``."""
    test_prompts_path: str = "${abspath:${artifacts_dir}}/data/prompts_test.jsonl"
    """Test split: every metric, win-rate and target of the report (nothing is tuned on it)."""
    dev_prompts_path: str | None = "${data.eval_path}"
    """Dev split (PPO's periodic gold evaluation, tuning): gold win-rates only, reported as
    ``winrate_dev`` beside the test split's; None skips it."""
    max_new_tokens: int = 48
    """Completion length cap for evaluation samples."""
    temperature: float = 1.0
    """Sampling temperature for evaluation samples."""
    n_bootstrap: int = 2000
    """Bootstrap resamples for confidence intervals."""


@dataclass
class RMEvalConfig:
    """``python eval/rm_eval.py rm_path=DIR data_path=FILE output_dir=DIR``."""

    rm_path: str = MISSING
    """Trained reward model directory (``RewardModel.save``) or ensemble directory (``ensemble.json``)."""
    data_path: str = MISSING
    """Preference file (HH, UltraFeedback, plain, ShareGPT; format auto-detected). A path that exists
    from the working directory is used as is, else it is relative to ``data_root``."""
    output_dir: str = MISSING
    """Where ``rm_eval.json``, ``reliability.png`` and ``rm_eval_scores.jsonl`` are written."""
    data_root: str = field(default_factory=default_data_root)
    """Root for relative data paths."""
    adapter: str = "auto"
    """Record format: auto | hh | ultrafeedback | plain | sharegpt."""
    template: str | None = None
    """Prompt template; None = the one the RM was trained with (``hh`` if unknown)."""
    max_pairs: int | None = None
    """Score at most this many pairs (None = all)."""
    max_length: int | None = None
    """Token cap per sequence; None = the RM's training length (long pairs are truncated, never dropped)."""
    batch_size: int = 32
    """Sequences per forward pass."""
    device: str = "cpu"
    """cpu | cuda."""
    seed: int = 0
    """Seed of the random pair order used for calibration."""
    model_card: bool = True
    """Run the bias probes and write ``MODEL_CARD.md`` into ``rm_path`` when it is missing."""
    probe_max_items: int = 100
    """Cap on items per probe."""
    xstest_path: str = "safety/xstest_prompts.csv"
    """XSTest prompts for the over-refusal probe, relative to ``data_root``."""


@dataclass
class PipelineConfig:
    artifacts_dir: str = "runs/demo"
    """Where every stage writes (``runs/demo/<stage>``)."""
    data_root: str = DATA_ROOT_INTERP
    """Root for relative data paths."""
    seed: int = 0
    """Seed passed to every stage."""
    stages: list[str] = field(default_factory=lambda: ["data", "sft", "rm", "ppo", "dpo", "eval"])
    """Stages to run, in order."""
    stage_overrides: dict[str, list[str]] = field(default_factory=dict)
    """Extra Hydra overrides per stage, e.g. ``{ppo: ["trainer.max_steps=10"]}``."""
    common_overrides: list[str] = field(default_factory=list)
    """Overrides passed to every stage."""
    skip_existing: bool = False
    """Skip a stage whose run_dir already holds a finished marker."""
    jobs: int = 1
    """Stages in flight at once. 1: one after another, in this process. N > 1: later stages whose
    inputs are ready also start, in up to N-1 background processes (DPO beside RM -> PPO)."""


# ----------------------------------------------------------------------------- win-rate / judges
# Entry points eval/winrate.py, eval/generate_samples.py, eval/hh_eval.py
# (logic in rlhfstack/evaluation/judges.py and rlhfstack/evaluation/winrate.py).


@dataclass
class LLMJudgeConfig:
    """An LLM judge behind an OpenAI-compatible chat-completions endpoint."""

    model: str = "gpt-4o"
    """Model name sent with each request (for vLLM: the served model's name)."""
    base_url: str | None = None
    """Endpoint root, e.g. ``http://127.0.0.1:8000/v1`` (local vLLM) or a vendor gateway;
    None = ``$OPENAI_BASE_URL`` or the OpenAI API."""
    api_key_env: str | None = "OPENAI_API_KEY"
    """NAME of the environment variable holding the API key; the key itself never appears in
    configs, logs or the cache. Local servers without a key get a placeholder."""
    temperature: float = 0.0
    """Judge sampling temperature (MT-Bench, Zheng et al. 2023: 0)."""
    max_tokens: int | None = 2048
    """Cap on the judge's reply (MT-Bench: 2048); None sends no cap."""
    requests_per_minute: float = 60.0
    """Rate limit (request starts per minute, retries included); 0 disables it."""
    max_retries: int = 6
    """Retries of a request on HTTP 408/409/429/5xx, connection errors and timeouts."""
    backoff_base_s: float = 1.0
    """Exponential backoff: wait ``backoff_base_s * 2**attempt`` (+0-25% jitter) before retrying."""
    backoff_max_s: float = 60.0
    """Cap on one backoff wait (also on an honoured ``Retry-After``)."""
    timeout_s: float = 120.0
    """Per-request timeout."""
    concurrency: int = 4
    """Requests in flight at once."""
    prompt_file: str | None = "eval_prompts/mt_bench_judge_prompts.jsonl"
    """MT-Bench-style judge prompt file (relative to ``data_root``); None or missing = the
    built-in pairwise prompt."""
    prompt_name: str = "pair-v2"
    """Single-turn pairwise template in ``prompt_file`` (MT-Bench's general ``pair-v2``)."""


@dataclass
class JudgingConfig:
    """Judges and statistics shared by the win-rate entry points."""

    judge: str = "gold"
    """One judge: ``gold`` (the demo's hidden gold reward), ``rm`` (``rm_path``), ``llm`` (the
    ``llm`` block) or a name in ``llm_judges``."""
    judges: list[str] = field(default_factory=list)
    """Several judges, combined (per-pair outcomes averaged) with their agreement (Cohen's kappa
    for two, Fleiss' kappa for more); overrides ``judge`` when non-empty."""
    artifacts_dir: str = "runs/demo"
    """Demo artifacts (``data/gold.json`` and ``base_model/``) for ``judge=gold``."""
    rm_path: str | None = None
    """Reward-model directory (saved by the RM stage) for ``judge=rm``."""
    rm_max_len: int = 1024
    """Token cap per RM-scored sequence (long prompts keep their end)."""
    llm: LLMJudgeConfig = field(default_factory=LLMJudgeConfig)
    """The ``llm`` judge, and the defaults of every entry of ``llm_judges``."""
    llm_judges: dict[str, Any] = field(default_factory=dict)
    """More LLM judges by name, each a partial ``LLMJudgeConfig`` on top of ``llm``, e.g.
    ``+llm_judges.local.base_url=http://127.0.0.1:8000/v1 +llm_judges.local.model=NAME``."""
    cache_path: str | None = "runs/judge_cache.sqlite"
    """SQLite cache of every judgment (reruns are free, interrupted runs resume); None = off."""
    device: str = "cpu"
    """Device of the gold / RM judges (and of local generation)."""
    batch_size: int = 16
    """Sequences per forward pass of the RM judge."""
    length_unit: str = "chars"
    """Answer length for the length-controlled rate: chars (as AlpacaEval 2.0) | words."""
    n_bootstrap: int = 2000
    """Bootstrap resamples (over prompts) for confidence intervals."""
    lc_n_bootstrap: int = 200
    """Bootstrap refits of the length-controlled GLM for its interval; 0 = no interval."""
    seed: int = 0
    """Seed of the bootstrap (and of generation / prompt sampling where there is one)."""
    data_root: str = DATA_ROOT_INTERP
    """Root for relative data paths (``$RLHF_DATA_ROOT``, else ``../shared/data``)."""


@dataclass
class WinrateConfig(JudgingConfig):
    a: str = MISSING
    """Samples of system A (jsonl of ``{prompt, completion}``)."""
    b: str = MISSING
    """Samples of system B; pairs are matched by prompt (k-th occurrence with k-th)."""
    output_dir: str = "runs/eval/winrate"
    """Where ``winrate.json``, ``judgments.jsonl`` and ``config.yaml`` are written."""
    max_pairs: int | None = None
    """Judge at most this many matched pairs (the first ones); None = all."""


@dataclass
class GenerationConfig:
    """Sampling settings for local HF models and OpenAI-compatible endpoints."""

    max_new_tokens: int = 128
    """Completion length cap (tokens)."""
    max_prompt_tokens: int = 512
    """Local models: longer prompts keep their last tokens."""
    temperature: float = 1.0
    """Sampling temperature."""
    greedy: bool = False
    """Local models: argmax decoding (endpoints: use temperature 0)."""
    batch_size: int = 16
    """Local models: prompts per generation batch."""
    stop: list[str] = field(default_factory=list)
    """Cut each completion at the first of these strings (e.g. ``"\n\nHuman:"`` for HH)."""
    dtype: str = "float32"
    """Local models: parameter dtype."""
    api_model: str | None = None
    """Endpoints: model name to request (required when ``model`` is a URL)."""
    api_key_env: str | None = "OPENAI_API_KEY"
    """Endpoints: NAME of the environment variable holding the API key."""
    requests_per_minute: float = 60.0
    """Endpoints: rate limit; 0 disables it."""
    max_retries: int = 6
    """Endpoints: retries on 429/5xx/connection errors with exponential backoff."""
    backoff_base_s: float = 1.0
    """Endpoints: first backoff wait (doubles per retry)."""
    timeout_s: float = 120.0
    """Endpoints: per-request timeout."""
    concurrency: int = 4
    """Endpoints: requests in flight at once."""


@dataclass
class GenerateSamplesConfig:
    model_path: str = MISSING
    """An exported HF model directory, or an OpenAI-compatible endpoint URL (``http(s)://...``).
    ``eval/generate_samples.py`` also takes it as ``model=...`` (Hydra reserves ``model`` for
    the model config group, so the script renames the argument)."""
    prompts: str = MISSING
    """Prompt file (jsonl with ``prompt``, or any format the data loaders read), relative to
    ``data_root`` unless absolute."""
    output: str = MISSING
    """Output jsonl of ``{prompt, completion}``."""
    adapter: str = "auto"
    """Record format of ``prompts`` (see ``data.adapter``)."""
    template: str = "plain"
    """Chat template applied to the prompts (see ``data.template``)."""
    max_prompts: int | None = None
    """Use at most this many prompts (the first ones); None = all."""
    generation: GenerationConfig = field(default_factory=GenerationConfig)
    """Sampling settings."""
    device: str = "cpu"
    """Local models: cpu | cuda."""
    seed: int = 0
    """Sampling seed."""
    data_root: str = DATA_ROOT_INTERP
    """Root for relative data paths."""


@dataclass
class HHEvalConfig(JudgingConfig):
    judge: str = "rm"
    """Judge (default: the reward model at ``rm_path``); see ``judges`` for several."""
    policy: str = MISSING
    """Policy: HF model directory, endpoint URL, or a samples ``.jsonl`` already generated."""
    baseline: str = MISSING
    """Baseline, same forms as ``policy``."""
    policy_api_model: str | None = None
    """Model name when ``policy`` is an endpoint (default ``generation.api_model``)."""
    baseline_api_model: str | None = None
    """Model name when ``baseline`` is an endpoint (default ``generation.api_model``)."""
    prompts: str = "preference/hh-rlhf_harmless-base_1812.jsonl.gz"
    """HH-RLHF file whose conversations (minus the last response) are the prompts."""
    adapter: str = "hh"
    """Record format of ``prompts``."""
    template: str = "hh"
    """Chat template of the prompts (``hh``: ``\n\nHuman: ...\n\nAssistant:``)."""
    n_prompts: int | None = 200
    """Prompts sampled (seeded) from the file; None = all."""
    generation: GenerationConfig = field(
        default_factory=lambda: GenerationConfig(stop=["\n\nHuman:", "\n\nAssistant:"])
    )
    """Sampling settings (completions are cut where the model starts a new turn)."""
    output_dir: str = "runs/eval/hh"
    """Where samples, ``winrate.json`` and ``hh_eval.json`` are written."""


# ----------------------------------------------------------------------------- eval suite:
# MMLU alignment tax, reward-hacking detectors, over-optimization (eval/mmlu.py,
# eval/reward_hacking.py, eval/overoptimization.py)


@dataclass
class MMLUEvalConfig:
    model_path: str = MISSING
    """HF directory of the evaluated (aligned) policy."""
    tokenizer_path: str | None = None
    """Tokenizer directory; defaults to ``model_path``."""
    baseline_path: str | None = None
    """HF directory of the baseline (usually the SFT model); gives ``alignment_tax``."""
    baseline_results: str | None = None
    """An earlier run's ``output_dir`` (or its ``mmlu.json``) used as the baseline instead of
    re-evaluating ``baseline_path``."""
    output_dir: str = "runs/eval/mmlu"
    """Where ``mmlu.json``, ``mmlu_items.json`` and the generated lm-eval task YAMLs go."""
    data_root: str = DATA_ROOT_INTERP
    """Root for relative data paths."""
    mmlu_dir: str = "benchmarks/mmlu"
    """MMLU CSVs (``dev/`` and ``test/``), relative to ``data_root`` unless absolute."""
    subjects: list[str] = field(default_factory=list)
    """Subjects to evaluate, e.g. ``[anatomy,astronomy]``; empty = all 57."""
    num_fewshot: int = 5
    """Shots (Hendrycks et al. 2021 use 5); reduced per subject when prompts exceed max_length."""
    limit: int | None = None
    """Evaluate only the first ``limit`` test questions of each subject (quick runs)."""
    max_length: int | None = None
    """Context length; default the model's ``max_position_embeddings``."""
    min_fit_fraction: float = 0.95
    """Keep the most shots for which at least this fraction of prompts fits in max_length."""
    apply_chat_template: bool = False
    """Wrap prompts in the tokenizer's chat template (instruct models)."""
    batch_size: int = 8
    """lm-eval batch size."""
    dtype: str = "float32"
    """Model dtype: float32 | bfloat16 | float16."""
    device: str = "auto"
    """cpu | cuda | auto."""
    seed: int = 1234
    """lm-eval's python/numpy/torch/few-shot seeds."""
    n_bootstrap: int = 2000
    """Paired bootstrap resamples of the alignment-tax CI."""


@dataclass
class RewardHackingConfig:
    samples: str = MISSING
    """Policy completions (.jsonl/.json records with ``completion``/``response``/``output``)."""
    reference: str | None = None
    """Reference completions (e.g. the SFT policy on the same prompts); same format."""
    output_dir: str = "runs/eval/reward_hacking"
    """Where ``reward_hacking.json`` goes."""
    data_root: str = DATA_ROOT_INTERP
    """Root for relative data paths."""
    xstest_path: str = "safety/xstest_prompts.csv"
    """XSTest prompts (Rottger et al. 2024; 250 safe / 200 unsafe), relative to data_root."""
    xstest_samples: str | None = None
    """Policy completions of XSTest prompts; else generated from ``model_path`` when given."""
    xstest_reference: str | None = None
    """Reference completions of XSTest prompts; else generated from ``reference_model_path``."""
    model_path: str | None = None
    """Policy HF directory: generates XSTest completions and runs the sycophancy probe."""
    reference_model_path: str | None = None
    """Reference HF directory: reference-relative XSTest and sycophancy thresholds."""
    ppo_run_dir: str | None = None
    """PPO run whose metrics.jsonl (eval/gold_reward, eval/proxy_reward) gives proxy_gold_gap."""
    template: str = "hh"
    """Chat template for model queries: hh | chatml | plain | tokenizer."""
    max_new_tokens: int = 64
    """Completion length cap for XSTest generations."""
    max_prompt_tokens: int = 128
    """Prompt token cap (left-truncated)."""
    greedy: bool = True
    """Greedy decoding for XSTest generations."""
    temperature: float = 1.0
    """Sampling temperature when ``greedy`` is false."""
    batch_size: int = 32
    """Generation batch size."""
    dtype: str = "float32"
    """Model dtype."""
    device: str = "auto"
    """cpu | cuda | auto."""
    seed: int = 0
    """Seed (generation, distinct-n subsampling)."""
    thresholds: DetectorThresholds = field(default_factory=DetectorThresholds)
    """Detector thresholds (see ``rlhfstack.evaluation.detectors``)."""


@dataclass
class OveroptimizationConfig:
    run_dir: str = MISSING
    """PPO run directory whose metrics.jsonl has kl/seq_k1, eval/gold_reward, eval/proxy_reward."""
    output_dir: str = "runs/eval/overoptimization"
    """Where ``overoptimization.json`` and ``overoptimization.png`` go."""
    offset: bool = True
    """Fit a free offset R0 in R(d) = R0 + d (alpha - beta log d) (Gao et al. 2022)."""
    kl_key: str = "kl/seq_k1"
    """metrics.jsonl column of the per-sequence KL (nats)."""
    gold_key: str = "eval/gold_reward"
    """Column of the gold reward."""
    proxy_key: str = "eval/proxy_reward"
    """Column of the proxy (reward-model) reward."""


EVAL_SUITE_SCHEMAS: dict[str, type] = {
    "mmlu": MMLUEvalConfig,
    "reward_hacking": RewardHackingConfig,
    "overoptimization": OveroptimizationConfig,
}


EVAL_ENTRY_SCHEMAS: dict[str, type] = {
    "winrate": WinrateConfig,
    "generate_samples": GenerateSamplesConfig,
    "hh_eval": HHEvalConfig,
}


STAGE_SCHEMAS: dict[str, type] = {
    "data": DemoDataConfig,
    "sft": SFTConfig,
    "rm": RMConfig,
    "ppo": PPOConfig,
    "dpo": DPOConfig,
    "eval": EvalConfig,
}

PRIMARY_CONFIG_NAMES = {
    "data": "demo_data",
    "sft": "sft",
    "rm": "rm",
    "ppo": "ppo",
    "dpo": "dpo",
    "eval": "evaluate",
    "pipeline": "pipeline",
}


def _abspath(path: str) -> str:
    return os.path.abspath(path)


# ``${abspath:${artifacts_dir}}/data/x.jsonl``: files a run generated are named by absolute path, so
# that the data loader never mistakes them for files under the shared data root.
if not OmegaConf.has_resolver("abspath"):
    OmegaConf.register_new_resolver("abspath", _abspath)


def register_configs() -> None:
    """Register every schema in Hydra's ConfigStore (idempotent)."""
    cs = ConfigStore.instance()
    for name, schema in STAGE_SCHEMAS.items():
        cs.store(name=f"{PRIMARY_CONFIG_NAMES[name]}_schema", node=schema)
    cs.store(name="pipeline_schema", node=PipelineConfig)
    cs.store(name="rm_eval_schema", node=RMEvalConfig)
    cs.store(group="model", name="model_schema", node=ModelConfig)
    cs.store(group="data", name="data_schema", node=DataConfig)
    cs.store(group="cluster", name="cluster_schema", node=ClusterConfig)
    for name, schema in EVAL_ENTRY_SCHEMAS.items():
        cs.store(name=f"{name}_schema", node=schema)
    for name, schema in EVAL_SUITE_SCHEMAS.items():
        cs.store(name=f"{name}_schema", node=schema)


register_configs()


def load_config(stage: str, overrides: list[str] | None = None) -> DictConfig:
    """Compose ``conf/<stage>.yaml`` with Hydra overrides, outside ``@hydra.main``.

    Returns the composed (struct-mode) DictConfig; unknown keys raise.
    """
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    name = PRIMARY_CONFIG_NAMES.get(stage, stage)
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(config_name=name, overrides=list(overrides or []))
    return cfg


def to_object(cfg: DictConfig | Any) -> Any:
    """Resolve interpolations and return the typed dataclass instance.

    Keys added with Hydra's ``+key=value`` that the schema does not declare are rejected here
    (Hydra lets ``+`` append to a structured node; the typed object would silently drop them).
    """
    if not isinstance(cfg, DictConfig):
        return cfg
    schema = OmegaConf.get_type(cfg)
    if schema is not None and schema is not dict:
        try:
            OmegaConf.merge(
                OmegaConf.structured(schema), OmegaConf.to_container(cfg, resolve=False)
            )
        except Exception as err:  # omegaconf raises ConfigKeyError / ValidationError
            raise ValueError(f"invalid config for {schema.__name__}: {err}") from None
    return OmegaConf.to_object(cfg)


def resolved_yaml(cfg: Any) -> str:
    """The fully resolved config as YAML (dataclass or DictConfig)."""
    node = OmegaConf.structured(cfg) if not isinstance(cfg, DictConfig) else cfg
    return OmegaConf.to_yaml(node, resolve=True)
