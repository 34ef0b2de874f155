"""Checkpoints: ``run_dir/ckpt-NNNNNN/`` through ``torch.distributed.checkpoint`` (each rank
writes its own shards) plus rank 0's state, written whole or not at all."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import pickle
import shutil
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed.checkpoint as dcp
from safetensors.torch import load_file, save_file
from torch import nn
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner, set_element
from torch.distributed.checkpoint.metadata import StorageMeta, TensorStorageMetadata
from torch.distributed.checkpoint.planner import ReadItem
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict

from rlhfstack.distributed.launch import barrier, current, is_main

log = logging.getLogger("rlhfstack.distributed")

# ----------------------------------------------------------------------------- checkpoints
#
# ``run_dir/ckpt-NNNNNN/``: model and optimizer through ``torch.distributed.checkpoint`` (each
# rank writes its own shards of FSDP2 / TP parameters and optimizer state; in one process the
# same format with one shard), plus rank 0's other state (scheduler, RNG, data position, KL
# controller, step, recipe) as ``extra.json`` with its tensors in ``extra.safetensors``, and
# per-rank state as ``rank-R.json`` / ``rank-R.safetensors``. Nothing from a checkpoint is
# unpickled freely, so a directory from elsewhere runs none of its code: DCP's ``.metadata`` is
# a pickle, read by an unpickler that admits only DCP's metadata classes and torch's dtypes
# (``_SafeReader``), and DCP's non-tensor items (optimizer param groups) are read with
# ``weights_only=True`` (``_SafeLoadPlanner``). Written into a hidden ``.ckpt-NNNNNN.partial``
# sibling and renamed by rank 0 once every rank has finished, so a ``ckpt-*`` directory is
# always whole.

CKPT_EXTRA = "extra.json"
#: the pickled ``extra.pt`` of earlier versions: never loaded (unpickling runs arbitrary code)
CKPT_LEGACY_EXTRA = "extra.pt"
#: version of the ``extra.json`` encoding (:func:`encode_state`)
CKPT_FORMAT = 1


class CheckpointFormatError(ValueError):
    """A checkpoint this version does not load: the pickled format of earlier versions, or an
    ``extra.json`` that does not decode."""


def checkpoint_path(run_dir: str | os.PathLike, step: int) -> Path:
    return Path(run_dir) / f"ckpt-{step:06d}"


def latest_checkpoint(run_dir: str | os.PathLike) -> Path | None:
    """The newest complete ``ckpt-*`` directory under ``run_dir``, or None.

    Raises :class:`CheckpointFormatError` when a ``ckpt-*`` holds the pickled ``extra.pt`` of
    earlier versions: it is not loaded, and not skipped silently either (a fresh start would
    then delete it)."""
    legacy = [
        p
        for p in Path(run_dir).glob("ckpt-*")
        if (p / CKPT_LEGACY_EXTRA).exists() and not (p / CKPT_EXTRA).exists()
    ]
    if legacy:
        raise CheckpointFormatError(
            f"{sorted(legacy)[-1]}: a checkpoint in the old pickled format ({CKPT_LEGACY_EXTRA}). "
            "It is not loaded: unpickling a file runs whatever code it names. Resume it with the "
            "version that wrote it, or start this run over with overwrite=true (deletes the "
            "ckpt-* directories and metrics of run_dir)."
        )
    done = [
        p
        for p in Path(run_dir).glob("ckpt-*")
        if (p / CKPT_EXTRA).exists() and (p / ".metadata").exists()
    ]
    return max(done, key=lambda p: p.name) if done else None


# ----------------------------------------------------------------------------- state encoding
#
# Checkpoint state other than the model and optimizer is nested dicts / lists / tuples of
# numbers, strings, numpy arrays and torch tensors (RNG states, an LR scheduler's state dict, a
# data order). It is written as JSON, each tensor replaced by {"__tensor__": name} and stored
# under that name in a safetensors file (no code execution on load); tuples and numpy arrays
# are tagged so that they come back as they were (``random.setstate`` wants tuples).


def encode_state(obj: Any, tensors: dict[str, torch.Tensor], where: str = "") -> Any:
    """``obj`` as JSON-compatible values, its tensors moved into ``tensors``. Raises TypeError
    (naming the key) for anything else, so that no state needs pickle."""
    if isinstance(obj, torch.Tensor):
        name = f"t{len(tensors)}"
        tensors[name] = obj.detach().cpu().contiguous()
        return {"__tensor__": name}
    if isinstance(obj, np.ndarray):
        return {"__ndarray__": obj.tolist(), "dtype": str(obj.dtype)}
    if isinstance(obj, np.generic):
        return obj.item()
    if obj is None or isinstance(obj, bool | int | float | str):
        return obj
    if isinstance(obj, tuple):
        return {"__tuple__": [encode_state(v, tensors, f"{where}[{i}]") for i, v in enumerate(obj)]}
    if isinstance(obj, list):
        return [encode_state(v, tensors, f"{where}[{i}]") for i, v in enumerate(obj)]
    if isinstance(obj, dict):
        if not all(isinstance(k, str) for k in obj):
            raise TypeError(f"checkpoint state {where or '<root>'}: dict keys must be str")
        return {k: encode_state(v, tensors, f"{where}.{k}" if where else k) for k, v in obj.items()}
    raise TypeError(
        f"checkpoint state {where or '<root>'}: {type(obj).__name__} is not storable without "
        "pickle (use tensors, numpy arrays, numbers, strings, lists, tuples, dicts)"
    )


def decode_state(obj: Any, tensors: dict[str, torch.Tensor]) -> Any:
    """The inverse of :func:`encode_state`."""
    if isinstance(obj, list):
        return [decode_state(v, tensors) for v in obj]
    if isinstance(obj, dict):
        if "__tensor__" in obj:
            return tensors[obj["__tensor__"]]
        if "__ndarray__" in obj:
            return np.asarray(obj["__ndarray__"], dtype=np.dtype(obj["dtype"]))
        if "__tuple__" in obj:
            return tuple(decode_state(v, tensors) for v in obj["__tuple__"])
        return {k: decode_state(v, tensors) for k, v in obj.items()}
    return obj


def write_state(state: dict[str, Any], json_path: Path) -> None:
    """``state`` as ``json_path`` plus its tensors in ``json_path.with_suffix(".safetensors")``."""
    tensors: dict[str, torch.Tensor] = {}
    body = {"format": CKPT_FORMAT, "state": encode_state(state, tensors)}
    save_file(tensors, str(json_path.with_suffix(".safetensors")))
    json_path.write_text(json.dumps(body))


def read_state(json_path: Path) -> dict[str, Any]:
    """What :func:`write_state` wrote (JSON and safetensors only: nothing is unpickled)."""
    try:
        body = json.loads(json_path.read_text())
        if body.get("format") != CKPT_FORMAT:
            raise CheckpointFormatError(
                f"{json_path}: checkpoint state format {body.get('format')!r}, "
                f"this version reads {CKPT_FORMAT}"
            )
        tensors = load_file(str(json_path.with_suffix(".safetensors")))
        return decode_state(body["state"], tensors)
    except (json.JSONDecodeError, KeyError, AttributeError, OSError) as err:
        raise CheckpointFormatError(f"{json_path}: unreadable checkpoint state ({err})") from err


def read_checkpoint_extra(path: str | os.PathLike) -> dict[str, Any]:
    """Rank 0's ``extra`` of checkpoint ``path`` without loading any model (the recipe check)."""
    return read_state(Path(path) / CKPT_EXTRA)


def read_rank_extra(path: str | os.PathLike, rank: int) -> dict[str, Any] | None:
    """The ``rank_extra`` that global rank ``rank`` wrote into checkpoint ``path`` (None if it
    wrote none): for a resume under another layout, where this rank's state was another rank's."""
    p = Path(path) / f"rank-{rank}.json"
    return read_state(p) if p.exists() else None


@contextlib.contextmanager
def _quiet_single_process() -> Iterator[None]:
    """DCP warns on every single-process save/load ("assuming the intent is to ... in a single
    process"): that is the intent here."""

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


# DCP's ``.metadata`` is a pickle of its metadata dataclasses: the classes of
# ``torch.distributed.checkpoint.metadata`` and these are the only globals it may name (anything
# else is refused before it is called); torch dtypes are admitted by type
_METADATA_MODULE = "torch.distributed.checkpoint.metadata"
_METADATA_GLOBALS = {
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
    ("torch.serialization", "_get_layout"),
    ("torch", "Size"),
    ("torch", "device"),
    ("collections", "OrderedDict"),
    ("pathlib", "PosixPath"),
}


class _MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        found = super().find_class(module, name) if module.startswith("torch") else None
        allowed = (
            (module, name) in _METADATA_GLOBALS
            or (module == _METADATA_MODULE and isinstance(found, type))
            or (module == "torch" and isinstance(found, torch.dtype))
        )
        if not allowed:
            raise CheckpointFormatError(
                f"checkpoint metadata names {module}.{name}, which is not a checkpoint metadata "
                "class: refused (unpickling it could run code)"
            )
        return found if found is not None else super().find_class(module, name)


class _SafeReader(dcp.FileSystemReader):
    """DCP's file reader, with ``.metadata`` read by :class:`_MetadataUnpickler`."""

    def read_metadata(self, *args: Any, **kwargs: Any) -> Any:
        path = self._get_metadata_path(kwargs.get("rank"))
        with self.fs.create_stream(path, "rb") as f:
            try:
                metadata = _MetadataUnpickler(f).load()
            except CheckpointFormatError as err:
                raise CheckpointFormatError(f"{path}: {err}") from None
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


class _SafeLoadPlanner(DefaultLoadPlanner):
    """DCP's load planner with its non-tensor items (an optimizer's param groups: numbers,
    lists, tuples) read with ``weights_only=True``."""

    def load_bytes(self, read_item: ReadItem, value: Any) -> None:
        obj = torch.load(value, weights_only=True)
        if self.flatten_state_dict:
            set_element(self.original_state_dict, self.mappings[read_item.dest_index.fqn], obj)
        else:
            self.state_dict[read_item.dest_index.fqn] = obj


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
    generator) from every rank, as ``rank-R.json`` (both through :func:`write_state`: JSON and
    safetensors, no pickle). Older ``ckpt-*`` siblings beyond the newest
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
        write_state(rank_extra, tmp / f"rank-{current().rank}.json")
    barrier()
    if is_main():
        write_state(extra, tmp / CKPT_EXTRA)
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
    # the metadata check first, so that a refused file is reported as such (inside dcp.load the
    # error would reach the caller wrapped in DCP's per-rank exception)
    reader = _SafeReader(str(path))
    reader.read_metadata()
    opts = _ckpt_options()
    model_sd, optim_sd = get_state_dict(model, optimizer, options=opts)
    # the parameter names of this rank's optimizer groups: DCP stores non-tensor items such as
    # ``param_groups`` once (from one rank), but pipeline stages hold different parameters (a
    # tied embedding / LM head goes by other names on each): the hyperparameters are loaded,
    # the names stay this rank's
    local_names = [list(g["params"]) for g in optim_sd.get("param_groups", [])]
    state = {"model": model_sd, "optim": optim_sd}
    with _quiet_single_process():
        dcp.load(
            state,
            storage_reader=reader,
            planner=_SafeLoadPlanner(),
            no_dist=not current().distributed,
        )
    groups = state["optim"].get("param_groups", [])
    if len(groups) == len(local_names):
        for group, names in zip(groups, local_names):
            group["params"] = names
    # DCP has already refused a checkpoint that lacks a trainable weight or its optimizer state;
    # the frozen weights (a LoRA base, a head a pipeline stage never runs) are not in it and stay
    # as loaded from the model path, so the model's own load is told not to require them
    keys = set_state_dict(
        model,
        optimizer,
        model_state_dict=state["model"],
        optim_state_dict=state["optim"],
        options=StateDictOptions(ignore_frozen_params=True, strict=False),
    )
    trainable = {n for n, p in model.named_parameters(remove_duplicate=False) if p.requires_grad}
    missing = [k for k in keys.missing_keys if k in trainable]
    if missing or keys.unexpected_keys:
        raise CheckpointFormatError(
            f"{path}: does not fit the model: missing trainable {missing[:5]}, unexpected "
            f"{list(keys.unexpected_keys)[:5]}"
        )
    mine = path / f"rank-{current().rank}.json"
    extra = read_state(path / CKPT_EXTRA)
    extra["rank_extra"] = read_state(mine) if mine.exists() else None
    return extra


def read_checkpoint_tensors(path: str | os.PathLike, prefix: str = "model.") -> dict[str, Any]:
    """The tensors of a ``save_checkpoint`` directory whose flattened key starts with ``prefix``
    (``model.`` = the trained module's parameters), unsharded, in one process, keys without the
    prefix. For tools (export, conversion) that read a checkpoint without its training setup."""

    reader = _SafeReader(str(path))
    meta = reader.read_metadata().state_dict_metadata  # CheckpointFormatError if refused
    want = {
        k: torch.empty(m.size, dtype=m.properties.dtype)
        for k, m in meta.items()
        if k.startswith(prefix) and isinstance(m, TensorStorageMetadata)
    }
    if not want:
        raise KeyError(f"{path}: no tensors under {prefix!r} (keys: {sorted(meta)[:5]}...)")
    with _quiet_single_process():
        dcp.load(want, storage_reader=reader, planner=_SafeLoadPlanner(), no_dist=True)
    return {k[len(prefix) :]: v for k, v in want.items()}
