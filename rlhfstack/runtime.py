"""Run-directory plumbing shared by every stage: seeding, atomic writes, metrics, plots, timing.

Nothing here knows about models or losses. Every file a stage writes goes through
``atomic_write_*`` or ``atomic_dir`` so that an interrupted run never leaves a half-written
checkpoint or report behind.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import math
import os
import random
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import torch

from rlhfstack.configs import resolved_yaml

# ----------------------------------------------------------------------------- optional packages

OPTIONAL_PACKAGES: dict[str, tuple[str, str | None]] = {
    "wandb": ("wandb", "wandb"),
    "hydra_plugins.hydra_submitit_launcher": ("hydra-submitit-launcher", "slurm"),
    "vllm": ("vllm", "gpu"),
    "bitsandbytes": ("bitsandbytes", "gpu"),
    "lm_eval": ("lm-eval", "eval"),
    "gguf": ("gguf", "rm-gemma"),
    # dependencies of every install, imported only where used (slow, or rarely needed)
    "peft": ("peft", None),
    "matplotlib": ("matplotlib", None),
    "torch.utils.tensorboard": ("tensorboard", None),
    "datasets": ("datasets", None),
    "pyarrow.parquet": ("pyarrow", None),
}
"""Packages imported only where a feature needs them: import name -> (distribution, the
``rlhfstack`` extra that installs it; None for a dependency of every install)."""


class MissingPackage(ImportError):
    """A package a feature needs is not installed; the message is one line naming the feature and
    the install command (entry points print it without a traceback, :func:`exit_on_missing_package`)."""


def install_hint(module: str) -> str:
    """The command that installs the package of ``module`` (a key of :data:`OPTIONAL_PACKAGES`)."""
    dist, extra = OPTIONAL_PACKAGES[module]
    if extra is None:
        return f"pip install {dist}  (a dependency of rlhfstack: the install is incomplete)"
    return f"pip install 'rlhfstack[{extra}]'  (from a checkout: pip install -e '.[{extra}]')"


def require(module: str, feature: str) -> ModuleType:
    """Import ``module`` (a key of :data:`OPTIONAL_PACKAGES`) for ``feature`` (what the user
    switched on, e.g. ``"logging.wandb=true"``); raise :class:`MissingPackage` with the install
    command when it (or a package it needs) is missing."""
    try:
        return importlib.import_module(module)
    except ImportError as err:
        dist = OPTIONAL_PACKAGES[module][0]
        raise MissingPackage(
            f"{feature} needs the '{dist}' package ({err}): {install_hint(module)}"
        ) from err


@contextlib.contextmanager
def exit_on_missing_package() -> Iterator[None]:
    """For entry points: a :class:`MissingPackage` is printed as its one line (no traceback) and
    the process exits with status 1."""
    try:
        yield
    except MissingPackage as err:
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(1) from None


SUBMITIT_LAUNCHERS = ("slurm", "submitit_slurm", "submitit_local")
"""``hydra/launcher=`` choices that need the submitit launcher plugin."""


def require_launcher(overrides: list[str]) -> None:
    """Check, before Hydra composes the config, that a ``hydra/launcher=`` override naming the
    submitit launcher has its plugin installed (Hydra itself only says that it "could not load
    'hydra/launcher/submitit_slurm'"); raises :class:`MissingPackage`."""
    for arg in overrides:
        key, _, value = arg.partition("=")
        if key.lstrip("+~") == "hydra/launcher" and value in SUBMITIT_LAUNCHERS:
            require("hydra_plugins.hydra_submitit_launcher", arg)


# ----------------------------------------------------------------------------- seeding


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch (CPU and CUDA)."""
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(seed)


def rng_state() -> dict[str, Any]:
    """All RNG states, for checkpoints."""
    state = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what ``rng_state`` returned."""
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ----------------------------------------------------------------------------- atomic writes


_LIBC_TRIM: Any = None


def release_free_heap() -> bool:
    """Hand the heap's free pages back to the OS (glibc ``malloc_trim(0)``); False elsewhere.

    CPU tensors come from glibc malloc, which keeps freed chunks of up to 32 MiB in its heap.
    A PPO iteration frees the rollout's and the scoring passes' tensors just before the training
    pass allocates its activations, and those land in new pages when the holes do not fit them,
    so the resident set creeps upward from one iteration to the next. Trimming between the two
    phases (a few milliseconds) makes the training pass start from a heap without resident
    holes. Only memory that is already free is released; nothing is moved.
    """
    global _LIBC_TRIM
    if _LIBC_TRIM is None:
        try:
            import ctypes

            _LIBC_TRIM = ctypes.CDLL("libc.so.6").malloc_trim
        except (OSError, AttributeError):  # not glibc (macOS, musl)
            _LIBC_TRIM = False
    if _LIBC_TRIM is False:
        return False
    _LIBC_TRIM(0)
    return True


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` to a temporary file beside ``path``, then rename it into place."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    """Atomically write ``obj`` as indented JSON."""
    atomic_write_text(
        path, json.dumps(obj, indent=2, sort_keys=False, default=_json_default) + "\n"
    )


def atomic_write_jsonl(path: str | os.PathLike, rows: list[dict]) -> None:
    """Atomically write rows as JSON lines."""
    atomic_write_text(path, "".join(json.dumps(r, default=_json_default) + "\n" for r in rows))


def _json_default(o: Any) -> Any:
    if isinstance(o, (np.floating, np.integer)):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, torch.Tensor):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serializable: {type(o).__name__}")


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary directory beside ``path``; on success, rename it to ``path``.

    An existing ``path`` is replaced only after the new directory is complete.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        yield tmp
        if path.exists():
            old = path.with_name(f".{path.name}.old-{os.getpid()}")
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def read_jsonl(path: str | os.PathLike) -> list[dict]:
    """Read a JSON-lines file written by this project (strict)."""
    rows = []
    with open(path, encoding="utf-8") as f:
        for i, line in enumerate(f, 1):
            line = line.strip()
            if not line:
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}:{i}: invalid JSON ({err.msg})") from None
    return rows


# ----------------------------------------------------------------------------- metrics


class RunLogger:
    """Appends one JSON object per step to ``run_dir/metrics.jsonl``; mirrors to TensorBoard and W&B.

    ``metrics.jsonl`` is opened in append mode so that a resumed run continues the same file;
    on resume, rows after the checkpointed step are dropped first (``truncate_after``).
    """

    def __init__(
        self,
        run_dir: str | os.PathLike,
        *,
        tensorboard: bool = True,
        wandb: bool = False,
        wandb_mode: str = "offline",
        wandb_project: str = "rlhfstack",
        config: dict | None = None,
        enabled: bool = True,
    ) -> None:
        self.run_dir = Path(run_dir)
        self.enabled = enabled
        self.path = self.run_dir / "metrics.jsonl"
        self._tb = None
        self._wandb = None
        if not enabled:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        if tensorboard:
            tb = require("torch.utils.tensorboard", "logging.tensorboard=true")
            self._tb = tb.SummaryWriter(log_dir=str(self.run_dir / "tb"))
        if wandb:
            _wandb = require("wandb", "logging.wandb=true")
            os.environ.setdefault("WANDB_MODE", wandb_mode)
            self._wandb = _wandb.init(
                project=wandb_project, dir=str(self.run_dir), config=config, mode=wandb_mode
            )

    def truncate_after(self, step: int) -> None:
        """Drop rows with ``step > step`` (used when resuming from a checkpoint)."""
        if not self.enabled or not self.path.exists():
            return
        keep = [r for r in read_jsonl(self.path) if r.get("step", 0) <= step]
        atomic_write_jsonl(self.path, keep)

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        """Write one row ``{"step": step, **metrics}`` (floats only; tensors are converted).

        The row stays valid JSON: a NaN or infinite value is written as ``null`` and its key is
        listed under ``"nonfinite"`` in that row (TensorBoard and W&B get no point for it)."""
        if not self.enabled:
            return
        row: dict[str, Any] = {"step": int(step)}
        nonfinite: list[str] = []
        for k, v in metrics.items():
            if isinstance(v, torch.Tensor):
                v = v.detach().float().item()
            elif isinstance(v, (np.floating, np.integer)):
                v = v.item()
            if isinstance(v, float) and not math.isfinite(v):
                nonfinite.append(k)
                v = None
            row[k] = v
        if nonfinite:
            row["nonfinite"] = nonfinite
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(row) + "\n")
            f.flush()
        for k, v in row.items():
            if k == "step" or not isinstance(v, (int, float)):
                continue
            if self._tb is not None:
                self._tb.add_scalar(k, v, step)
        if self._wandb is not None:
            self._wandb.log(
                {k: v for k, v in row.items() if v is not None and k != "nonfinite"}, step=step
            )

    def close(self) -> None:
        if self._tb is not None:
            self._tb.flush()
            self._tb.close()
            self._tb = None
        if self._wandb is not None:
            self._wandb.finish()
            self._wandb = None


# ----------------------------------------------------------------------------- timing


class CostMeter:
    """CPU seconds (all threads of this process), wall seconds and tokens processed."""

    def __init__(self) -> None:
        self._cpu0 = time.process_time()
        self._wall0 = time.perf_counter()
        self.tokens = 0

    def add_tokens(self, n: int) -> None:
        self.tokens += int(n)

    def summary(self) -> dict[str, float]:
        return {
            "cpu_seconds": round(time.process_time() - self._cpu0, 3),
            "wall_seconds": round(time.perf_counter() - self._wall0, 3),
            "tokens": int(self.tokens),
        }


def write_stage_done(run_dir: str | os.PathLike, info: dict[str, Any]) -> None:
    """Mark a stage finished: ``run_dir/done.json`` (cost and outputs)."""
    atomic_write_json(Path(run_dir) / "done.json", info)


def save_resolved_config(cfg: Any, run_dir: str | os.PathLike) -> None:
    """Write the fully resolved config to ``run_dir/config.yaml``."""

    atomic_write_text(Path(run_dir) / "config.yaml", resolved_yaml(cfg))
