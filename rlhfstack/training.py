"""Pieces every training stage shares: run setup, optimizer, LR schedule, micro-batching.

Stages import this module; no stage imports another stage. Distributed runs (``torchrun`` /
``srun`` with ``parallel.dp_shard``, ``parallel.tp``, ``parallel.pp``) go through
``rlhfstack.distributed``: ``setup_run`` starts the process group, ``train_loop`` shards each global
batch over the data-parallel ranks and hands the model to ``distributed.DistributedModel``. Only
rank 0 writes (config, metrics, checkpoints); after the loop only rank 0 goes on.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import shutil
import signal
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field, is_dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

from rlhfstack import distributed
from rlhfstack.configs import recipe_diff, recipe_hash, recipe_of, validate
from rlhfstack.dashboard import DASHBOARD_FILE, TRAINING_PANELS, Panel, write_dashboard
from rlhfstack.data.collate import pairs_share_prompts
from rlhfstack.data.loading import HUB_PREFIX, resolve_data_path
from rlhfstack.data.schemas import LoadReport
from rlhfstack.logs import close_stage_log, configure_logging, open_stage_log, set_stage
from rlhfstack.models.card import write_card
from rlhfstack.models.core import load_causal_lm, save_hf
from rlhfstack.models.gguf import PKGGGUF_PREFIX
from rlhfstack.models.paths import PKG_PREFIX, PKGPARTS_PREFIX
from rlhfstack.progress import Progress, format_duration, quiet_library_bars
from rlhfstack.runtime import (
    CostMeter,
    RunLogger,
    atomic_write_text,
    exit_on_missing_package,
    read_jsonl,
    rng_state,
    save_resolved_config,
    seed_everything,
    set_rng_state,
    write_stage_done,
)

log = logging.getLogger("rlhfstack")


#: stages that can run distributed: SFT, RM and DPO through ``train_loop`` (FSDP2 / TP / PP),
#: PPO through its own loop (FSDP2 data parallel, rollouts on a gathered replica)
DISTRIBUTED_STAGES = ("sft", "rm", "dpo", "ppo")

#: signals that mean "save a checkpoint and stop": SLURM's pre-timeout / preemption notice
#: (``--signal=B:USR1@120``, forwarded to the workers by slurm/common.sh) and SIGTERM
PREEMPT_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class Preempted(SystemExit):
    """Raised after a preemption checkpoint: the process exits with status 0 so that the job
    can requeue, and the same command resumes from that checkpoint."""

    def __init__(self, step: int) -> None:
        super().__init__(0)
        self.step = step


class TrainingDiverged(RuntimeError):
    """A training run stopped because it diverged, before the update that would have used the bad
    values: nothing is saved after it (no checkpoint, model or ``done.json``), and the newest
    checkpoint in ``run_dir`` is the last good state. Recipes exit with :data:`EXIT_DIVERGED`.

    ``quantity``: what went wrong (a metric name); ``step``: the step that produced it;
    ``last_good``: the main metrics of the last step whose values were all finite."""

    def __init__(
        self, message: str, *, quantity: str, step: int, last_good: dict[str, float]
    ) -> None:
        super().__init__(message)
        self.quantity, self.step, self.last_good = quantity, step, dict(last_good)


class NonFiniteError(TrainingDiverged):
    """A loss, gradient norm, reward, value or KL went NaN or infinite."""


class RunawayKLError(TrainingDiverged):
    """PPO's KL to the reference stayed above ``kl.stop_multiple`` x ``kl.target`` for
    ``kl.stop_patience`` iterations in a row."""


#: exit status of a recipe whose run diverged (:class:`TrainingDiverged`)
EXIT_DIVERGED = 3

#: the metrics a divergence message quotes from the last good step, when the loop logs them
GUARD_SUMMARY_KEYS = (
    "loss",
    "grad_norm",
    "lr",
    "loss/policy",
    "loss/value",
    "reward/rm_score",
    "kl/seq_k1",
    "kl/beta",
    "values/mean",
)


class FiniteGuard:
    """Stops a training loop at its first non-finite value (:class:`NonFiniteError`).

    A loop calls :meth:`check` with a few scalars (losses, gradient norm, reward, value and KL
    means) before the optimizer step that would use them, and :meth:`passed` with a step's logged
    metrics once they are all finite. Under a process group :meth:`check` is collective (one
    all-reduce of one flag per scalar, the same keys on every rank): a value that is non-finite
    on any rank stops every rank, and every rank names it.
    """

    def __init__(self, run: Run) -> None:
        self.run = run
        self.last_good: dict[str, float] = {}
        self.last_good_step = 0

    def check(
        self,
        step: int,
        values: dict[str, float],
        where: str = "",
        *,
        collective: bool = True,
        before_update: bool = True,
    ) -> None:
        """Raise :class:`NonFiniteError` if any of ``values`` is NaN or infinite (on any rank;
        ``collective=False`` for code that only rank 0 runs). ``before_update``: the values come
        before the step's optimizer update (False for an evaluation after it)."""
        flags = {k: 0.0 if math.isfinite(float(v)) else 1.0 for k, v in values.items()}
        if collective:
            flags = distributed.sum_stats(flags)  # identity in one process
        bad = [k for k, f in flags.items() if f > 0]
        if not bad:
            return
        shown = ", ".join(
            f"{k}={values[k]}" if not math.isfinite(float(values[k])) else f"{k} (another rank)"
            for k in bad
        )
        raise NonFiniteError(
            f"non-finite {bad[0]} at step {step}{f' ({where})' if where else ''}: {shown}. "
            f"{self._tail(before_update)}",
            quantity=bad[0],
            step=step,
            last_good=self.last_good,
        )

    def checked(
        self, step: int, values: dict[str, float], where: str = "", *, collective: bool = True
    ) -> dict[str, float]:
        """:meth:`check` of an evaluation's ``values`` (after the update), then ``values``."""
        self.check(step, values, where, collective=collective, before_update=False)
        return values

    def passed(self, step: int, metrics: dict[str, Any]) -> None:
        """Record step ``step``'s metrics as the last good ones (quoted by the next error)."""
        self.last_good = {
            k: float(metrics[k])
            for k in GUARD_SUMMARY_KEYS
            if isinstance(metrics.get(k), (int, float))
        }
        self.last_good_step = step

    def runaway(self, step: int, quantity: str, message: str) -> RunawayKLError:
        """The :class:`RunawayKLError` of step ``step`` (``message`` says what tripped it)."""
        return RunawayKLError(
            f"{message}. {self._tail()}", quantity=quantity, step=step, last_good=self.last_good
        )

    def _tail(self, before_update: bool = True) -> str:
        ckpt = distributed.latest_checkpoint(self.run.run_dir)
        good = (
            f"last finite values (step {self.last_good_step}): "
            + ", ".join(f"{k}={v:.6g}" for k, v in self.last_good.items())
            if self.last_good
            else "no step finished with finite values"
        )
        kept = (
            f"the last good checkpoint is {ckpt} (rerunning the same command resumes from it)"
            if ckpt is not None
            else "no checkpoint was written"
        )
        applied = "The update was not applied and n" if before_update else "N"
        return (
            f"{applied}othing was saved after it (no model, no done.json); {kept}; {good}. "
            "Lower trainer.lr, check trainer.grad_clip and the data."
        )


@contextlib.contextmanager
def exit_on_divergence() -> Iterator[None]:
    """For recipes: a :class:`TrainingDiverged` is logged as one error paragraph (no traceback)
    and the process exits with :data:`EXIT_DIVERGED`; a missing optional package is its one-line
    install hint, exit status 1 (:func:`rlhfstack.runtime.exit_on_missing_package`). Other
    exceptions pass through."""
    try:
        with exit_on_missing_package():
            yield
    except TrainingDiverged as err:
        log.error("training stopped: %s: %s", type(err).__name__, err)
        raise SystemExit(EXIT_DIVERGED) from None


@contextlib.contextmanager
def preemption_flag(enabled: bool = True) -> Iterator[dict[str, bool]]:
    """``{"flag": bool}`` set to True when SIGTERM / SIGUSR1 arrives; handlers restored on exit.

    The training loop polls it once per step (all ranks agree through ``distributed.any_rank``), so a
    signal never interrupts a step half-way. ``enabled=False`` leaves the default handlers (the
    process dies), for loops that cannot checkpoint."""
    box = {"flag": False}
    if not enabled:
        yield box
        return

    def _on_signal(signum: int, frame: Any) -> None:
        log.warning("signal %d: checkpoint at the end of this step, then exit", signum)
        box["flag"] = True

    old = {s: signal.signal(s, _on_signal) for s in PREEMPT_SIGNALS}
    try:
        yield box
    finally:
        for s, h in old.items():
            signal.signal(s, h)


class Checkpointer:
    """Checkpoints of one training loop: save, resume from the newest, save-and-exit on preemption.

    ``run_dir/ckpt-NNNNNN/`` (``distributed.save_checkpoint``) holds ``model``'s trainable parameters
    and ``optimizer``'s state (``torch.distributed.checkpoint``, sharded as trained) and
    ``extra.json`` (+ ``extra.safetensors``, no pickle): the step, ``scheduler``'s state, the
    global RNG states, the run's recipe (:func:`rlhfstack.configs.recipe_of`, compared by
    :func:`setup_run` before a resume) and whatever the loop adds (``extra``: its data position,
    a KL controller); ``rank_extra`` (state that differs between ranks, such as a sampling
    generator) goes to ``rank-R.json`` per rank.

    A loop calls :meth:`restore` once, after building everything that draws from the global RNG;
    runs its steps inside ``with ckpt.watch():`` (SIGTERM / SIGUSR1 then only set a flag); and
    calls :meth:`end_of_step` after each step's metrics are logged. ``enabled=False`` (a loop that
    cannot checkpoint) restores nothing and lets the signals kill the process.
    """

    def __init__(
        self,
        run: Run,
        model: nn.Module | None,
        optimizer: torch.optim.Optimizer,
        scheduler: Any,
        *,
        save_every: int = 0,
        enabled: bool = True,
    ) -> None:
        self.run, self.model, self.optimizer, self.scheduler = run, model, optimizer, scheduler
        self.save_every, self.enabled = save_every, enabled
        self._preempt: dict[str, bool] = {"flag": False}

    def restore(self) -> dict[str, Any] | None:
        """Load the newest complete checkpoint of ``run_dir`` (model, optimizer, scheduler,
        global RNG) and drop the ``metrics.jsonl`` rows after its step. Returns its ``extra``
        (with ``"step"``, and this rank's ``rank_extra`` under ``"rank_extra"``, None if absent),
        or None for a fresh run."""
        ckpt = distributed.latest_checkpoint(self.run.run_dir) if self.enabled else None
        if ckpt is None:
            return None
        extra = distributed.load_checkpoint(ckpt, self.model, self.optimizer)
        self.scheduler.load_state_dict(extra["scheduler"])
        set_rng_state(extra["rng"])
        extra["step"] = int(extra["step"])
        extra["path"] = ckpt
        self.run.logger.truncate_after(extra["step"])
        log.info("resumed from %s at step %d", ckpt, extra["step"])
        return extra

    def save(
        self,
        step: int,
        extra: dict[str, Any] | None = None,
        rank_extra: dict[str, Any] | None = None,
    ) -> None:
        """Write ``ckpt-<step>`` (collective under a process group)."""
        state = {"step": step, "scheduler": self.scheduler.state_dict(), "rng": rng_state()}
        if self.run.cfg is not None:  # (unit tests drive a Checkpointer without a config)
            state["recipe"] = recipe_of(self.run.cfg)
        distributed.save_checkpoint(
            distributed.checkpoint_path(self.run.run_dir, step),
            self.model,
            self.optimizer,
            {**state, **(extra or {})},
            rank_extra=rank_extra,
        )

    @contextlib.contextmanager
    def watch(self) -> Iterator[None]:
        """Within: SIGTERM / SIGUSR1 set the preemption flag (see :func:`preemption_flag`)."""
        with preemption_flag(self.enabled) as box:
            self._preempt = box
            try:
                yield
            finally:
                self._preempt = {"flag": False}

    def end_of_step(
        self,
        step: int,
        last_step: int,
        state: Any | None = None,
    ) -> None:
        """After step ``step`` (logged): nothing on the last step (the stage saves its model);
        else, if any rank saw a preemption signal, save and raise :class:`Preempted`; else save
        every ``save_every`` steps. ``state() -> (extra, rank_extra)`` supplies the loop's own
        state (called only when a checkpoint is written)."""
        if step >= last_step:
            return
        preempted = distributed.any_rank(self._preempt["flag"])
        if preempted or (self.save_every and step % self.save_every == 0):
            extra, rank_extra = state() if state is not None else (None, None)
            self.save(step, extra, rank_extra)
        if preempted:
            log.warning("preempted: checkpoint at step %d saved; exiting for requeue", step)
            self.run.logger.close()
            raise Preempted(step)


@dataclass
class Run:
    """What a stage needs about its run: where to write, how to log, what it cost, which rank."""

    cfg: Any
    run_dir: Path
    logger: RunLogger
    cost: CostMeter
    device: str
    dist: distributed.ParallelState = field(default_factory=distributed.ParallelState)

    @property
    def is_main(self) -> bool:
        """True on the rank that writes files (rank 0; always true in a single process)."""
        return self.dist.is_main


def _looks_local(path: str) -> bool:
    """Whether a model path names a local file or directory rather than a hub id (``org/name``):
    it starts with ``/``, ``./``, ``../`` or ``~``, exists, has more than one ``/``, or its first
    component exists here (``runs/demo/sft/model`` with ``runs/`` present)."""
    if path.startswith(("/", "./", "../", "~")) or Path(path).exists():
        return True
    return path.count("/") > 1 or ("/" in path and Path(path.split("/")[0]).exists())


def _model_path_problem(key: str, path: str, markers: tuple[str, ...], what: str) -> str | None:
    """Why ``path`` (a value of ``key``) is not a usable model, or None when it may be one."""
    if path.startswith((PKG_PREFIX, PKGPARTS_PREFIX, PKGGGUF_PREFIX)) or not _looks_local(path):
        return None  # installed-package names are resolved (with their own errors) when loaded
    local = Path(path).expanduser()
    if path.endswith(".gguf"):
        return (
            None if local.is_file() else f"{key}={path!r}: expected a GGUF file there; none exists"
        )
    if not local.is_dir():
        return f"{key}={path!r}: expected {what} there; the directory does not exist"
    if not any((local / m).is_file() for m in markers):
        return f"{key}={path!r}: expected {what} there; it holds none of {', '.join(markers)}"
    return None


# the ``data.*`` files each stage reads (DPO / KTO never read ``eval_path``; the demo-data stage
# writes its files, the eval stage reads the prompt files named by its own fields)
_DATA_READ = {
    "sft": ("train_path", "eval_path"),
    "rm": ("train_path", "eval_path"),
    "ppo": ("train_path", "eval_path"),
    "dpo": ("train_path",),
}


def check_paths(cfg: Any) -> None:
    """Check the inputs a stage reads before anything loads: the model, tokenizer and reference
    model (``config.json`` or a LoRA ``adapter_config.json``), PPO's reward model
    (``reward_config.json`` or ``ensemble.json``) and the data files the stage reads (resolved
    against ``data_root`` as the loaders do; ``hf://`` sources are left to the loader). Hub ids
    (``org/name``) and ``pkg:`` / ``pkgparts:`` / ``pkggguf:`` names pass. Raises one
    ``FileNotFoundError`` naming every missing input. The demo-data stage writes its inputs
    (the base model) itself, and the RLAIF data stage copies them, so none of their model paths
    are checked.

    Called at stage start rather than when the config is composed: the pipeline composes every
    stage's config up front, before earlier stages have written the files later ones read."""
    hf_model = "an HF model directory (config.json, or adapter_config.json for LoRA adapters)"
    models: list[tuple[str, str | None]] = []
    model = getattr(cfg, "model", None)
    if model is not None and getattr(cfg, "stage", None) not in ("data", "rlaif_data"):
        models += [("model.path", model.path), ("model.tokenizer_path", model.tokenizer_path)]
    models.append(("ref_path", getattr(cfg, "ref_path", None)))
    if getattr(cfg, "dpo", None) is not None:
        models.append(("dpo.ref_path", cfg.dpo.ref_path))
    if getattr(cfg, "rm", None) is not None:
        models.append(("rm.normalize_policy_path", cfg.rm.normalize_policy_path))
    bad = [
        _model_path_problem(key, str(path), ("config.json", "adapter_config.json"), hf_model)
        for key, path in models
        if path
    ]
    if getattr(cfg, "reward_model_path", None):
        bad.append(
            _model_path_problem(
                "reward_model_path",
                str(cfg.reward_model_path),
                ("reward_config.json", "ensemble.json"),
                "a reward model saved by the RM stage (reward_config.json) or an ensemble "
                "directory (ensemble.json)",
            )
        )
    data = getattr(cfg, "data", None)
    for key in _DATA_READ.get(getattr(cfg, "stage", None), ()) if data is not None else ():
        path = getattr(data, key)
        if not path or str(path).startswith(HUB_PREFIX):
            continue
        resolved = Path(resolve_data_path(path, cfg.data_root))
        if not resolved.is_file():
            bad.append(
                f"data.{key}={path!r}: expected a data file at {resolved} "
                f"(relative paths resolve against data_root={cfg.data_root!r}); none exists"
            )
    bad = [b for b in bad if b]
    if bad:
        raise FileNotFoundError("missing inputs:\n  " + "\n  ".join(bad))


def setup_run(cfg: Any) -> Run:
    """Check the stage's input paths (:func:`check_paths`), start the process group if launched
    distributed, seed, set threads, create ``run_dir``, check a resume's recipe or start over
    (:func:`prepare_run_dir`), save the resolved config and the recipe, open the metrics log and
    the stage's log ``run_dir/<stage>.log`` (the writes on rank 0 only); records are tagged with
    the stage from here on."""
    if is_dataclass(cfg):
        validate(cfg)  # configs built in Python, not through to_object, get the same checks
    check_paths(cfg)  # before run_dir exists and before any model loads
    configure_logging()  # every record names its stage
    quiet_library_bars()
    parallel = getattr(cfg, "parallel", None)
    _, world, _ = distributed.launch_env()
    stage = getattr(cfg, "stage", None)
    if stage not in DISTRIBUTED_STAGES:
        if world > 1:
            raise NotImplementedError(
                f"stage {stage!r} runs in one process (launch it without torchrun/srun tasks); "
                f"distributed training is implemented for {', '.join(DISTRIBUTED_STAGES)}"
            )
        if parallel is not None and (parallel.dp_shard, parallel.tp, parallel.pp) != (1, 1, 1):
            log.warning("stage %r runs in one process: parallel.* is ignored", stage)
        parallel = None
    state = (
        distributed.init_distributed(parallel, cfg.cluster.device, cfg.cluster.backend)
        if parallel is not None
        else distributed.ParallelState(device=cfg.cluster.device)
    )
    if not state.is_main:  # one copy of the run log: rank 0's (others still warn)
        logging.getLogger("rlhfstack").setLevel(logging.WARNING)
    seed_everything(cfg.seed)
    if cfg.cluster.num_threads > 0:
        torch.set_num_threads(cfg.cluster.num_threads)
    device = state.device
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError("cluster.device=cuda but no CUDA device is visible")
    run_dir = Path(cfg.run_dir)
    if stage:
        set_stage(stage)
    resuming, forced = prepare_run_dir(cfg, run_dir, state.is_main)
    if state.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        open_stage_log(stage or "main", run_dir)  # <run_dir>/<stage>.log
        save_resolved_config(cfg, run_dir)
        _write_recipe(run_dir, recipe_of(cfg), resuming, forced)
    logger = RunLogger(
        run_dir,
        tensorboard=cfg.logging.tensorboard,
        wandb=cfg.logging.wandb,
        wandb_mode=cfg.logging.wandb_mode,
        wandb_project=cfg.logging.wandb_project,
        config=asdict(cfg),
        enabled=state.is_main,
    )
    # a fresh run starts a fresh metrics file; a resumed one (a complete ckpt-* in run_dir)
    # keeps it, and the stage drops the rows after the checkpoint (RunLogger.truncate_after)
    if state.is_main and logger.path.exists() and distributed.latest_checkpoint(run_dir) is None:
        logger.path.unlink()
    return Run(cfg=cfg, run_dir=run_dir, logger=logger, cost=CostMeter(), device=device, dist=state)


RECIPE_FILE = "recipe.json"


class RecipeMismatch(RuntimeError):
    """``run_dir`` holds a checkpoint or a finished run written under other settings than this
    run's."""


def finished_run(cfg: Any) -> bool:
    """Whether ``cfg.run_dir`` holds a finished run (``done.json``) to keep: then the command has
    nothing to do. False when there is none, or with ``overwrite=true`` (train again) or
    ``resume=force`` (go on from its newest checkpoint). A finished run recorded (``recipe.json``)
    under other settings raises :class:`RecipeMismatch` listing each differing key, so a changed
    command never passes for a finished one."""
    run_dir = Path(cfg.run_dir)
    if not (run_dir / "done.json").exists():
        return False
    if getattr(cfg, "overwrite", False) or getattr(cfg, "resume", "auto") == "force":
        return False
    old = None
    with contextlib.suppress(ValueError, OSError):
        old = json.loads((run_dir / RECIPE_FILE).read_text()).get("recipe")
    diff = recipe_diff(old, recipe_of(cfg)) if old is not None else {}
    if diff:
        lines = "\n".join(f"  {k}: {a!r} -> {b!r}" for k, (a, b) in diff.items())
        raise RecipeMismatch(
            f"{run_dir} holds a finished run under other settings than this command's:\n{lines}\n"
            "Nothing was changed. Rerun with overwrite=true to train it again under the new "
            "settings, or with another run_dir."
        )
    return True


def prepare_run_dir(
    cfg: Any, run_dir: Path, is_main: bool
) -> tuple[bool, dict[str, tuple[Any, Any]]]:
    """Before anything is written to ``run_dir`` or any model is loaded: with ``overwrite=true``
    delete an earlier run's checkpoints, ``metrics.jsonl`` and ``done.json`` (rank 0; each
    logged); else, when ``run_dir`` holds a checkpoint, compare its recorded recipe with this
    run's and raise :class:`RecipeMismatch` listing each differing key (old -> new), unless
    ``resume=force``. A checkpoint in the old pickled format raises
    ``distributed.CheckpointFormatError``. Returns ``(resuming, differences)``: whether a
    checkpoint will be resumed, and the differences accepted by ``resume=force``."""
    resume, overwrite = getattr(cfg, "resume", "auto"), getattr(cfg, "overwrite", False)
    if overwrite:
        if is_main:
            _start_over(run_dir)
        distributed.barrier()  # no rank looks for checkpoints before rank 0 has deleted them
        return False, {}
    ckpt = distributed.latest_checkpoint(run_dir)
    if ckpt is None:
        return False, {}
    old = distributed.read_checkpoint_extra(ckpt).get("recipe")
    diff = recipe_diff(old or {}, recipe_of(cfg)) if old is not None else {"<recipe>": (None, "")}
    if not diff:
        return True, {}
    if old is None:
        what = f"{ckpt} records no recipe, so it cannot be checked against this run's settings"
    else:
        lines = "\n".join(f"  {k}: {a!r} -> {b!r}" for k, (a, b) in diff.items())
        what = f"{ckpt} was written under other settings than this run's:\n{lines}"
    if resume != "force":
        raise RecipeMismatch(
            f"{what}\nNothing was loaded or overwritten. Rerun with resume=force to resume from "
            "this checkpoint under the new settings (recorded in config.yaml and recipe.json), "
            "with overwrite=true to delete its checkpoints and metrics and start over, or with "
            "another run_dir."
        )
    log.warning("resume=force: resuming anyway. %s", what)
    return True, diff


def _start_over(run_dir: Path) -> None:
    """``overwrite=true``: delete what would make this run resume or look finished."""
    doomed = [
        *sorted(run_dir.glob("ckpt-*")),
        *sorted(run_dir.glob(".ckpt-*")),  # .partial / .old leftovers of an interrupted save
        run_dir / "metrics.jsonl",
        run_dir / "done.json",
    ]
    for path in doomed:
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()
        else:
            continue
        log.warning("overwrite=true: deleted %s", path)


def _write_recipe(
    run_dir: Path, recipe: dict[str, Any], resuming: bool, forced: dict[str, tuple[Any, Any]]
) -> None:
    """``run_dir/recipe.json``: this run's recipe and its hash, and the history of forced resumes
    (``resume=force``: the keys that changed, old -> new), kept while the run is resumed."""
    path = run_dir / RECIPE_FILE
    history: list[Any] = []
    if resuming and path.exists():
        with contextlib.suppress(ValueError, OSError):
            history = json.loads(path.read_text()).get("forced_resumes", [])
    if forced:
        history.append({"changed": {k: list(v) for k, v in forced.items()}})
    body = {"hash": recipe_hash(recipe), "recipe": recipe, "forced_resumes": history}
    atomic_write_text(path, json.dumps(body, indent=1) + "\n")


def build_optimizer(params: Iterable[nn.Parameter], tcfg: Any) -> torch.optim.Optimizer:
    """AdamW with the trainer's lr, betas, eps and weight decay."""
    return torch.optim.AdamW(
        [p for p in params if p.requires_grad],
        lr=tcfg.lr,
        betas=tuple(tcfg.adam_betas),
        eps=tcfg.adam_eps,
        weight_decay=tcfg.weight_decay,
    )


def build_scheduler(
    opt: torch.optim.Optimizer, tcfg: Any, total_steps: int
) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up, then linear (to 0), cosine (to 10%) or constant."""
    warm = max(0, int(tcfg.warmup_steps))
    total = max(1, int(total_steps))
    kind = tcfg.lr_schedule
    if kind not in ("linear", "cosine", "constant"):
        raise ValueError(
            f"trainer.lr_schedule: unknown schedule {kind!r} (linear | cosine | constant)"
        )

    def factor(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        frac = min(1.0, (step - warm) / max(1, total - warm))
        if kind == "linear":
            return max(0.0, 1.0 - frac)
        if kind == "cosine":
            return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac))
        return 1.0

    return torch.optim.lr_scheduler.LambdaLR(opt, factor)


def shared_prompt_pad(
    enabled: bool,
    pad_id: int,
    items: Iterable[dict[str, list[int]]],
    state: distributed.ParallelState,
) -> int | None:
    """The ``pad_id`` that turns on a stage's shared-prompt pair pass, or None for the plain one.

    In one process the pass falls back to the plain one batch by batch (where a pair's prompts
    differ). Under several processes every rank must run the same number of trunk calls (the
    shared pass makes two per micro-batch, each an FSDP2 all-gather), so the choice is made once
    for the whole data set: on only if no pair of ``items`` would fall back (``items`` must be the
    same on every rank), and only under FSDP2 data parallelism (tensor / pipeline parallel runs
    use the plain pass).
    """
    if not enabled:
        return None
    if not state.distributed:
        return pad_id
    if state.tp > 1 or state.pp > 1:
        log.info("shared-prompt pass off: tensor / pipeline parallel runs use the plain pass")
        return None
    if not pairs_share_prompts(items):
        log.info("shared-prompt pass off: some pairs' chosen and rejected prompts differ")
        return None
    log.info("shared-prompt pass on under FSDP2: every pair's chosen and rejected share a prompt")
    return pad_id


def load_policy(cfg: Any, run: Run) -> nn.Module:
    """The causal LM a stage trains: ``model.path`` in ``model.dtype`` on the run's device, with
    LoRA adapters when ``model.lora.enabled`` and activation checkpointing when
    ``model.activation_checkpointing``."""
    return load_causal_lm(
        cfg.model.path,
        dtype=cfg.model.dtype,
        lora=cfg.model.lora,
        activation_checkpointing=cfg.model.activation_checkpointing,
        device=run.device,
    )


def data_load_kwargs(cfg: Any, tokenizer: Any = None) -> dict[str, Any]:
    """Keyword arguments of the ``rlhfstack.data.loading`` loaders from ``cfg.data`` and
    ``cfg.data_root``: adapter, template, on_error, data_root; with ``tokenizer`` also the length
    filter (``tokenizer``, ``data.max_prompt_tokens``, ``data.max_response_tokens``)."""
    kwargs: dict[str, Any] = dict(
        adapter=cfg.data.adapter,
        template=cfg.data.template,
        on_error=cfg.data.on_error,
        data_root=cfg.data_root,
    )
    if tokenizer is not None:
        kwargs.update(
            tokenizer=tokenizer,
            max_prompt_tokens=cfg.data.max_prompt_tokens,
            max_response_tokens=cfg.data.max_response_tokens,
        )
    return kwargs


def load_train_eval(
    loader: Callable[..., tuple[list[Any], LoadReport]],
    cfg: Any,
    label: str,
    *,
    tokenizer: Any = None,
    with_eval: bool = True,
    holdout: bool = False,
) -> tuple[list[Any], list[Any]]:
    """A stage's ``(train, eval)`` examples, read by ``loader`` (``load_sft``, ``load_preferences``,
    ``load_unpaired``, ``load_prompts``) with :func:`data_load_kwargs`.

    Train: ``data.train_path``, length-filtered when ``tokenizer`` is given. Eval (only with
    ``with_eval``, else ``[]``): ``data.eval_path``, never length-filtered; when it is unset,
    ``[]``, or with ``holdout`` a seeded ``data.validation_fraction`` of the training examples
    (at least one), taken out of train. Train is then cut to its first ``data.max_examples`` when
    that is set (after the hold-out, so the validation set does not depend on it). Each file's
    :class:`LoadReport` is logged under ``label``.
    """
    train, report = loader(cfg.data.train_path, **data_load_kwargs(cfg, tokenizer))
    log.info("%s data: %s", label, report.summary())
    held: list[Any] = []
    if with_eval and cfg.data.eval_path:
        held, eval_report = loader(cfg.data.eval_path, **data_load_kwargs(cfg))
        log.info("%s validation data: %s", label, eval_report.summary())
    elif with_eval and holdout:
        perm = np.random.default_rng(cfg.seed).permutation(len(train))
        n_val = max(1, int(round(cfg.data.validation_fraction * len(train))))
        held = [train[i] for i in perm[:n_val]]
        train = [train[i] for i in perm[n_val:]]
    if cfg.data.max_examples:
        train = train[: cfg.data.max_examples]
    return train, held


def refresh_dashboard(run: Run, panels: Sequence[Panel] = TRAINING_PANELS) -> Path | None:
    """Redraw ``run_dir/dashboard.png`` from ``metrics.jsonl`` (rank 0, when ``logging.plots``);
    called at every evaluation and at the end of a stage. A drawing failure is logged, never
    raised: the picture must not cost the run."""
    if not (run.is_main and run.cfg.logging.plots):
        return None
    try:
        return write_dashboard(run.run_dir, panels, title=str(run.run_dir))
    except Exception as err:  # matplotlib's errors have no common base class
        log.warning("dashboard not drawn: %s: %s", type(err).__name__, err)
        return None


def finish_stage(
    run: Run,
    stage: str,
    steps: int,
    *,
    model: nn.Module | None = None,
    tokenizer: Any = None,
    dashboard: Sequence[Panel] = TRAINING_PANELS,
    **done_info: Any,
) -> Path:
    """End a stage: ``model`` (when given) in eval mode saved with ``tokenizer`` to
    ``run_dir/model`` in HF format (with its model card, ``model/README.md``), the metrics log
    closed, the ``dashboard`` panels drawn into ``run_dir/dashboard.png`` when ``logging.plots``,
    then ``run_dir/done.json`` (stage, steps, cost summary, ``done_info``), written last because it
    marks the stage finished; the summary block (:func:`log_stage_summary`) is logged and the
    stage's log closed. Returns ``run_dir``."""
    if model is not None:
        model.eval()
        save_hf(model, tokenizer, run.run_dir / "model")
        write_stage_card(run.cfg, stage, steps, run.run_dir / "model")
    run.logger.close()
    refresh_dashboard(run, dashboard)
    cost = run.cost.summary()
    write_stage_done(run.run_dir, {"stage": stage, "steps": steps, "cost": cost, **done_info})
    log_stage_summary(stage, run.run_dir, steps=steps, cost=cost)
    close_stage_log()
    return run.run_dir


STAGE_CARDS = {
    "sft": ("Supervised fine-tuned policy", "A causal LM fine-tuned on demonstrations (SFT)."),
    "dpo": ("DPO policy", "A causal LM trained on preference pairs with a direct preference loss."),
    "ppo": ("PPO policy", "A causal LM trained with PPO against a reward model (RLHF)."),
    "rm": ("Reward model", "A Bradley-Terry reward model: one scalar score per sequence."),
}
"""Title and one-line description of each stage's model card."""

# the hyperparameter groups a card lists, by stage (the stage's own group and the trainer's)
_CARD_TRAINER_KEYS = (
    "max_steps", "batch_size", "micro_batch_size", "lr", "lr_schedule", "warmup_steps",
    "weight_decay", "grad_clip",
)  # fmt: skip


def _plain(obj: Any) -> Any:
    if is_dataclass(obj):
        return asdict(obj)
    if isinstance(obj, DictConfig):
        return OmegaConf.to_container(obj, resolve=True)
    return obj


def _hub_id(path: str | None) -> str | None:
    if path and path.startswith(HUB_PREFIX):
        return path[len(HUB_PREFIX) :].split(":")[0]
    return path


def stage_card(cfg: Any, stage: str, steps: int) -> dict[str, Any]:
    """The model-card arguments (:func:`rlhfstack.models.card.render_card`) of a stage's model:
    base model, data, and a "Training" section (seed, steps, the trainer's and the stage's
    hyperparameters)."""
    trainer = _plain(cfg.trainer)
    hyper: dict[str, Any] = {"stage": stage, "steps": steps, "seed": cfg.seed}
    hyper.update({k: trainer[k] for k in _CARD_TRAINER_KEYS if k in trainer})
    group = _plain(getattr(cfg, stage, None))
    if isinstance(group, dict):
        hyper.update(
            {f"{stage}.{k}": v for k, v in group.items() if isinstance(v, (str, int, float, bool))}
        )
    title, description = STAGE_CARDS.get(stage, (f"{stage} model", ""))
    return {
        "title": title,
        "description": description,
        "base_model": cfg.model.path,
        "datasets": [_hub_id(p) for p in (cfg.data.train_path, cfg.data.eval_path) if p],
        "tags": ["rlhf", stage],
        "pipeline_tag": "text-generation",
        "sections": {"Training": hyper},
    }


def write_stage_card(cfg: Any, stage: str, steps: int, out_dir: Path, **card: Any) -> Path:
    """Write ``out_dir/README.md``, the model card of a stage's exported model
    (:func:`stage_card`; ``card`` adds to or replaces its arguments)."""
    return write_card(out_dir, **{**stage_card(cfg, stage, steps), **card})


#: the metrics a stage's summary quotes (their last logged values), besides every ``val/*`` and
#: ``eval/*`` metric
HEADLINE_METRICS = {
    "sft": ("loss",),
    "rm": ("loss", "accuracy"),
    "dpo": ("loss", "reward_accuracy", "reward_margin"),
    "ppo": ("reward/rm_score", "kl/seq_k1", "kl/beta", "response/length"),
    "cai_sl": ("revisions", "revised_fraction"),
    "ai_labels": ("pairs", "order_disagreement"),
}


def headline_metrics(stage: str, metrics_path: Path) -> dict[str, float]:
    """The last logged value of each of the stage's :data:`HEADLINE_METRICS` and of every
    ``val/*`` / ``eval/*`` metric in ``metrics_path`` (empty when the file is missing)."""
    if not metrics_path.exists():
        return {}
    last: dict[str, float] = {}
    for row in read_jsonl(metrics_path):
        for k, v in row.items():
            if isinstance(v, (int, float)) and not isinstance(v, bool) and k != "step":
                last[k] = v
    keys = [k for k in HEADLINE_METRICS.get(stage, ("loss",)) if k in last]
    keys += [k for k in last if k.startswith(("val/", "eval/")) and k not in keys]
    return {k: last[k] for k in keys}


def stage_summary(
    stage: str,
    run_dir: Path,
    *,
    steps: int | None = None,
    cost: dict[str, float] | None = None,
    model_dir: Path | None = None,
    headline: dict[str, float] | None = None,
) -> list[str]:
    """The lines of a stage's closing block: where its model, metrics, plots and log are; its
    steps; wall and CPU time (and tokens); its headline metrics (by default
    :func:`headline_metrics`). Only the outputs that exist are named; ``model_dir`` defaults
    to ``run_dir/model``."""
    run_dir = Path(run_dir)
    cost = cost or {}
    head = f"== {stage} done"
    if steps is not None:
        head += f": {steps} steps"
    if cost:
        head += (
            f" in {format_duration(cost.get('wall_seconds', float('nan')))} "
            f"(CPU {format_duration(cost.get('cpu_seconds', float('nan')))}"
            + (f", {cost['tokens']:,} tokens" if cost.get("tokens") else "")
            + ")"
        )
    lines = [head]

    def where(label: str, path: Path, extra: str = "") -> None:
        if path.exists():
            lines.append(f"   {label:<8} {path}{extra}")

    where("run_dir", run_dir)
    where("model", Path(model_dir) if model_dir is not None else run_dir / "model")
    tb = run_dir / "tb"
    where("metrics", run_dir / "metrics.jsonl", f" (TensorBoard: {tb})" if tb.exists() else "")
    where("plots", run_dir / DASHBOARD_FILE)
    where("log", run_dir / f"{stage}.log")
    metrics = headline_metrics(stage, run_dir / "metrics.jsonl") if headline is None else headline
    if metrics:
        shown = ", ".join(f"{k} {v:.4g}" for k, v in metrics.items())
        lines.append(f"   {'final':<8} {shown}")
    return lines


def log_stage_summary(stage: str, run_dir: Path, **kwargs: Any) -> None:
    """Log :func:`stage_summary`'s lines, one record each (each names the stage)."""
    for line in stage_summary(stage, run_dir, **kwargs):
        log.info("%s", line)


def micro_batches(batch: dict[str, torch.Tensor], micro: int) -> Iterator[dict[str, torch.Tensor]]:
    """Split a dict of equally-sized tensors along dim 0."""
    n = next(iter(batch.values())).shape[0]
    for i in range(0, n, micro):
        yield {k: v[i : i + micro] for k, v in batch.items()}


def clip_grad(params: Iterable[nn.Parameter], max_norm: float) -> float:
    """Clip the global gradient norm (0 disables); returns the pre-clip norm."""
    params = [p for p in params if p.grad is not None]
    if not params:
        return 0.0
    if max_norm and max_norm > 0:
        return float(torch.nn.utils.clip_grad_norm_(params, max_norm))
    return float(torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in params])))


def epoch_batches(n: int, batch_size: int, generator: torch.Generator) -> Iterator[list[int]]:
    """Shuffled index batches over ``n`` examples, repeating epochs forever (last partial batch dropped
    unless it is the only one)."""
    while True:
        perm = torch.randperm(n, generator=generator).tolist()
        full = n // batch_size
        if full == 0:
            yield perm
            continue
        for i in range(full):
            yield perm[i * batch_size : (i + 1) * batch_size]


def to_device(batch: dict[str, torch.Tensor], device: str) -> dict[str, torch.Tensor]:
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def train_loop(
    run: Run,
    *,
    params: list[nn.Parameter],
    items: list[Any],
    collate: Any,
    loss_fn: Any,
    max_steps: int,
    epochs: int = 1,
    eval_fn: Any | None = None,
    tokens_fn: Any | None = None,
    model: nn.Module | None = None,
) -> int:
    """The supervised loop shared by SFT, RM and DPO.

    ``collate(list_of_items) -> batch dict``; ``loss_fn(micro_batch, n_in_step) -> (loss, stats)``
    where the loss is already divided by the number of sequences in the whole step (so micro-batch
    gradients add up to the step's mean). ``max_steps == 0`` means ``epochs`` passes over ``items``.
    Returns the number of optimizer steps taken.

    ``model``: the module ``loss_fn`` runs (``params`` are some of its parameters). Required
    for distributed runs, for ``parallel.mixed_precision`` and for checkpoints; it is sharded /
    split in place (``distributed.DistributedModel``). Every rank draws the same global batch, collates
    it the same way (so counts such as SFT's ``step_tokens`` are global) and takes its
    data-parallel slice; ``n_in_step`` stays the global batch size, so gradients summed over ranks
    equal the one-process gradients. After the last step the trained model is gathered back into
    ``model`` on rank 0, and the other ranks exit: only rank 0 returns from this function.
    Intermediate evaluations (``trainer.eval_every``) are skipped under pipeline parallelism.

    Checkpoints and resume: every ``trainer.save_every`` steps, and when SIGTERM / SIGUSR1
    arrives (then the process exits with status 0, ``Preempted``), ``run_dir/ckpt-NNNNNN/``
    receives the trainable parameters and optimizer state (``torch.distributed.checkpoint``,
    sharded as trained), the LR schedule, RNG states and the step. When ``run_dir`` holds one,
    the same command resumes from the newest: the batch index stream is replayed to the step,
    and ``metrics.jsonl`` rows after it are dropped, so a resumed run logs what an uninterrupted
    one would.
    """
    cfg = run.cfg
    tcfg = cfg.trainer
    state = run.dist
    mixed = getattr(getattr(cfg, "parallel", None), "mixed_precision", "none")
    bs = min(tcfg.batch_size, len(items))
    steps = max_steps if max_steps > 0 else max(1, epochs * (len(items) // bs))
    # under pipeline parallelism each stage writes the weights and optimizer state it trains
    can_ckpt = model is not None
    if tcfg.save_every and not can_ckpt:
        raise NotImplementedError("trainer.save_every: checkpoints need model=")
    dm: distributed.DistributedModel | None = None
    if state.distributed or mixed != "none":
        if model is None:
            raise ValueError(
                "train_loop: distributed / mixed-precision runs need model= (the module loss_fn uses)"
            )
        if bs % state.dp:
            raise ValueError(
                f"trainer.batch_size={bs} (global) must be divisible by parallel.dp_shard={state.dp}"
            )
        tied = getattr(getattr(cfg, "parallel", None), "pp_tied_grads", "micro_batch")
        dm = distributed.DistributedModel(model, params, state, mixed, tied)
        params = dm.params
    opt = build_optimizer(params, tcfg)
    sched = build_scheduler(opt, tcfg, steps)
    gen = torch.Generator().manual_seed(cfg.seed)
    batches = epoch_batches(len(items), bs, gen)
    micro = max(1, min(tcfg.micro_batch_size, bs // state.dp))
    warned_eval = False

    ckpt = Checkpointer(run, model, opt, sched, save_every=tcfg.save_every, enabled=can_ckpt)
    guard = FiniteGuard(run)
    resumed = ckpt.restore()
    start = resumed["step"] if resumed is not None else 0
    for _ in range(start):  # the data position: replay the index stream (indices only)
        next(batches)

    bar = Progress(
        steps, "step", unit="step", every=tcfg.log_every, initial=start, enabled=run.is_main
    )
    with ckpt.watch(), bar:
        for step in range(start + 1, steps + 1):
            idx = next(batches)
            batch = to_device(collate([items[i] for i in idx]), run.device)
            opt.zero_grad(set_to_none=True)
            agg: dict[str, float] = {}
            if dm is None:
                for mb in micro_batches(batch, micro):
                    loss, stats = loss_fn(mb, len(idx))
                    loss.backward()
                    n_mb = next(iter(mb.values())).shape[0]
                    agg["loss"] = agg.get("loss", 0.0) + float(loss.detach())
                    for k, v in stats.items():
                        agg[k] = agg.get(k, 0.0) + float(v) * n_mb / len(idx)
                agg["grad_norm"] = clip_grad(params, tcfg.grad_clip)
            else:
                local = distributed.shard_batch(batch, state.dp_rank, state.dp)
                loss_sum, stats = dm.forward_backward(local, loss_fn, len(idx), micro)
                agg = {"loss": loss_sum, **stats}
                agg["grad_norm"] = dm.clip_grad(tcfg.grad_clip)
            # before the update: a non-finite loss or gradient must not reach the weights
            guard.check(step, agg)
            if tokens_fn is not None:
                run.cost.add_tokens(tokens_fn(batch))
            opt.step()
            sched.step()
            agg["lr"] = sched.get_last_lr()[0]
            evaluated = False
            if (
                eval_fn is not None
                and tcfg.eval_every
                and step % tcfg.eval_every == 0
                and step < steps
            ):
                evaluated = dm is None or dm.can_evaluate
                if dm is None:
                    agg.update(guard.checked(step, eval_fn(), "evaluation"))
                elif dm.can_evaluate:
                    agg.update(guard.checked(step, dm.call(eval_fn), "evaluation"))
                elif not warned_eval:
                    log.warning(
                        "trainer.eval_every: skipped under pipeline parallelism "
                        "(final evaluation still runs)"
                    )
                    warned_eval = True
            if step == steps and dm is not None:
                dm.finalize()  # rank 0 now holds the full, plain model; the other ranks exit here
            if step == steps and eval_fn is not None:  # rank 0 alone: a local check
                final = eval_fn() if dm is None else dm.call(eval_fn)
                agg.update(guard.checked(step, final, "final evaluation", collective=False))
            # a metrics row every trainer.log_every steps, at the last, and with an evaluation
            if step % tcfg.log_every == 0 or step == steps or evaluated:
                run.logger.log(step, agg)
            if tcfg.eval_every and step % tcfg.eval_every == 0 and step < steps:
                refresh_dashboard(run)  # the last step's is drawn by finish_stage
            guard.passed(step, agg)
            # the log line (rate, ETA) on the same steps: Progress(every=trainer.log_every)
            bar.update(loss=agg["loss"], **{k: v for k, v in agg.items() if k.startswith("val/")})
            if step == steps:
                break
            ckpt.end_of_step(step, steps)
    return steps
