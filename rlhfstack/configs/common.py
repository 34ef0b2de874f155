"""Config groups every stage shares: model, data, cluster, parallel layout, trainer, logging.

Also where the repository's ``conf/`` tree and the default data root are found.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass, field, is_dataclass
from pathlib import Path
from typing import Any

from omegaconf import MISSING, DictConfig, OmegaConf

from rlhfstack.configs.checks import (
    at_least,
    checked,
    choice,
    free,
    in_range,
    is_adapter_name,
    nonnegative,
    positive,
    reason,
    torch_device,
)

REPO_ROOT = Path(__file__).resolve().parents[2]
"""The repository root in a checkout (editable install); in an installed wheel, the directory
holding the ``rlhfstack`` package."""


def find_conf_dir(package_dir: Path, repo_root: Path) -> Path:
    """The Hydra config tree: ``rlhfstack/conf`` inside an installed wheel (``conf/`` shipped as
    the package ``rlhfstack.conf``), else the checkout's top-level ``conf/``."""
    packaged = package_dir / "conf"
    return packaged if packaged.is_dir() else repo_root / "conf"


CONF_DIR = find_conf_dir(Path(__file__).resolve().parents[1], REPO_ROOT)


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
    r: int = at_least(8, lo=1)
    """Adapter rank."""
    alpha: float = positive(16.0)
    """LoRA scaling numerator (scale = alpha / r)."""
    dropout: float = in_range(0.0, lo=0.0, hi=1.0, hi_open=True)
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
        ],
        metadata=reason("module names: matched against the model when the adapters are built"),
    )
    """Module names that receive adapters."""
    quantize_4bit: bool = False
    """QLoRA (Dettmers et al. 2023): load the frozen base in bitsandbytes NF4. GPU only."""


@dataclass
class ModelConfig:
    name: str = free("stories260k", "display name in logs and reports, any text")
    """Human-readable name for logs and reports."""
    path: str = free(MISSING, "a model path: checked when the stage starts (training.check_paths)")
    """Local HF directory (or a hub id, for users with hub access) of the starting checkpoint."""
    tokenizer_path: str | None = free(
        None, "a model path: checked when the stage starts (training.check_paths)"
    )
    """Tokenizer directory; defaults to ``path``."""
    pad_token: str | None = free(
        None, "a vocabulary entry: checked against the tokenizer when it loads"
    )
    """An existing vocabulary entry used as PAD when the tokenizer has none or reuses EOS
    (never EOS itself: masks built from ``ids != pad`` would hide real EOS tokens)."""
    dtype: str = choice("float32", "bfloat16", "float16")
    """Parameter dtype: float32 | bfloat16 | float16. bf16 is the GPU default for large models."""
    activation_checkpointing: bool = False
    """Recompute activations in the backward pass to save memory."""
    lora: LoraConfig = field(default_factory=LoraConfig)
    """LoRA / QLoRA settings."""
    arch: dict[str, Any] = field(
        default_factory=dict, metadata=reason("HF config.json fields, read by transformers")
    )
    """Architecture of the model for meta-device checks when the weights are not local: HF
    ``config.json`` fields, ``model_type`` included; empty = not given. Unused by training."""


@dataclass
class DataConfig:
    train_path: str | None = free(
        None, "a data path: checked when the stage starts (training.check_paths)"
    )
    """Training file (json, jsonl, jsonl.gz, csv, parquet), relative to ``data_root`` unless absolute; or ``hf://org/name:split``."""
    eval_path: str | None = free(
        None, "a data path: checked when the stage starts (training.check_paths)"
    )
    """Validation file; when unset, ``validation_fraction`` of the training file is held out."""
    adapter: str = checked(
        "auto",
        is_adapter_name,
        "auto | plain | hh | ultrafeedback | alpaca | sharegpt | messages | turns | field:NAME",
    )
    """Record format: auto | plain | hh | ultrafeedback | alpaca | sharegpt."""
    template: str = choice("plain", "hh", "chatml", "tokenizer")
    """Chat template applied to prompts: plain | hh | chatml | tokenizer."""
    on_error: str = choice("raise", "skip")
    """Malformed rows: ``raise`` (error naming file, line and field) or ``skip`` (counted in the run log)."""
    validation_fraction: float = in_range(0.1, lo=0.0, hi=1.0, hi_open=True)
    """Fraction of the training file held out when ``eval_path`` is unset."""
    max_prompt_tokens: int = at_least(64, lo=1)
    """Examples whose prompt is longer are filtered out (counted)."""
    max_response_tokens: int = at_least(64, lo=1)
    """Examples whose response is longer are filtered out (counted)."""
    max_examples: int | None = at_least(None, lo=1)
    """Use at most this many training examples (after shuffling); None for all."""


@dataclass
class ClusterConfig:
    name: str = choice("local", "slurm")
    """local | slurm."""
    backend: str = choice("gloo", "nccl")
    """torch.distributed backend: gloo on CPU, nccl on GPU."""
    device: str = torch_device("cpu")
    """cpu | cuda."""
    num_threads: int = nonnegative(0)
    """torch intra-op threads; 0 leaves torch's default."""
    nodes: int = at_least(1, lo=1)
    """Number of nodes (SLURM)."""
    gpus_per_node: int = nonnegative(0)
    """Accelerators per node (SLURM)."""
    partition: str | None = free(None, "a SLURM partition name, checked by sbatch")
    """SLURM partition."""
    account: str | None = free(None, "a SLURM account name, checked by sbatch")
    """SLURM account."""
    time_limit: str = free("04:00:00", "a SLURM time string, checked by sbatch")
    """SLURM wall-clock limit."""


@dataclass
class ParallelConfig:
    dp_shard: int = checked(1, lambda v: v == -1 or v >= 1, "-1 or >= 1")
    """FSDP2 sharded data-parallel degree; -1 = world size / (tp * pp)."""
    tp: int = at_least(1, lo=1)
    """DTensor tensor-parallel degree."""
    pp: int = at_least(1, lo=1)
    """Pipeline-parallel degree."""
    mixed_precision: str = choice("none", "bf16")
    """none | bf16: bf16 compute with fp32 master weights and fp32 gradient reduction
    (FSDP2 MixedPrecisionPolicy under dp_shard > 1, torch.autocast otherwise)."""
    pp_tied_grads: str = choice("micro_batch", "stage")
    """How pipeline stages sum the gradient of a weight that two stages run (a tied embedding /
    LM head): micro_batch adds the stages' contributions micro-batch by micro-batch, in the order
    one process accumulates them (the one-process gradient bit for bit; one copy of that
    gradient per micro-batch), stage adds each stage's accumulated sum once (no extra memory;
    float32 reassociation)."""


@dataclass
class TrainerConfig:
    max_steps: int = nonnegative(100)
    """Optimizer steps (PPO: rollout + update iterations)."""
    save_every: int = nonnegative(0)
    """Save a checkpoint every N steps; 0 saves only the final model."""
    batch_size: int = at_least(32, lo=1)
    """Global batch size in sequences (pairs for preference stages; prompts for PPO rollouts)."""
    micro_batch_size: int = at_least(32, lo=1)
    """Sequences per forward/backward; gradient accumulation = batch_size / micro_batch_size."""
    lr: float = nonnegative(1e-4)
    """Peak learning rate."""
    lr_schedule: str = choice("linear", "cosine", "constant")
    """linear (anneal to 0, as in the PPO details of Huang et al. 2024) | cosine | constant."""
    warmup_steps: int = nonnegative(0)
    """Linear warm-up steps."""
    weight_decay: float = nonnegative(0.0)
    """AdamW weight decay."""
    adam_eps: float = positive(1e-8)
    """Adam epsilon."""
    adam_betas: list[float] = checked(
        [0.9, 0.999],
        lambda v: len(v) == 2 and all(0 <= b < 1 for b in v),
        "two numbers in [0, 1)",
    )
    """Adam betas."""
    grad_clip: float = nonnegative(1.0)
    """Max global gradient norm; 0 disables clipping."""
    eval_every: int = nonnegative(0)
    """Evaluate every N steps, and redraw ``dashboard.png``; 0 only at the end. PPO evaluates
    with the gold reward (``gold_eval_every``); there this only redraws the dashboard."""
    log_every: int = at_least(1, lo=1)
    """A metrics row and a progress line (loss, rate, ETA) every N steps and at the last; a step
    with an evaluation also gets its row."""


@dataclass
class LoggingConfig:
    tensorboard: bool = True
    """Write TensorBoard event files into ``run_dir/tb``."""
    wandb: bool = False
    """Log to Weights & Biases."""
    wandb_mode: str = choice("offline", "online", "disabled")
    """W&B mode: offline (default, no network) | online."""
    wandb_project: str = free("rlhfstack", "a W&B project name, any text")
    """W&B project name."""
    plots: bool = True
    """Draw the stage's dashboard (``run_dir/dashboard.png``, a grid of its logged diagnostics)
    at every evaluation (``trainer.eval_every``; PPO: also every gold evaluation) and at the end."""


@dataclass
class EndpointConfig:
    """An OpenAI-compatible chat-completions endpoint (vLLM, a vendor gateway, the OpenAI API):
    the one spelling of an endpoint in every config block that talks to one (``llm.*`` for the
    judges, ``generation.*`` for sampling)."""

    base_url: str | None = free(
        None, "an endpoint URL, reached (and reported when down) by the client"
    )
    """Endpoint root, e.g. ``http://127.0.0.1:8000/v1`` (local vLLM) or a vendor gateway."""
    model: str | None = free(None, "a served model name, checked by the endpoint")
    """Model name sent with each request (for vLLM: the served model's name)."""
    api_key_env: str | None = free("OPENAI_API_KEY", "an environment variable name, any text")
    """NAME of the environment variable holding the API key; the key itself never appears in
    configs, logs or the cache. Local servers without a key get a placeholder."""


#: Keys that no config has, with the key that does their job: ``old -> new``; an override of
#: the old key stops with the new one named (``rlhfstack.cli.precheck``).
RENAMED_KEYS: dict[str, str] = {
    "generation.api_model": "generation.model (and generation.base_url=URL for the endpoint)",
}


@dataclass
class StageConfig:
    """Fields every stage shares."""

    stage: str = free(MISSING, "set by each stage's schema and primary YAML")
    """Stage name (set by the stage's primary YAML)."""
    run_dir: str = free("${artifacts_dir}/${stage}", "an output directory: created by the run")
    """Where this run writes its model, metrics.jsonl, TensorBoard events and resolved config."""
    artifacts_dir: str = free(
        "runs/demo", "a directory: the inputs in it are checked when a stage starts"
    )
    """Where the artifacts of earlier stages are found (``base_model/``, ``sft/model``, ...)."""
    data_root: str = free(
        DATA_ROOT_INTERP, "a directory: the data paths under it are checked when a stage starts"
    )
    """Root for relative data paths (``$RLHF_DATA_ROOT``, else ``../shared/data``)."""
    seed: int = free(0, "any integer seeds python, numpy and torch")
    """Seed for python, numpy and torch."""
    resume: str = choice("auto", "force")
    """When ``run_dir`` holds a checkpoint: ``auto`` resumes from the newest if its recipe
    (:func:`recipe_of`: the settings that define the math) equals this run's, else stops before
    any model loads with the keys that differ; ``force`` resumes even when they differ (the new
    settings apply from the checkpoint on; recorded in ``config.yaml`` and ``recipe.json``)."""
    overwrite: bool = False
    """Start over in a ``run_dir`` that holds an earlier run: its ``ckpt-*`` directories,
    ``metrics.jsonl`` and ``done.json`` are deleted (each logged) before anything is written."""
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)


# ----------------------------------------------------------------------------- recipe

#: Settings left out of a run's recipe (dotted keys; a key also covers everything under it).
#: The recipe is what decides the math of a run, so that a checkpoint is resumed only under the
#: settings that produced it (``resume``). Left out are settings that change where files go,
#: what is logged or measured, where and how the same computation runs:
RECIPE_EXCLUDE: tuple[str, ...] = (
    # where files are read and written, not what is computed
    "run_dir",
    "artifacts_dir",
    "data_root",
    # how this invocation treats an existing run_dir
    "resume",
    "overwrite",
    # what is recorded and where the run executes
    "logging",
    "cluster",
    # the parallel layout (checkpoints reshard); parallel.mixed_precision changes numerics: kept
    "parallel.dp_shard",
    "parallel.tp",
    "parallel.pp",
    "parallel.pp_tied_grads",  # the same sum in another order
    # when checkpoints, metrics and intermediate evaluations are written
    "trainer.save_every",
    "trainer.log_every",
    "trainer.eval_every",
    # gradient accumulation: the same step gradient up to float rounding
    "trainer.micro_batch_size",
    # a label; model facts for meta-device checks (unused by training); recomputation
    "model.name",
    "model.arch",
    "model.activation_checkpointing",
    # PPO: held-out gold measurement; the same rollout function in another summation order
    "gold_eval_every",
    "gold_eval_prompts",
    "gold_task",
    "rollout.compile",
    "rollout.packed_weights",
    "rollout.tp_decode",
    "ppo.logprobs_from_rollout",
    "ppo.mismatch_threshold",
    # PPO: the runaway-KL guard stops a run; it does not change the math of one that goes on
    "kl.stop_multiple",
    "kl.stop_patience",
    # RM: evaluations after training
    "rm.probes",
    "rm.probe_max_items",
    "rm.xstest_path",
    "rm.extra_eval",
    # where the AI feedback model's answers are cached (the answers are the same)
    "feedback.cache_path",
    "dpo.online_feedback.cache_path",
)


def _flatten(obj: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(obj, dict) and obj:
        out: dict[str, Any] = {}
        for k, v in obj.items():
            out.update(_flatten(v, f"{prefix}.{k}" if prefix else str(k)))
        return out
    return {prefix: obj}


def _excluded(key: str) -> bool:
    return any(key == e or key.startswith(e + ".") for e in RECIPE_EXCLUDE)


def recipe_of(cfg: Any) -> dict[str, Any]:
    """The recipe of a stage config (a dataclass instance, as the stages receive it, or a
    composed DictConfig): its resolved fields as ``{"dotted.key": value}`` (JSON values), less
    :data:`RECIPE_EXCLUDE`."""
    if isinstance(cfg, DictConfig):
        fields = OmegaConf.to_container(cfg, resolve=True)
    elif is_dataclass(cfg) and not isinstance(cfg, type):
        fields = asdict(cfg)
    else:
        raise TypeError(f"recipe_of: a stage config, not {type(cfg).__name__}")
    flat = _flatten(json.loads(json.dumps(fields, default=str)))
    return {k: v for k, v in sorted(flat.items()) if not _excluded(k)}


def recipe_hash(recipe: dict[str, Any]) -> str:
    """SHA-256 of a recipe's canonical JSON (sorted keys)."""
    return hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()


def recipe_diff(old: dict[str, Any], new: dict[str, Any]) -> dict[str, tuple[Any, Any]]:
    """``{key: (old, new)}`` for every key whose value differs (absent keys as ``"<absent>"``)."""
    absent = "<absent>"
    return {
        k: (old.get(k, absent), new.get(k, absent))
        for k in sorted(set(old) | set(new))
        if old.get(k, absent) != new.get(k, absent)
    }
