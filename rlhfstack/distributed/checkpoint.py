"""Checkpoints: ``run_dir/ckpt-NNNNNN/`` through ``torch.distributed.checkpoint`` (each rank
writes its own shards) plus rank 0's state, written whole or not at all."""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.metadata import TensorStorageMetadata
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict

from rlhfstack.distributed.launch import barrier, current, is_main

log = logging.getLogger("rlhfstack.distributed")

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

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


def _ckpt_options() -> Any:

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
            no_dist=not current().distributed,
        )
    if rank_extra is not None:
        torch.save(rank_extra, tmp / f"rank-{current().rank}.pt")
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

    path = Path(path)
    opts = _ckpt_options()
    model_sd, optim_sd = get_state_dict(model, optimizer, options=opts)
    state = {"model": model_sd, "optim": optim_sd}
    with _quiet_single_process():
        dcp.load(state, checkpoint_id=str(path), no_dist=not current().distributed)
    set_state_dict(
        model,
        optimizer,
        model_state_dict=state["model"],
        optim_state_dict=state["optim"],
        options=opts,
    )
    extra = torch.load(path / CKPT_EXTRA, weights_only=False)
    mine = path / f"rank-{current().rank}.pt"
    extra["rank_extra"] = torch.load(mine, weights_only=False) if mine.exists() else None
    return extra


def read_checkpoint_tensors(path: str | os.PathLike, prefix: str = "model.") -> dict[str, Any]:
    """The tensors of a ``save_checkpoint`` directory whose flattened key starts with ``prefix``
    (``model.`` = the trained module's parameters), unsharded, in one process, keys without the
    prefix. For tools (export, conversion) that read a checkpoint without its training setup."""

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
