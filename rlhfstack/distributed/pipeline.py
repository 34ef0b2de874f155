"""Pipeline parallelism (``torch.distributed.pipelining``): the decoder layers split in contiguous
chunks across ranks, hidden states handed from stage to stage, GPipe / 1F1B schedules."""

from __future__ import annotations

import contextlib
import logging
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.fsdp import FSDPModule
from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleGPipe
from torch.distributed.tensor import DTensor

from rlhfstack.distributed.launch import (
    ParallelState,
    all_reduce_sum,
    broadcast_object,
    comm_device,
    sum_stats,
)
from rlhfstack.distributed.parallelize import apply_tp, clip_grad_norm, find_trunk, fully_shard_tree

log = logging.getLogger("rlhfstack.distributed")

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


TIED_GRADS = ("micro_batch", "stage")
"""``parallel.pp_tied_grads``: how the gradient of a weight used on two stages (a tied
embedding / LM head) is summed. ``micro_batch``: each micro-batch's two contributions are added,
then the micro-batches in order, as backward accumulates them in one process (bit for bit the
one-process gradient; costs one copy of that gradient per micro-batch on the stages that use
it). ``stage``: each stage accumulates its own micro-batches and the two sums are added once (no
extra memory; the same sum in another order, float32 reassociation)."""


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
        tied_grads: str = "micro_batch",
    ) -> None:
        if tied_grads not in TIED_GRADS:
            raise ValueError(f"parallel.pp_tied_grads: {tied_grads!r} (choose from {TIED_GRADS})")
        self.state = state
        self.tied_grads = tied_grads
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

        # each parameter's place in the one-process parameter order (tied weights: their first
        # name), so that the pipelined gradient norm reduces per-tensor norms in that order
        order = {id(p): i for i, p in enumerate(model.parameters())}
        self._n_order = len(order)
        # which stages use each parameter (by identity: tied weights show up under two names)
        users: dict[int, set[int]] = {}
        aliases: dict[int, list[str]] = {}
        for name, p in model.named_parameters(remove_duplicate=False):
            users.setdefault(id(p), set()).add(stage_of(name))
            aliases.setdefault(id(p), []).append(name)
        self.owned_keys = [k for k in model.state_dict() if stage_of(k) == s]
        self._trainable_keys = {
            n for n, p in model.named_parameters(remove_duplicate=False) if p.requires_grad
        }
        place = {n: order[i] for i, ns in aliases.items() for n in ns}
        local_names = {n for i, ns in aliases.items() if s in users[i] for n in ns}
        train_names = local_names & set(param_names)
        norm_names = {n for i, ns in aliases.items() if min(users[i]) == s for n in ns}
        # trained tied weights used by several stages (embedding / LM head): their grads are
        # summed over pp (a frozen one, such as a LoRA base's, has none)
        self._shared = sorted(
            ns
            for i, ns in aliases.items()
            if len(users[i]) > 1
            and set(ns) & set(param_names)
            and model.get_parameter(ns[0]).requires_grad
        )
        self._shared_meta = {
            ns[0]: (model.get_parameter(ns[0]).shape, model.get_parameter(ns[0]).dtype)
            for ns in self._shared
        }
        self._dtype = next(p.dtype for p in model.parameters() if p.is_floating_point())
        # weights this stage holds but never runs (heads outside the trunk on earlier stages) are
        # frozen here: they stay out of this rank's optimizer and checkpoint shard, so that a
        # checkpoint holds each weight as the stage that trains it left it
        for i, ns in aliases.items():
            if s not in users[i]:
                model.get_parameter(ns[0]).requires_grad_(False)
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
            self.module = fully_shard_tree(
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
        self._norm_places: list[int] = []
        for n, p in self._named.items():
            if n in train_names and p.requires_grad and id(p) not in seen:
                seen.add(id(p))
                self.params.append(p)
                if n in norm_names:
                    self.norm_params.append(p)  # each shared weight counted on one stage
                    self._norm_places.append(place[n])
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
        # per-micro-batch gradients of the shared weights (parallel.pp_tied_grads=micro_batch)
        per_micro: dict[tuple[str, ...], list[torch.Tensor]] = {}
        hooks = []
        if (
            self.tied_grads == "micro_batch"
            and n_micro > 1
            and not (self.fsdp or self.state.tp > 1)
        ):
            for names in map(tuple, self._shared):
                p = next((self._named[n] for n in names if n in self._named), None)
                if p is not None and p.requires_grad:
                    got = per_micro.setdefault(names, [])
                    hooks.append(p.register_hook(lambda g, got=got: got.append(g.detach().clone())))
                else:
                    per_micro[names] = []
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
            for h in hooks:
                h.remove()
        if per_micro:
            self._sum_shared_grads_by_micro_batch(per_micro, n_micro)
        else:
            self._sync_shared_grads()
        loss, stats = broadcast_object(
            (ctx.loss, ctx.stats), src=self.last_global_rank, group=self.group
        )
        if self.state.dp > 1:  # each data-parallel replica of the pipeline saw its own rows
            stats = sum_stats({"loss": loss, **stats}, self.state.group("dp_shard"))
            loss = stats.pop("loss")
        return loss, stats

    def _sum_shared_grads_by_micro_batch(
        self, per_micro: dict[tuple[str, ...], list[torch.Tensor]], n_micro: int
    ) -> None:
        """The one-process gradient of each shared weight: micro-batch ``j``'s contributions of
        all stages summed (a stage that does not run the weight in ``j`` adds zeros, exactly),
        then ``((s_0 + s_1) + s_2) + ...`` as backward accumulates them in one process."""
        for names, got in per_micro.items():
            shape, dtype = self._shared_meta[names[0]]
            if got and len(got) != n_micro:
                raise RuntimeError(
                    f"pipeline parallelism: {len(got)} gradients of {names[0]} for {n_micro} "
                    "micro-batches (the weight runs more than once per micro-batch)"
                )
            total = None
            for j in range(n_micro):
                s_j = got[j] if got else torch.zeros(shape, dtype=dtype, device=self.state.device)
                all_reduce_sum(s_j, self.group)
                total = s_j if total is None else total.add_(s_j)
            p = next((self._named[n] for n in names if n in self._named), None)
            if p is not None and p.requires_grad:
                p.grad = total

    def _sync_shared_grads(self) -> None:
        """Sum the gradients of weights used on several stages (tied embedding / LM head)."""

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

    def clip_grad(self, max_norm: float) -> float:
        """Clip the gradient norm over all stages; returns the pre-clip norm (same on every rank).

        With whole (unsharded) stages the norm is computed as ``torch.nn.utils.clip_grad_norm_``
        computes it in one process: per-tensor norms, stacked in the one-process parameter order
        (each stage fills its places, zeros elsewhere, so the sum over stages is exact), then the
        norm of that vector and the same float32 clip coefficient. The pipelined update is then
        the one-process update bit for bit. Sharded stages (``tp``, ``dp_shard``) add per-rank
        sums of squares instead (float reassociation).
        """
        if self.state.tp > 1 or self.fsdp:
            return clip_grad_norm(self.params, max_norm, self.norm_params, self.group)
        local = [
            (i, p.grad) for i, p in zip(self._norm_places, self.norm_params) if p.grad is not None
        ]
        dev = comm_device()
        norms = torch.zeros(self._n_order, dtype=torch.float32, device=dev)
        has = torch.zeros(self._n_order, dtype=torch.float32, device=dev)
        if local:
            per_tensor = torch._foreach_norm([g for _, g in local], 2.0)
            for (i, _), n in zip(local, per_tensor):
                norms[i], has[i] = n.to(dev, torch.float32), 1.0
        all_reduce_sum(norms, self.group)
        all_reduce_sum(has, self.group)
        if not bool(has.any()):
            return 0.0
        total = torch.linalg.vector_norm(norms[has > 0], 2.0)
        with_grad = [p for p in self.params if p.grad is not None]
        if max_norm and max_norm > 0 and with_grad:
            total_here = total.to(with_grad[0].grad.device)
            torch.nn.utils.clip_grads_with_norm_(with_grad, max_norm, total_here)
        return float(total)

    def _owned_entries(self, trainable_only: bool = False) -> dict[str, torch.Tensor]:
        """This stage's state-dict entries (only trainable ones with ``trainable_only``), whole
        (sharded ones gathered within the stage, a collective there), on CPU."""
        for m in self.module.modules():
            if isinstance(m, FSDPModule):
                m.reshard()
        owned = set(self.owned_keys)
        mine = {}
        for k, v in self.model.state_dict().items():
            if k in owned and (not trainable_only or k in self._trainable_keys):
                v = v.full_tensor() if isinstance(v, DTensor) else v
                mine[k] = v.detach().cpu()
        return mine

    def gathered_state_dict(self, trainable_only: bool = False) -> dict[str, torch.Tensor]:
        """Every stage's entries (only the trainable parameters with ``trainable_only``), whole,
        on every rank (this rank's device): what a rollout replica loads. Collective over the
        whole world."""
        mine = self._owned_entries(trainable_only)
        parts: list[Any] = [None] * self.state.pp
        dist.all_gather_object(parts, mine, group=self.group)
        dev = torch.device(self.state.device)
        return {k: v.to(dev) for part in parts for k, v in part.items()}

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        """Every stage's trained entries merged on rank 0 (CPU); ``{}`` elsewhere.

        Collective over the whole world: sharded entries are gathered within each stage first.
        """
        mine = self._owned_entries()
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
