"""Distributed training on PyTorch's own engine: FSDP2, DTensor tensor parallel, pipelining.

This is the only module that touches ``torch.distributed``. Everything else asks it
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
"""

from __future__ import annotations

import contextlib
import copy
import datetime
import logging
import os
import re
import socket
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

log = logging.getLogger("rlhfstack.distributed")

MIXED_PRECISION = ("none", "bf16")


# ----------------------------------------------------------------------------- launch / ranks


def launch_env() -> tuple[int, int, int]:
    """``(rank, world_size, local_rank)`` from torchrun's variables, else SLURM's, else ``(0, 1, 0)``."""
    env = os.environ
    if "RANK" in env and "WORLD_SIZE" in env:
        return int(env["RANK"]), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", 0))
    if "SLURM_PROCID" in env and int(env.get("SLURM_NTASKS", "1")) > 1:
        return int(env["SLURM_PROCID"]), int(env["SLURM_NTASKS"]), int(env.get("SLURM_LOCALID", 0))
    return 0, 1, 0


def _first_slurm_host(nodelist: str) -> str:
    """First host name of a SLURM node list such as ``gpu[012-015,020],cpu3``."""
    first = re.split(r",(?![^\[]*\])", nodelist.strip())[0]
    m = re.match(r"^([^\[]+)\[([^\]]+)\]", first)
    if not m:
        return first
    prefix, ranges = m.groups()
    return prefix + ranges.split(",")[0].split("-")[0]


def _ensure_rendezvous_env() -> None:
    """Fill ``MASTER_ADDR``/``MASTER_PORT`` under ``srun`` when the job script did not."""
    env = os.environ
    if "MASTER_ADDR" not in env:
        nodelist = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST")
        env["MASTER_ADDR"] = _first_slurm_host(nodelist) if nodelist else "127.0.0.1"
    if "MASTER_PORT" not in env:
        job = int(env.get("SLURM_JOB_ID", "0") or 0)
        env["MASTER_PORT"] = str(20000 + job % 20000)


# ----------------------------------------------------------------------------- state


@dataclass
class ParallelState:
    """Who this process is, and the device mesh ``(pp, dp_shard, tp)`` it belongs to.

    A single process (no launcher, all degrees 1) gets ``world_size == 1`` and no mesh.
    """

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    dp: int = 1
    tp: int = 1
    pp: int = 1
    device: str = "cpu"
    backend: str | None = None
    mesh: Any = None
    finished: bool = field(default=False, repr=False)

    @property
    def distributed(self) -> bool:
        return self.world_size > 1 and not self.finished

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def _coord(self, dim: str) -> int:
        return 0 if self.mesh is None else self.mesh[dim].get_local_rank()

    @property
    def dp_rank(self) -> int:
        """Index of this rank's slice of each global batch."""
        return self._coord("dp_shard")

    @property
    def tp_rank(self) -> int:
        return self._coord("tp")

    @property
    def pp_rank(self) -> int:
        """Pipeline stage held by this rank."""
        return self._coord("pp")

    def group(self, dim: str) -> Any:
        """Process group of one mesh dimension (``pp`` | ``dp_shard`` | ``tp``)."""
        return None if self.mesh is None else self.mesh[dim].get_group()


_STATE = ParallelState()


def current() -> ParallelState:
    """The state set by the last ``init_distributed`` (a single process before that)."""
    return _STATE


def is_main() -> bool:
    """True on global rank 0 (and in a single process): the only rank that writes files."""
    return _STATE.rank == 0


def resolve_degrees(parallel: Any, world_size: int) -> tuple[int, int, int]:
    """``(dp_shard, tp, pp)`` from ``parallel`` (``dp_shard=-1``: the rest of the world)."""
    tp, pp = int(parallel.tp), int(parallel.pp)
    dp = int(parallel.dp_shard)
    if tp < 1 or pp < 1 or dp == 0 or dp < -1:
        raise ValueError(
            f"parallel: degrees must be >= 1 (dp_shard may be -1); got dp_shard={dp} tp={tp} pp={pp}"
        )
    if dp == -1:
        if world_size % (tp * pp):
            raise ValueError(
                f"parallel: world size {world_size} is not divisible by tp*pp={tp * pp}"
            )
        dp = world_size // (tp * pp)
    if dp * tp * pp != world_size:
        need = dp * tp * pp
        hint = (
            f"launch with `torchrun --nproc_per_node={need} ...` (or srun with {need} tasks)"
            if world_size == 1
            else "set parallel.dp_shard/tp/pp so that their product is the world size"
        )
        raise ValueError(
            f"parallel: dp_shard*tp*pp = {dp}*{tp}*{pp} = {need} but {world_size} process(es) were "
            f"launched; {hint}"
        )
    return dp, tp, pp


def init_distributed(
    parallel: Any, device: str = "cpu", backend: str | None = None
) -> ParallelState:
    """Start the process group and the ``(pp, dp_shard, tp)`` mesh; return this rank's state.

    ``device``: ``cpu`` (gloo) or ``cuda`` (nccl; this rank uses ``cuda:LOCAL_RANK``).
    ``backend`` overrides the choice. With one process and all degrees 1 nothing is started.
    """
    global _STATE
    rank, world, local_rank = launch_env()
    dp, tp, pp = resolve_degrees(parallel, world)
    dev = device
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise RuntimeError("cluster.device=cuda but no CUDA device is visible")
        if world > 1:
            # srun --gpus-per-task=1 shows each task one device: index modulo what is visible
            idx = local_rank % torch.cuda.device_count()
            torch.cuda.set_device(idx)
            dev = f"cuda:{idx}"
    if world == 1:
        _STATE = ParallelState(device=dev)
        return _STATE
    want = "nccl" if device.startswith("cuda") else "gloo"
    if backend and backend != want:
        log.warning("cluster.backend=%s does not fit device %s; using %s", backend, device, want)
    backend = want
    if not dist.is_initialized():
        _ensure_rendezvous_env()
        kw: dict[str, Any] = {}
        if backend == "nccl":
            kw["device_id"] = torch.device(dev)
        dist.init_process_group(
            backend, rank=rank, world_size=world, timeout=datetime.timedelta(minutes=30), **kw
        )
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh(
        "cuda" if device.startswith("cuda") else "cpu",
        (pp, dp, tp),
        mesh_dim_names=("pp", "dp_shard", "tp"),
    )
    _STATE = ParallelState(rank, world, local_rank, dp, tp, pp, dev, backend, mesh)
    log.info(
        "rank %d/%d: dp_shard=%d tp=%d pp=%d on %s (%s)", rank, world, dp, tp, pp, dev, backend
    )
    return _STATE


def teardown() -> None:
    """Destroy the process group (if any); the state falls back to a single process."""
    global _STATE
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
    _STATE.finished = True


def barrier() -> None:
    if _STATE.distributed:
        dist.barrier()


# ----------------------------------------------------------------------------- collectives


def all_reduce_sum(t: torch.Tensor, group: Any = None) -> torch.Tensor:
    """In-place SUM over ``group`` (the world by default); a no-op in a single process."""
    if _STATE.distributed:
        dist.all_reduce(t, op=dist.ReduceOp.SUM, group=group)
    return t


def all_reduce_max(t: torch.Tensor, group: Any = None) -> torch.Tensor:
    if _STATE.distributed:
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=group)
    return t


def sum_stats(stats: dict[str, float], group: Any = None) -> dict[str, float]:
    """Sum a dict of floats over ``group`` (same keys on every rank), in float64."""
    if not _STATE.distributed or not stats:
        return dict(stats)
    keys = list(stats)  # insertion order (the same on every rank: same code path)
    t = torch.tensor([float(stats[k]) for k in keys], dtype=torch.float64, device=_comm_device())
    all_reduce_sum(t, group)
    return dict(zip(keys, t.tolist()))


def broadcast_object(obj: Any, src: int = 0, group: Any = None) -> Any:
    """``obj`` of global rank ``src`` on every rank of ``group``."""
    if not _STATE.distributed:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src, group=group, device=_comm_device())
    return box[0]


def _comm_device() -> torch.device:
    return torch.device(_STATE.device if _STATE.backend == "nccl" else "cpu")


def shard_batch(batch: dict[str, Any], rank: int, size: int) -> dict[str, Any]:
    """Rows ``[rank * B/size, (rank+1) * B/size)`` of every tensor with the batch's leading size.

    The global batch is collated identically on every rank (same seed, same padding), so each
    data-parallel rank takes a contiguous slice. ``B`` must be divisible by ``size``.
    """
    if size == 1:
        return batch
    n = next(v.shape[0] for v in batch.values() if isinstance(v, torch.Tensor))
    if n % size:
        raise ValueError(
            f"global batch of {n} rows is not divisible by the data-parallel degree {size}"
        )
    k = n // size
    return {
        key: v[rank * k : (rank + 1) * k]
        if isinstance(v, torch.Tensor) and v.dim() > 0 and v.shape[0] == n
        else v
        for key, v in batch.items()
    }


# ----------------------------------------------------------------------------- model structure


def find_trunk(model: nn.Module) -> nn.Module:
    """The decoder stack of a Llama-style model: the module with ``embed_tokens``, ``layers``, ``norm``."""
    for m in model.modules():
        if all(hasattr(m, a) for a in ("embed_tokens", "layers", "norm")) and isinstance(
            m.layers, nn.ModuleList
        ):
            return m
    raise ValueError(
        f"{type(model).__name__}: no Llama-style decoder stack (embed_tokens, layers, norm) found; "
        "tensor/pipeline parallelism supports Llama-family causal LMs"
    )


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The transformer blocks of ``model``: the Llama trunk's ``layers``, else the largest
    ``ModuleList`` of same-class blocks (e.g. a BERT encoder's ``layer``); ``[]`` if none."""
    try:
        return list(find_trunk(model).layers)
    except ValueError:
        pass
    best: list[nn.Module] = []
    for m in model.modules():
        if isinstance(m, nn.ModuleList) and len(m) > len(best):
            kids = list(m)
            if len({type(k) for k in kids}) == 1 and any(True for _ in kids[0].parameters()):
                best = kids
    return best


def _has_lora(model: nn.Module) -> bool:
    return any("lora_" in n for n, _ in model.named_parameters())


# ----------------------------------------------------------------------------- tensor parallel


def apply_tp(model: nn.Module, tp_mesh: Any) -> None:
    """Megatron-style tensor parallelism on every decoder layer, in place.

    Attention: ``q_proj``/``k_proj``/``v_proj`` column-wise (each rank computes its own heads),
    ``o_proj`` row-wise (all-reduce of the partial outputs). MLP: ``gate_proj``/``up_proj``
    column-wise, ``down_proj`` row-wise. Embeddings, norms and heads stay replicated. The
    attention's ``view(..., -1, head_dim)`` picks up the local head count, and
    ``num_heads / num_kv_heads`` (the GQA group size) is the same on every rank.
    """
    from torch.distributed.tensor.parallel import (
        ColwiseParallel,
        RowwiseParallel,
        parallelize_module,
    )

    tp = tp_mesh.size()
    if _has_lora(model):
        raise NotImplementedError(
            "parallel.tp > 1 with LoRA adapters is not supported; use dp_shard"
        )
    trunk = find_trunk(model)
    cfg = getattr(model, "config", None) or getattr(trunk, "config", None)
    n_heads = int(cfg.num_attention_heads)
    n_kv = int(getattr(cfg, "num_key_value_heads", None) or n_heads)
    inter = int(cfg.intermediate_size)
    for name, n in (
        ("num_attention_heads", n_heads),
        ("num_key_value_heads", n_kv),
        ("intermediate_size", inter),
    ):
        if n % tp:
            raise ValueError(f"parallel.tp={tp} does not divide the model's {name}={n}")
    plan = {
        "self_attn.q_proj": ColwiseParallel(),
        "self_attn.k_proj": ColwiseParallel(),
        "self_attn.v_proj": ColwiseParallel(),
        "self_attn.o_proj": RowwiseParallel(),
        "mlp.gate_proj": ColwiseParallel(),
        "mlp.up_proj": ColwiseParallel(),
        "mlp.down_proj": RowwiseParallel(),
    }
    for layer in trunk.layers:
        if hasattr(layer, "self_attn"):  # (pipeline stages hold stand-ins for foreign layers)
            parallelize_module(layer, tp_mesh, plan)


# ----------------------------------------------------------------------------- FSDP2


class _Closure(nn.Module):
    """Root of the FSDP tree: owns the model, and its forward runs any function of it.

    ``root(fn, *args)`` returns ``fn(*args)`` after FSDP's root pre-forward has gathered the
    root-level parameters (embeddings, final norm, heads); the layers gather their own.
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        return fn(*args, **kwargs)


def _fully_shard_tree(
    blocks: list[nn.Module],
    root: nn.Module,
    dp_mesh: Any,
    mixed_precision: str,
    reshard_after_forward: bool = True,
) -> nn.Module:
    """``fully_shard`` each block, then ``root`` (which owns the rest); sum-reduced gradients."""
    from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard

    if mixed_precision not in MIXED_PRECISION:
        raise ValueError(
            f"parallel.mixed_precision: {mixed_precision!r} (choose from {MIXED_PRECISION})"
        )
    mp = MixedPrecisionPolicy()
    mp_root = MixedPrecisionPolicy()
    if mixed_precision == "bf16":
        mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
        # the root's inputs are whole micro-batches (e.g. fp32 reference log-probs): leave them
        mp_root = MixedPrecisionPolicy(
            param_dtype=torch.bfloat16, reduce_dtype=torch.float32, cast_forward_inputs=False
        )
    for block in blocks:
        fully_shard(block, mesh=dp_mesh, mp_policy=mp, reshard_after_forward=reshard_after_forward)
    fully_shard(root, mesh=dp_mesh, mp_policy=mp_root)
    for m in root.modules():
        if isinstance(m, FSDPModule):
            m.set_gradient_divide_factor(1.0)
            m.set_force_sum_reduction_for_comms(True)
    return root


def apply_fsdp2(
    model: nn.Module,
    dp_mesh: Any,
    mixed_precision: str = "none",
    reshard_after_forward: bool = True,
) -> nn.Module:
    """FSDP2 on every decoder layer and on a root wrapper around ``model``; returns the root.

    Gradients are summed (not averaged) over ``dp_mesh``: losses are normalized by the global
    count. ``mixed_precision="bf16"``: bf16 compute/all-gather, fp32 sharded master weights
    and fp32 gradient reduction.
    """
    return _fully_shard_tree(
        decoder_layers(model), _Closure(model), dp_mesh, mixed_precision, reshard_after_forward
    )


# ----------------------------------------------------------------------------- grad norm


def _sq_norm(grads: list[torch.Tensor]) -> torch.Tensor:
    """Sum of squares of ``grads`` (DTensors reduced over their meshes), fp32 on the grads' device."""
    from torch.distributed.tensor import DTensor

    total = None
    groups: dict[Any, list[torch.Tensor]] = {}
    for g in grads:
        key = (id(g.device_mesh), g.placements) if isinstance(g, DTensor) else ("plain", g.device)
        groups.setdefault(key, []).append(g)
    for gs in groups.values():
        n = torch.nn.utils.get_total_norm(gs, 2.0)
        if isinstance(n, DTensor):
            n = n.full_tensor()
        sq = n.float() ** 2
        total = sq if total is None else total + sq.to(total.device)
    return total if total is not None else torch.zeros(())


def clip_grad_norm(
    params: list[nn.Parameter],
    max_norm: float,
    norm_params: list[nn.Parameter] | None = None,
    group: Any = None,
) -> float:
    """Clip the global gradient norm of sharded / replicated / pipelined parameters.

    ``norm_params``: the parameters whose gradients count in the norm on this rank (default
    ``params``); ``group``: a process group whose per-rank sums of squares add up (pipeline
    stages). Returns the pre-clip norm, identical on every rank.
    """
    grads = [p.grad for p in (params if norm_params is None else norm_params) if p.grad is not None]
    sq = _sq_norm(grads).to(_comm_device())
    if group is not None:
        all_reduce_sum(sq, group)
    norm = float(sq.sqrt())
    if max_norm and max_norm > 0:
        coef = max_norm / (norm + 1e-6)
        if coef < 1.0:
            for p in params:
                if p.grad is not None:
                    p.grad.mul_(coef)
    return norm


# ----------------------------------------------------------------------------- state dicts


def meta_copy(model: nn.Module) -> nn.Module:
    """A structural copy of ``model`` with parameters on the meta device (tying kept, buffers copied)."""
    memo: dict[int, Any] = {}
    for p in model.parameters():
        memo[id(p)] = nn.Parameter(
            torch.empty_like(p, device="meta"), requires_grad=p.requires_grad
        )
    return copy.deepcopy(model, memo)


def restore_plain(
    model: nn.Module, shadow: nn.Module, state_dict: dict[str, torch.Tensor], device: str
) -> None:
    """Load ``state_dict`` into ``shadow`` (on ``device``) and make ``model`` that plain module, in place.

    The model object keeps its identity (the stage's references stay valid) but gets the
    shadow's modules, parameters, buffers and hooks: no FSDP/TP/pipeline state is left.
    Attributes set on ``model`` after ``meta_copy`` (other than weights) are not carried over.
    """
    new: dict[int, nn.Parameter] = {}
    for mod in shadow.modules():
        for name, p in list(mod._parameters.items()):
            if p is None:
                continue
            if id(p) not in new:
                new[id(p)] = nn.Parameter(
                    torch.empty_like(p, device=device), requires_grad=p.requires_grad
                )
            mod._parameters[name] = new[id(p)]
    shadow.to(device)
    missing, unexpected = shadow.load_state_dict(state_dict, strict=False)
    missing = [k for k in missing if k in dict(shadow.named_parameters(remove_duplicate=False))]
    if missing or unexpected:
        raise RuntimeError(
            f"restoring the trained model: missing {missing[:5]}, unexpected {unexpected[:5]}"
        )
    model.__dict__.clear()
    model.__dict__.update(shadow.__dict__)
    model.__class__ = shadow.__class__


def gather_full_state_dict(module: nn.Module) -> dict[str, torch.Tensor]:
    """Full (unsharded) state dict of an FSDP2 / TP module on rank 0, on CPU ({} elsewhere)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return get_model_state_dict(module, options=opts)


# ----------------------------------------------------------------------------- pipelining


class _Handoff(Exception):
    """Raised by the trunk's final norm on a non-last stage: carries the local layers' output."""

    def __init__(self, hidden: torch.Tensor) -> None:
        super().__init__("pipeline hand-off")
        self.hidden = hidden


class _Probe(Exception):
    def __init__(self, shape: torch.Size) -> None:
        super().__init__("shape probe")
        self.shape = shape


class _SkipLayer(nn.Module):
    """Stands in for a decoder layer held by another pipeline stage."""

    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        return hidden_states


class _HandoffNorm(nn.Module):
    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        raise _Handoff(hidden_states)


class _ReceivedEmbedding(nn.Module):
    """Stands in for the token embedding on later stages: returns the received hidden state."""

    def __init__(self) -> None:
        super().__init__()
        self.hidden: torch.Tensor | None = None

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        h, self.hidden = self.hidden, None
        if h is None:
            raise RuntimeError(
                "pipeline parallelism: the loss function called the model trunk more than once per "
                "micro-batch; run chosen and rejected (or any other pieces) through one forward"
            )
        B, T = input_ids.shape
        if h.shape[0] != B or h.shape[1] < T:
            raise RuntimeError(
                f"pipeline parallelism: received hidden {tuple(h.shape)} for input {B}x{T}"
            )
        return h[:, :T]


class _ProbeEmbedding(nn.Module):
    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        raise _Probe(input_ids.shape)


@dataclass
class _StepContext:
    batch: dict[str, Any]
    loss_fn: Callable[..., Any]
    n_in_step: int
    micro: int
    rows: int  # rows per micro-batch
    t_buf: int
    dtype: torch.dtype = torch.float32  # of the hidden states sent between stages
    next_mb: int = 0
    loss: float = 0.0
    stats: dict[str, float] = field(default_factory=dict)

    def micro_batch(self, i: int) -> dict[str, Any]:
        n = next(v.shape[0] for v in self.batch.values() if isinstance(v, torch.Tensor))
        sl = slice(i * self.micro, (i + 1) * self.micro)
        return {
            k: v[sl] if isinstance(v, torch.Tensor) and v.dim() and v.shape[0] == n else v
            for k, v in self.batch.items()
        }


class _StageModule(nn.Module):
    """One pipeline stage: runs the stage's loss function on its micro-batch (see module doc)."""

    def __init__(self, model: nn.Module, trunk: nn.Module, is_first: bool, is_last: bool) -> None:
        super().__init__()
        self.model = model
        self._trunk = [trunk]  # not a submodule (already inside ``model``)
        self.is_first, self.is_last = is_first, is_last
        self.ctx: _StepContext | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ctx = self.ctx
        assert ctx is not None
        i = ctx.next_mb
        ctx.next_mb += 1
        mb = ctx.micro_batch(i)
        trunk = self._trunk[0]
        if not self.is_first:
            trunk.embed_tokens.hidden = x
        if not self.is_last:
            try:
                ctx.loss_fn(mb, ctx.n_in_step)
            except _Handoff as h:
                out = h.hidden.to(ctx.dtype)
                if out.shape[1] < ctx.t_buf:
                    pad = out.new_zeros(out.shape[0], ctx.t_buf - out.shape[1], *out.shape[2:])
                    out = torch.cat([out, pad], dim=1)
                return out
            raise RuntimeError(
                "pipeline parallelism: the loss function never called the model trunk"
            )
        loss, stats = ctx.loss_fn(mb, ctx.n_in_step)
        n_mb = next(v.shape[0] for v in mb.values() if isinstance(v, torch.Tensor))
        ctx.loss += float(loss.detach())
        for k, v in stats.items():
            ctx.stats[k] = ctx.stats.get(k, 0.0) + float(v) * n_mb / ctx.n_in_step
        return loss.reshape(1)


def split_layers(n_layers: int, pp: int) -> list[range]:
    """Contiguous, balanced layer ranges per pipeline stage (earlier stages take the remainder)."""
    if n_layers < pp:
        raise ValueError(f"parallel.pp={pp} exceeds the number of decoder layers ({n_layers})")
    base, extra = divmod(n_layers, pp)
    out, start = [], 0
    for s in range(pp):
        k = base + (1 if s < extra else 0)
        out.append(range(start, start + k))
        start += k
    return out


class PipelineRunner:
    """The pipeline stage of this rank and the schedules that drive it (see module doc).

    Inside a stage, ``tp > 1`` applies the tensor-parallel plan to the local layers and
    ``dp_shard > 1`` wraps them (and a root around the stage) with FSDP2 over the
    data-parallel ranks holding the same stage.
    """

    def __init__(
        self,
        model: nn.Module,
        state: ParallelState,
        param_names: set[str],
        mixed_precision: str = "none",
    ) -> None:
        self.state = state
        self.model = model
        pp, s = state.pp, state.pp_rank
        self.is_first, self.is_last = s == 0, s == pp - 1
        trunk = find_trunk(model)
        self.trunk = trunk
        n_layers = len(trunk.layers)
        self.ranges = split_layers(n_layers, pp)
        trunk_prefix = next(n for n, m in model.named_modules() if m is trunk)
        tp = trunk_prefix + "." if trunk_prefix else ""

        def stage_of(name: str) -> int:
            """Stage that owns a state-dict entry (by the module it sits in)."""
            if not name.startswith(tp):
                return pp - 1  # heads outside the trunk run on the last stage
            rest = name[len(tp) :]
            m = re.match(r"layers\.(\d+)\.", rest)
            if m:
                return next(i for i, r in enumerate(self.ranges) if int(m.group(1)) in r)
            if rest.startswith("norm."):
                return pp - 1
            return 0

        # which stages use each parameter (by identity: tied weights show up under two names)
        users: dict[int, set[int]] = {}
        aliases: dict[int, list[str]] = {}
        for name, p in model.named_parameters(remove_duplicate=False):
            users.setdefault(id(p), set()).add(stage_of(name))
            aliases.setdefault(id(p), []).append(name)
        self.owned_keys = [k for k in model.state_dict() if stage_of(k) == s]
        local_names = {n for i, ns in aliases.items() if s in users[i] for n in ns}
        train_names = local_names & set(param_names)
        norm_names = {n for i, ns in aliases.items() if min(users[i]) == s for n in ns}
        # tied weights used by several stages (embedding / LM head): their grads are summed over pp
        self._shared = sorted(ns for i, ns in aliases.items() if len(users[i]) > 1)
        self._shared_meta = {
            ns[0]: (model.get_parameter(ns[0]).shape, model.get_parameter(ns[0]).dtype)
            for ns in self._shared
        }
        self._dtype = next(p.dtype for p in model.parameters() if p.is_floating_point())
        # prune this rank's copy: foreign layers, embedding, final norm
        for i in range(n_layers):
            if i not in self.ranges[s]:
                trunk.layers[i] = _SkipLayer()
        if not self.is_first:
            trunk.embed_tokens = _ReceivedEmbedding()
        if not self.is_last:
            trunk.norm = _HandoffNorm()
        self.module: nn.Module = _StageModule(model, trunk, self.is_first, self.is_last)
        if state.tp > 1:
            apply_tp(model, state.mesh["tp"])
        self.fsdp = state.dp > 1
        if self.fsdp:
            self.module = _fully_shard_tree(
                [m for m in trunk.layers if not isinstance(m, _SkipLayer)],
                self.module,
                state.mesh["dp_shard"],
                mixed_precision,
            )
            if mixed_precision == "bf16":
                self._dtype = torch.bfloat16
        self._autocast = mixed_precision == "bf16" and not self.fsdp
        # parameters by name, after any sharding replaced them
        self._named = dict(model.named_parameters(remove_duplicate=False))
        seen: set[int] = set()
        self.params, self.norm_params = [], []
        for n, p in self._named.items():
            if n in train_names and p.requires_grad and id(p) not in seen:
                seen.add(id(p))
                self.params.append(p)
                if n in norm_names:
                    self.norm_params.append(p)  # each shared weight counted on one stage
        self._schedules: dict[tuple, Any] = {}
        self.group = state.group("pp")
        self.last_global_rank = dist.get_global_rank(self.group, pp - 1)

    def _probe_rows(
        self, batch_mb: dict[str, Any], loss_fn: Callable[..., Any], n_in_step: int
    ) -> torch.Size:
        """Shape ``(rows, T)`` of the token ids the loss function feeds the trunk."""
        trunk = self.trunk
        saved = trunk.embed_tokens
        trunk.embed_tokens = _ProbeEmbedding()
        try:
            with torch.no_grad():
                loss_fn(batch_mb, n_in_step)
        except _Probe as p:
            return p.shape
        finally:
            trunk.embed_tokens = saved
        raise RuntimeError("pipeline parallelism: the loss function never called the model trunk")

    def _schedule(self, n_micro: int, micro: int, rows: int, t_buf: int, hidden: int) -> Any:
        from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleGPipe

        key = (n_micro, micro, rows, t_buf)
        if key in self._schedules:
            return self._schedules[key]
        dev = torch.device(self.state.device)
        h = torch.empty(rows, t_buf, hidden, dtype=self._dtype, device="meta", requires_grad=True)
        inp = torch.empty(micro, dtype=torch.long, device="meta") if self.is_first else h
        out = (
            torch.empty(1, dtype=torch.float32, device="meta", requires_grad=True)
            if self.is_last
            else h
        )
        stage = PipelineStage(
            self.module,
            self.state.pp_rank,
            self.state.pp,
            dev,
            input_args=inp,
            output_args=out,
            group=self.group,
        )
        cls = Schedule1F1B if n_micro >= self.state.pp else ScheduleGPipe
        sched = cls(
            stage, n_microbatches=n_micro, loss_fn=lambda out, target: out.sum(), scale_grads=False
        )
        self._schedules[key] = sched
        return sched

    def step(
        self, batch: dict[str, Any], loss_fn: Callable[..., Any], n_in_step: int, micro: int
    ) -> tuple[float, dict[str, float]]:
        """Forward + backward of one (data-parallel-local) batch; grads of shared weights synced.

        Returns ``(loss, stats)`` summed as in the one-process loop, on every pipeline rank.
        """
        n = next(v.shape[0] for v in batch.values() if isinstance(v, torch.Tensor))
        if n % micro:
            raise ValueError(
                f"pipeline parallelism needs equal micro-batches: batch {n} is not divisible by "
                f"trainer.micro_batch_size={micro}"
            )
        n_micro = n // micro
        ctx = _StepContext(batch, loss_fn, n_in_step, micro, 0, 0)
        # rows and length each micro-batch feeds the trunk (loss functions may trim padding)
        shapes = [self._probe_rows(ctx.micro_batch(i), loss_fn, n_in_step) for i in range(n_micro)]
        rows, T = int(shapes[0][0]), max(int(sh[1]) for sh in shapes)
        if any(int(sh[0]) != rows for sh in shapes):
            raise RuntimeError(
                f"pipeline parallelism: micro-batches feed the trunk different row counts {shapes}"
            )
        t_buf = ((T + 31) // 32) * 32  # static buffers: one schedule per 32-token length bucket
        hidden = int(self.trunk.config.hidden_size)
        sched = self._schedule(n_micro, micro, rows, t_buf, hidden)
        ctx.rows, ctx.t_buf = rows, t_buf
        ctx.dtype = self._dtype
        self.module.ctx = ctx
        idx = torch.arange(n, device=self.state.device)
        dev_type = "cuda" if self.state.device.startswith("cuda") else "cpu"
        amp = (
            torch.autocast(dev_type, dtype=torch.bfloat16)
            if self._autocast
            else contextlib.nullcontext()
        )
        try:
            with amp:
                if self.is_first:
                    sched.step(idx, target=idx, losses=[])
                else:
                    sched.step(target=idx, losses=[])
        finally:
            self.module.ctx = None
        self._sync_shared_grads()
        loss, stats = broadcast_object(
            (ctx.loss, ctx.stats), src=self.last_global_rank, group=self.group
        )
        if self.state.dp > 1:  # each data-parallel replica of the pipeline saw its own rows
            stats = sum_stats({"loss": loss, **stats}, self.state.group("dp_shard"))
            loss = stats.pop("loss")
        return loss, stats

    def _sync_shared_grads(self) -> None:
        """Sum the gradients of weights used on several stages (tied embedding / LM head)."""
        from torch.distributed.tensor import DTensor

        for names in self._shared:
            p = next((self._named[n] for n in names if n in self._named), None)
            if p is None:  # this stage does not hold the weight: contribute zeros
                if self.fsdp or self.state.tp > 1:
                    raise NotImplementedError(
                        f"pipeline parallelism: shared weight {names} missing on a stage"
                    )
                shape, dtype = self._shared_meta[names[0]]
                all_reduce_sum(
                    torch.zeros(shape, dtype=dtype, device=self.state.device), self.group
                )
                continue
            g = p.grad if p.grad is not None else torch.zeros_like(p)
            all_reduce_sum(g.to_local() if isinstance(g, DTensor) else g, self.group)
            if p.requires_grad:
                p.grad = g

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        """Every stage's trained entries merged on rank 0 (CPU); ``{}`` elsewhere.

        Collective over the whole world: sharded entries are gathered within each stage first.
        """
        from torch.distributed.fsdp import FSDPModule
        from torch.distributed.tensor import DTensor

        for m in self.module.modules():
            if isinstance(m, FSDPModule):
                m.reshard()
        owned = set(self.owned_keys)
        mine = {}
        for k, v in self.model.state_dict().items():
            if k in owned:
                v = v.full_tensor() if isinstance(v, DTensor) else v
                mine[k] = v.detach().cpu()
        if self.state.dp_rank != 0 or self.state.tp_rank != 0:
            return {}
        parts: list[Any] | None = [None] * self.state.pp if self.state.pp_rank == 0 else None
        dist.gather_object(mine, parts, dst=dist.get_global_rank(self.group, 0), group=self.group)
        if not self.state.is_main:
            return {}
        merged: dict[str, torch.Tensor] = {}
        for part in parts or []:
            merged.update(part)
        return merged


# ----------------------------------------------------------------------------- the facade


class DistributedModel:
    """A stage's model under the configured parallelism, driven by ``training.train_loop``.

    ``params``: the parameters the stage wants trained (a subset of ``model.parameters()``).
    In a single process this is a pass-through (plus bf16 autocast when asked).
    """

    def __init__(
        self,
        model: nn.Module,
        params: list[nn.Parameter],
        state: ParallelState,
        mixed_precision: str = "none",
    ) -> None:
        if mixed_precision not in MIXED_PRECISION:
            raise ValueError(
                f"parallel.mixed_precision: {mixed_precision!r} (choose from {MIXED_PRECISION})"
            )
        self.model, self.state, self.mixed_precision = model, state, mixed_precision
        self.root: nn.Module | None = None
        self.pipe: PipelineRunner | None = None
        ids = {id(p) for p in params}
        names = {n for n, p in model.named_parameters(remove_duplicate=False) if id(p) in ids}
        self.shadow = meta_copy(model) if state.distributed else None
        if state.pp > 1:
            self.pipe = PipelineRunner(model, state, names, mixed_precision)
            self.params = self.pipe.params
            return
        if state.tp > 1:
            apply_tp(model, state.mesh["tp"])
        if state.dp > 1:
            self.root = apply_fsdp2(model, state.mesh["dp_shard"], mixed_precision)
        seen: set[int] = set()
        self.params = []
        for n, p in model.named_parameters(remove_duplicate=False):
            if n in names and id(p) not in seen:
                seen.add(id(p))
                self.params.append(p)

    # -- compute

    def _autocast(self) -> Any:
        if self.mixed_precision == "bf16" and self.root is None:
            dev = "cuda" if self.state.device.startswith("cuda") else "cpu"
            return torch.autocast(dev, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def call(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """``fn(*args)`` with the model usable as a whole (under the FSDP root, autocast)."""
        with self._autocast():
            if self.root is not None:
                return self.root(fn, *args, **kwargs)
            return fn(*args, **kwargs)

    def forward_backward(
        self, batch: dict[str, Any], loss_fn: Callable[..., Any], n_in_step: int, micro: int
    ) -> tuple[float, dict[str, float]]:
        """Gradient accumulation over this rank's rows of the step; returns ``(loss, stats)`` summed
        over micro-batches and over data-parallel ranks (the one-process values)."""
        if self.pipe is not None:
            return self.pipe.step(batch, loss_fn, n_in_step, micro)
        n = next(v.shape[0] for v in batch.values() if isinstance(v, torch.Tensor))
        mbs = list(_micro_batches(batch, micro, n))
        loss_sum, agg = 0.0, {}
        for j, mb in enumerate(mbs):
            if self.root is not None:
                self.root.set_requires_gradient_sync(j == len(mbs) - 1)
            loss, stats = self.call(loss_fn, mb, n_in_step)
            loss.backward()
            n_mb = next(v.shape[0] for v in mb.values() if isinstance(v, torch.Tensor))
            loss_sum += float(loss.detach())
            for k, v in stats.items():
                agg[k] = agg.get(k, 0.0) + float(v) * n_mb / n_in_step
        if self.state.distributed and self.state.dp > 1:
            agg = sum_stats({"loss": loss_sum, **agg}, self.state.group("dp_shard"))
            loss_sum = agg.pop("loss")
        return loss_sum, agg

    def clip_grad(self, max_norm: float) -> float:
        """Clip the global gradient norm; returns the pre-clip norm (same on every rank)."""
        if self.pipe is not None:
            return clip_grad_norm(self.params, max_norm, self.pipe.norm_params, self.pipe.group)
        if not self.state.distributed:
            params = [p for p in self.params if p.grad is not None]
            if not params:
                return 0.0
            if max_norm and max_norm > 0:
                return float(torch.nn.utils.clip_grad_norm_(params, max_norm))
            return float(torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in params])))
        return clip_grad_norm(self.params, max_norm)

    # -- rollouts

    def full_state_dict(self, trainable_only: bool = False) -> dict[str, torch.Tensor]:
        """The full (unsharded) state dict of ``model`` on every rank (only the parameters that
        require grad with ``trainable_only``). Collective."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        if self.pipe is not None:
            raise NotImplementedError("full_state_dict under pipeline parallelism")
        opts = StateDictOptions(full_state_dict=True, ignore_frozen_params=trainable_only)
        return get_model_state_dict(self.model, options=opts)

    def replica(self) -> nn.Module:
        """A plain, full, frozen copy of ``model`` on this rank's device. Collective.

        Rollouts run on it: generation and no-grad scoring then need no collectives, so each
        data-parallel rank can decode its own prompts for as many steps as its rows need (the
        hybrid-engine design: train sharded, generate on gathered weights). Refresh it with
        ``sync_replica`` after every update."""
        holder = nn.Module()
        restore_plain(holder, copy.deepcopy(self.shadow), self.full_state_dict(), self.state.device)
        holder.requires_grad_(False)
        return holder.eval()

    def sync_replica(self, replica: nn.Module) -> None:
        """Copy the current trained weights into ``replica``. Collective. Only parameters that
        require grad travel (frozen ones, such as a LoRA base, never change)."""
        sd = self.full_state_dict(trainable_only=True)
        with torch.no_grad():
            _, unexpected = replica.load_state_dict(sd, strict=False)
        if unexpected or not sd:
            raise RuntimeError(f"sync_replica: {len(sd)} tensors, unexpected {unexpected[:5]}")

    @property
    def can_evaluate(self) -> bool:
        """Whether the whole model can run mid-training (not while it is split into pipeline stages)."""
        return self.pipe is None

    # -- end of training

    def finalize(self) -> None:
        """Make ``model`` a plain, full module again on rank 0; other ranks leave the process.

        Collective: every rank must call it. In a single process it does nothing.
        """
        if not self.state.distributed:
            return
        from torch.distributed.fsdp import FSDPModule

        if self.pipe is not None:
            sd = self.pipe.full_state_dict()
        else:
            if self.root is not None:
                for m in self.root.modules():
                    if isinstance(m, FSDPModule):
                        m.reshard()
            sd = gather_full_state_dict(self.model)
        dev = self.state.device
        if self.state.is_main:
            restore_plain(self.model, self.shadow, sd, dev)
        self.shadow = None
        self.root = None
        self.pipe = None
        barrier()
        teardown()
        if not self.state.is_main:
            raise SystemExit(0)


def _micro_batches(batch: dict[str, Any], micro: int, n: int) -> Iterator[dict[str, Any]]:
    for i in range(0, n, micro):
        yield {
            k: v[i : i + micro]
            if isinstance(v, torch.Tensor) and v.dim() and v.shape[0] == n
            else v
            for k, v in batch.items()
        }


# ----------------------------------------------------------------------------- checkpoints
#
# ``run_dir/ckpt-NNNNNN/``: model and optimizer through ``torch.distributed.checkpoint`` (each
# rank writes its own shards of FSDP2 / TP parameters and optimizer state; in one process the
# same format with one shard), plus ``extra.pt`` (rank 0's picklable state: scheduler, RNG,
# data position, KL controller, step). Written into a hidden ``.ckpt-NNNNNN.partial`` sibling
# and renamed by rank 0 once every rank has finished, so a ``ckpt-*`` directory is always whole.

CKPT_EXTRA = "extra.pt"


def checkpoint_path(run_dir: str | os.PathLike, step: int) -> Path:
    return Path(run_dir) / f"ckpt-{step:06d}"


def latest_checkpoint(run_dir: str | os.PathLike) -> Path | None:
    """The newest complete ``ckpt-*`` directory under ``run_dir``, or None."""
    done = [
        p
        for p in Path(run_dir).glob("ckpt-*")
        if (p / CKPT_EXTRA).exists() and (p / ".metadata").exists()
    ]
    return max(done, key=lambda p: p.name) if done else None


@contextlib.contextmanager
def _quiet_single_process() -> Iterator[None]:
    """DCP warns on every single-process save/load ("assuming the intent is to ... in a single
    process"): that is the intent here."""
    import warnings

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


def _ckpt_options() -> Any:
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    # frozen weights (a LoRA base, a frozen trunk) are reloaded from the model path, not saved
    return StateDictOptions(ignore_frozen_params=True)


def save_checkpoint(
    path: str | os.PathLike,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    extra: dict[str, Any],
    keep: int = 2,
    rank_extra: dict[str, Any] | None = None,
) -> None:
    """Write ``model``'s trainable parameters, ``optimizer`` and ``extra`` to ``path``.

    Collective under a process group (every rank calls it with its own shards); ``extra`` is
    taken from rank 0, ``rank_extra`` (state that differs between ranks, such as a sampling
    generator) from every rank, as ``rank-R.pt``. Older ``ckpt-*`` siblings beyond the newest
    ``keep`` are removed.
    """
    import shutil

    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    path = Path(path)
    tmp = path.with_name(f".{path.name}.partial")
    if is_main():
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    barrier()
    model_sd, optim_sd = get_state_dict(model, optimizer, options=_ckpt_options())
    with _quiet_single_process():
        dcp.save(
            {"model": model_sd, "optim": optim_sd},
            checkpoint_id=str(tmp),
            no_dist=not _STATE.distributed,
        )
    if rank_extra is not None:
        torch.save(rank_extra, tmp / f"rank-{_STATE.rank}.pt")
    barrier()
    if is_main():
        torch.save(extra, tmp / CKPT_EXTRA)
        old = path.with_name(f".{path.name}.old")
        if path.exists():
            os.replace(path, old)
        os.replace(tmp, path)
        shutil.rmtree(old, ignore_errors=True)
        for stale in sorted(path.parent.glob("ckpt-*"), key=lambda p: p.name)[:-keep]:
            shutil.rmtree(stale, ignore_errors=True)
    barrier()


def load_checkpoint(
    path: str | os.PathLike, model: nn.Module, optimizer: torch.optim.Optimizer
) -> dict[str, Any]:
    """Load what ``save_checkpoint`` wrote into ``model`` and ``optimizer`` (each rank its own
    shards, resharded if the layout changed); returns ``extra``, with this rank's ``rank_extra``
    under ``"rank_extra"`` (None when the checkpoint has none for this rank)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    path = Path(path)
    opts = _ckpt_options()
    model_sd, optim_sd = get_state_dict(model, optimizer, options=opts)
    state = {"model": model_sd, "optim": optim_sd}
    with _quiet_single_process():
        dcp.load(state, checkpoint_id=str(path), no_dist=not _STATE.distributed)
    set_state_dict(
        model,
        optimizer,
        model_state_dict=state["model"],
        optim_state_dict=state["optim"],
        options=opts,
    )
    extra = torch.load(path / CKPT_EXTRA, weights_only=False)
    mine = path / f"rank-{_STATE.rank}.pt"
    extra["rank_extra"] = torch.load(mine, weights_only=False) if mine.exists() else None
    return extra


def read_checkpoint_tensors(path: str | os.PathLike, prefix: str = "model.") -> dict[str, Any]:
    """The tensors of a ``save_checkpoint`` directory whose flattened key starts with ``prefix``
    (``model.`` = the trained module's parameters), unsharded, in one process, keys without the
    prefix. For tools (export, conversion) that read a checkpoint without its training setup."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    reader = dcp.FileSystemReader(str(path))
    meta = reader.read_metadata().state_dict_metadata
    want = {
        k: torch.empty(m.size, dtype=m.properties.dtype)
        for k, m in meta.items()
        if k.startswith(prefix) and isinstance(m, TensorStorageMetadata)
    }
    if not want:
        raise KeyError(f"{path}: no tensors under {prefix!r} (keys: {sorted(meta)[:5]}...)")
    with _quiet_single_process():
        dcp.load(want, storage_reader=reader, no_dist=True)
    return {k[len(prefix) :]: v for k, v in want.items()}


def any_rank(flag: bool) -> bool:
    """True on every rank if ``flag`` is true on any (a preemption signal seen by one rank)."""
    if not _STATE.distributed:
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=_comm_device())
    all_reduce_max(t)
    return bool(t.item() > 0)


# ----------------------------------------------------------------------------- local launcher


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _local_worker(
    local_rank: int, fn: Callable[..., Any], world: int, port: int, args: tuple
) -> None:
    os.environ.update(
        RANK=str(local_rank),
        WORLD_SIZE=str(world),
        LOCAL_RANK=str(local_rank),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
    )
    fn(*args)


def launch_local(fn: Callable[..., Any], world_size: int, *args: Any) -> None:
    """Run ``fn(*args)`` in ``world_size`` spawned processes with torchrun's environment (tests).

    ``fn`` must be importable (a module-level function). Raises if any process fails.
    """
    import torch.multiprocessing as mp

    mp.start_processes(
        _local_worker,
        args=(fn, world_size, free_port(), args),
        nprocs=world_size,
        start_method="spawn",
    )
