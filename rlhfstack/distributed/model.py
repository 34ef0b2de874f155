"""``DistributedModel``: a stage's model under the configured parallelism (TP, FSDP2, PP, or
none), with the forward/backward, gradient clipping, rollout replica and final gather the stages use."""

from __future__ import annotations

import contextlib
import copy
import logging
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.fsdp import FSDPModule

from rlhfstack.distributed.launch import (
    MIXED_PRECISION,
    ParallelState,
    barrier,
    sum_stats,
    teardown,
)
from rlhfstack.distributed.parallelize import (
    apply_fsdp2,
    apply_tp,
    clip_grad_norm,
    gather_full_state_dict,
    meta_copy,
    restore_plain,
)
from rlhfstack.distributed.pipeline import PipelineRunner

log = logging.getLogger("rlhfstack.distributed")

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
        pp_tied_grads: str = "micro_batch",
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
            self.pipe = PipelineRunner(model, state, names, mixed_precision, pp_tied_grads)
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
            return self.pipe.clip_grad(max_norm)
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

        if self.pipe is not None:
            return self.pipe.gathered_state_dict(trainable_only)
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
