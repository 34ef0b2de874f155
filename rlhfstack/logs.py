"""Log records that name their stage, one log file per stage, and background stages' records.

Every record that reaches a handler configured here carries ``record.stage`` (``sft``, ``rm``,
``dpo``, ``ppo``, ``data``, ``eval``, ``pipeline`` ...), records of library loggers
(transformers, datasets, ...) included, and the format shows it::

    [2026-12-06 12:36:02,799][sft][rlhfstack][INFO] - step 20/150 loss 1.6196 [...]

The tag is the process's *current stage* (:func:`set_stage`, :func:`stage_context`), unless the
record already carries one: records that a background stage's process sends through a queue
(:func:`log_to_queue`) keep the tag they were given there, so the pipeline's log shows them as
theirs while another stage runs in the foreground.

:func:`open_stage_log` adds ``<run_dir>/<stage>.log`` (every record of the process while the stage
runs); the pipeline's own log (Hydra's ``pipeline.log``) receives every stage's records, those of
background stages through :func:`forward_from_children`.
"""

from __future__ import annotations

import contextlib
import logging
import logging.handlers
import multiprocessing as mp
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

#: the format of every handler configured here (Hydra's, with the stage after the time)
STAGE_FORMAT = "[%(asctime)s][%(stage)s][%(name)s][%(levelname)s] - %(message)s"

#: the tag of records logged outside any stage (set to ``pipeline`` by the pipeline)
DEFAULT_STAGE = "main"

_current: dict[str, Any] = {"stage": None, "default": DEFAULT_STAGE, "file": None}


def current_stage() -> str:
    """The tag records get now: the stage set by :func:`set_stage`, else the process default."""
    return _current["stage"] or _current["default"]


def set_stage(stage: str | None) -> str | None:
    """Tag this process's records with ``stage`` from now on (None: the default); returns the
    previous stage, for :func:`stage_context`."""
    previous = _current["stage"]
    _current["stage"] = stage
    return previous


def set_default_stage(name: str) -> None:
    """The tag of records logged outside any stage (e.g. ``pipeline``)."""
    _current["default"] = name


def tag_job(name: str) -> None:
    """An evaluation job (``winrate``, ``rm_eval`` ...) names its records: handlers configured,
    and ``name`` is the default tag unless a pipeline or an enclosing job set one already."""
    configure_logging()
    if _current["default"] == DEFAULT_STAGE:
        set_default_stage(name)


@contextlib.contextmanager
def stage_context(stage: str) -> Iterator[None]:
    """Records logged inside the block are tagged ``stage`` (handlers configured first)."""
    configure_logging()
    previous = set_stage(stage)
    try:
        yield
    finally:
        set_stage(previous)


class StageFilter(logging.Filter):
    """Gives a record without a stage tag ``stage`` (fixed) or the process's current stage."""

    def __init__(self, stage: str | None = None) -> None:
        super().__init__()
        self.stage = stage

    def filter(self, record: logging.LogRecord) -> bool:
        if not getattr(record, "stage", None):
            record.stage = self.stage or current_stage()
        return True


class StageFormatter(logging.Formatter):
    """:data:`STAGE_FORMAT`; a record that reached the handler without a tag (a handler that
    another library built, e.g. tqdm's logging redirect) gets the current stage."""

    def __init__(self, fmt: str = STAGE_FORMAT, datefmt: str | None = None) -> None:
        super().__init__(fmt, datefmt)

    def format(self, record: logging.LogRecord) -> str:
        if not getattr(record, "stage", None):
            record.stage = current_stage()
        return super().format(record)


def _tag(handler: logging.Handler) -> None:
    if not any(isinstance(f, StageFilter) for f in handler.filters):
        handler.addFilter(StageFilter())
    if not isinstance(handler.formatter, StageFormatter) and not isinstance(
        handler, logging.handlers.QueueHandler
    ):
        datefmt = handler.formatter.datefmt if handler.formatter is not None else None
        handler.setFormatter(StageFormatter(datefmt=datefmt))


def configure_logging(level: int = logging.INFO) -> None:
    """Make every root handler tag records with their stage: a console handler at ``level`` when
    the root has none (Hydra's handlers when a recipe runs), then each handler gets a
    :class:`StageFilter` and the :data:`STAGE_FORMAT` format (its date format kept). The
    ``rlhfstack`` logger gets ``level`` unless it has one; transformers' records (when it is
    imported) go to the root's handlers rather than its own, and so do Python warnings."""
    root = logging.getLogger()
    if not root.handlers:
        logging.basicConfig(level=level)
    for handler in root.handlers:
        _tag(handler)
    # transformers prints through a handler of its own and stops its records at its logger:
    # routed to the root instead, they get the stage tag and reach the stage's and pipeline's logs
    hf_logging = sys.modules.get("transformers.utils.logging")
    if hf_logging is not None:
        hf_logging.disable_default_handler()
        hf_logging.enable_propagation()
    logging.captureWarnings(True)  # Python warnings too: tagged, and in the log files
    package = logging.getLogger("rlhfstack")
    if package.level == logging.NOTSET:  # the project's records pass a root left at WARNING
        package.setLevel(level)


def open_stage_log(stage: str, run_dir: str | os.PathLike) -> Path:
    """Tag records with ``stage`` and append every record of this process to
    ``<run_dir>/<stage>.log`` until :func:`close_stage_log` (or the next stage's log) closes it.
    Returns the log's path."""
    configure_logging()
    close_stage_log()
    path = Path(run_dir) / f"{stage}.log"
    path.parent.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(path, mode="a", encoding="utf-8")
    handler.setLevel(logging.INFO)
    handler.setFormatter(StageFormatter())
    handler.addFilter(StageFilter())
    _current["file"] = handler  # first: forward_from_children's thread must skip it at once
    logging.getLogger().addHandler(handler)
    set_stage(stage)
    return path


def stage_log_path() -> Path | None:
    """The open stage log's path (None when none is open)."""
    handler = _current["file"]
    return Path(handler.baseFilename) if handler is not None else None


def close_stage_log() -> None:
    """Close the stage log that :func:`open_stage_log` opened (nothing when none is open)."""
    handler = _current["file"]
    if handler is None:
        return
    logging.getLogger().removeHandler(handler)
    handler.close()
    _current["file"] = None


# ----------------------------------------------------------------------------- background stages


def log_to_queue(queue: Any, stage: str, level: int = logging.INFO) -> None:
    """In a background stage's process: every record of the process, tagged ``stage``, goes to
    ``queue`` (the parent's :func:`forward_from_children` writes it to the parent's handlers,
    the pipeline's log among them); the process's own handlers are removed."""
    root = logging.getLogger()
    for handler in list(root.handlers):
        root.removeHandler(handler)
    handler = logging.handlers.QueueHandler(queue)
    handler.addFilter(StageFilter(stage))
    root.addHandler(handler)
    root.setLevel(level)
    set_default_stage(stage)
    set_stage(stage)


class _ToRootHandlers(logging.Handler):
    """Hands a record to the root's handlers of the moment, except the open stage log (it
    belongs to the stage running in this process): a console handler that a progress bar
    swapped for its own (records printed above the bar) is the one used."""

    def emit(self, record: logging.LogRecord) -> None:
        for handler in list(logging.getLogger().handlers):
            if handler is not _current["file"] and record.levelno >= handler.level:
                handler.handle(record)


@contextlib.contextmanager
def forward_from_children() -> Iterator[Any]:
    """A queue for :func:`log_to_queue` in spawned processes; while the block runs, a listener
    thread hands each record to this process's root handlers (not a stage's own log file, which
    belongs to the stage running here). On exit the records still queued are written first."""
    configure_logging()
    queue = mp.get_context("spawn").Queue()
    listener = logging.handlers.QueueListener(queue, _ToRootHandlers())
    listener.start()
    try:
        yield queue
    finally:
        listener.stop()
        queue.close()
        queue.join_thread()
