"""Distributed training on PyTorch's own engine: FSDP2, DTensor tensor parallel, pipelining.

This is the only package that touches ``torch.distributed``. Everything else asks it
questions (``is_main()``, the data-parallel rank of this process, ...) or hands it a model.

Launch
    ``torchrun`` sets ``RANK``/``WORLD_SIZE``/``LOCAL_RANK``/``MASTER_ADDR``/``MASTER_PORT``;
    under ``srun`` (one task per GPU) the ``SLURM_PROCID``/``SLURM_NTASKS``/``SLURM_LOCALID``
    variables are read instead and ``MASTER_ADDR`` defaults to the first host of the job.
    ``init_distributed`` builds a 3-d device mesh ``(pp, dp_shard, tp)`` (gloo on CPU, nccl on
    GPU); ``parallel.dp_shard=-1`` takes whatever the other degrees leave of the world size.

Model parallelism (``DistributedModel``)
    - ``tp > 1``: every decoder layer gets the Megatron plan with ``parallelize_module``:
      q/k/v and gate/up column-wise, o and down row-wise (each rank holds
      ``num_heads / tp`` query heads and ``num_kv_heads / tp`` key/value heads).
    - ``dp_shard > 1``: FSDP2 ``fully_shard`` on every decoder layer, then on a small root
      module that owns the rest (embeddings, final norm, LM/scalar heads). The stages call
      sub-modules of their model directly (``trunk(...)``, ``lm_head(...)``), so the root is a
      thin wrapper whose ``forward(fn, *args)`` runs the stage's loss function: the root's
      pre-forward all-gathers the root parameters, the layers gather their own.
      Gradients are SUM-reduced: each rank's loss is already divided by the *global* number of
      sequences (tokens, for SFT) in the step, so the sum over ranks is the one-process mean.
    - ``pp > 1``: the decoder layers are split in contiguous chunks across ranks and
      ``torch.distributed.pipelining`` (GPipe / 1F1B, static shapes) moves hidden states.
      Within a stage, ``tp`` and ``dp_shard`` apply as above (3-d parallelism).
      No stage-specific code is needed: on every pipeline rank the stage's own loss function
      runs on its micro-batch; on the first stage the trunk stops after the local layers and
      its hidden state is sent on; on later stages the embedding is replaced by the received
      hidden state. The loss function must call the model's trunk exactly once per micro-batch
      (SFT, reward model and DPO do). Tied embedding / LM-head weights that live on two stages
      have their gradients all-reduced over the pipeline group.

Gradient accumulation (``trainer.micro_batch_size``) works in every mode (FSDP2 skips the
reduce-scatter until the last micro-batch; pipelining turns micro-batches into its schedule).
Activation checkpointing is the model's own (``model.activation_checkpointing``) and composes
with all three. ``parallel.mixed_precision=bf16`` is an FSDP2 ``MixedPrecisionPolicy`` (bf16
compute and all-gathers, fp32 master weights and gradient reduction) under ``dp_shard > 1``
and ``torch.autocast`` otherwise.

After training ``DistributedModel.finalize()`` gathers the full (unsharded) state dict on
rank 0 and turns the stage's model object back into a plain single-device module there;
the other ranks leave (``SystemExit(0)``), so everything a stage does after training
(saving, held-out evaluation, reward normalization) runs once, on rank 0.

Modules: ``launch`` (ranks, mesh, collectives, local launcher), ``parallelize`` (TP plan, FSDP2,
grad norm, state dicts), ``pipeline`` (pipeline-parallel runner), ``model`` (``DistributedModel``),
``checkpoint`` (sharded checkpoints). The names below are the package's public face.
"""

from __future__ import annotations

from rlhfstack.distributed.checkpoint import (
    CKPT_EXTRA,
    CheckpointFormatError,
    checkpoint_path,
    latest_checkpoint,
    load_checkpoint,
    read_checkpoint_extra,
    read_checkpoint_tensors,
    read_rank_extra,
    save_checkpoint,
)
from rlhfstack.distributed.launch import (
    MIXED_PRECISION,
    ParallelState,
    all_reduce_max,
    all_reduce_sum,
    any_rank,
    barrier,
    broadcast_object,
    comm_device,
    current,
    free_port,
    init_distributed,
    is_main,
    launch_env,
    launch_local,
    resolve_degrees,
    shard_batch,
    sum_stats,
    teardown,
)
from rlhfstack.distributed.model import (
    DistributedModel,
)
from rlhfstack.distributed.parallelize import (
    apply_fsdp2,
    apply_tp,
    clip_grad_norm,
    decoder_layers,
    find_trunk,
    fully_shard_tree,
    gather_full_state_dict,
    is_sharded,
    meta_copy,
    restore_plain,
)
from rlhfstack.distributed.pipeline import (
    PipelineRunner,
    split_layers,
)

__all__ = [
    "CKPT_EXTRA",
    "DistributedModel",
    "MIXED_PRECISION",
    "ParallelState",
    "PipelineRunner",
    "all_reduce_max",
    "all_reduce_sum",
    "any_rank",
    "apply_fsdp2",
    "apply_tp",
    "barrier",
    "broadcast_object",
    "CheckpointFormatError",
    "checkpoint_path",
    "read_checkpoint_extra",
    "clip_grad_norm",
    "comm_device",
    "current",
    "decoder_layers",
    "find_trunk",
    "free_port",
    "fully_shard_tree",
    "gather_full_state_dict",
    "init_distributed",
    "is_main",
    "is_sharded",
    "latest_checkpoint",
    "launch_env",
    "launch_local",
    "load_checkpoint",
    "meta_copy",
    "read_checkpoint_tensors",
    "read_rank_extra",
    "resolve_degrees",
    "restore_plain",
    "save_checkpoint",
    "shard_batch",
    "split_layers",
    "sum_stats",
    "teardown",
]
