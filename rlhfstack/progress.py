"""Progress of long loops: done/total, rate and ETA, as a bar on a terminal and as log lines.

One helper for every long loop (training steps, PPO iterations, sampling and labeling,
generation, judge requests)::

    with Progress(total=steps, desc="step", unit="step", every=log_every) as bar:
        for step in ...:
            bar.update(loss=loss)

Log lines (``step 20/150 loss 1.6196 [13%, 5.21 step/s, elapsed 0:04, ETA 0:25]``) go to the
``rlhfstack.progress`` logger, so they reach the console, the stage's log and the pipeline's log
with the stage's tag: one every ``every`` updates and at the end when ``every`` is given, else at
most one per ``interval`` seconds (and a last one when any was written). On a terminal (stderr is
a TTY) a tqdm bar with rate and ETA is shown as well, and log records printed meanwhile go above
it. ``RLHF_PROGRESS=lines`` turns the bar off (``bar`` forces it); background stages of the
pipeline never draw one (:func:`set_mode`).
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import sys
import time
from collections.abc import Iterable, Iterator
from typing import Any, TypeVar

T = TypeVar("T")

log = logging.getLogger("rlhfstack.progress")

#: seconds between two log lines of a loop without ``every``
DEFAULT_INTERVAL = 10.0

_mode: dict[str, str | None] = {"forced": None}

#: the clock of rates and intervals (a module attribute so that tests can drive it)
_now = time.perf_counter


def set_mode(mode: str | None) -> None:
    """``"lines"`` (no bar), ``"bar"`` (a bar even when stderr is not a terminal) or None (the
    environment's ``RLHF_PROGRESS``, else a bar exactly when stderr is a terminal)."""
    if mode not in (None, "bar", "lines"):
        raise ValueError(f"progress mode: expected 'bar', 'lines' or None, got {mode!r}")
    _mode["forced"] = mode


def bar_wanted() -> bool:
    """Whether a progress bar is drawn (see :func:`set_mode`)."""
    mode = _mode["forced"] or os.environ.get("RLHF_PROGRESS", "auto").strip().lower()
    if mode == "bar":
        return True
    if mode == "lines":
        return False
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):  # closed or replaced stderr
        return False


def quiet_library_bars() -> None:
    """Without a bar of ours (:func:`bar_wanted` false), turn off the tqdm bars of transformers
    and huggingface_hub (loading and saving weights): off a terminal their carriage-return
    updates only fill CI and SLURM logs."""
    if bar_wanted():
        return
    with contextlib.suppress(ImportError):
        import huggingface_hub.utils

        huggingface_hub.utils.disable_progress_bars()
    with contextlib.suppress(ImportError):
        import transformers.utils.logging

        transformers.utils.logging.disable_progress_bar()


def format_duration(seconds: float) -> str:
    """``0:04``, ``12:30``, ``1:02:03``; ``?`` when unknown."""
    if seconds is None or not math.isfinite(seconds) or seconds < 0:
        return "?"
    s = int(round(seconds))
    h, rem = divmod(s, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


def format_rate(per_second: float, unit: str) -> str:
    """``5.21 step/s``, or ``3.4 s/step`` below one per second."""
    if per_second <= 0 or not math.isfinite(per_second):
        return f"? {unit}/s"
    if per_second >= 100:  # no exponent: ``1234 step/s``, not ``1.23e+03 step/s``
        return f"{per_second:.0f} {unit}/s"
    if per_second >= 1:
        return f"{per_second:.3g} {unit}/s"
    seconds = 1 / per_second
    return f"{seconds:.0f} s/{unit}" if seconds >= 100 else f"{seconds:.3g} s/{unit}"


def _fmt_value(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4f}" if v == 0 or (math.isfinite(v) and abs(v) >= 1e-3) else f"{v:.3g}"
    return str(v)


class Progress:
    """Progress of a loop of ``total`` updates (see the module's docstring).

    ``desc``: what is counted, first word of each line (``step``, ``sample``, ``judgment``);
    ``unit``: the rate's unit; ``initial``: updates already done (a resumed run: the rate counts
    only this run's); ``every``: a line every N updates (None: by time, every ``interval``
    seconds, default :data:`DEFAULT_INTERVAL`); ``enabled``: False draws and logs nothing (ranks
    other than 0)."""

    def __init__(
        self,
        total: int,
        desc: str,
        *,
        unit: str = "it",
        every: int | None = None,
        interval: float | None = None,
        initial: int = 0,
        enabled: bool = True,
        logger: logging.Logger | None = None,
    ) -> None:
        self.total, self.desc, self.unit = int(total), desc, unit
        self.every = every
        self.interval = DEFAULT_INTERVAL if interval is None else interval
        self.done = self.initial = int(initial)
        self.enabled = enabled
        self.log = logger or log
        self.postfix: dict[str, Any] = {}
        self.lines = 0
        self._t0 = self._last_line = _now()
        self._bar = None
        self._redirect: contextlib.ExitStack | None = None
        if enabled and total > 0 and bar_wanted():
            self._open_bar()

    def _open_bar(self) -> None:
        from tqdm import tqdm
        from tqdm.contrib.logging import logging_redirect_tqdm

        self._redirect = contextlib.ExitStack()
        # records printed while the bar is drawn go above it, not through it
        self._redirect.enter_context(logging_redirect_tqdm())
        self._bar = tqdm(
            total=self.total,
            initial=self.initial,
            desc=self.desc,
            unit=self.unit,
            dynamic_ncols=True,
            leave=False,
            file=sys.stderr,
        )

    # ------------------------------------------------------------------ numbers

    @property
    def elapsed(self) -> float:
        return _now() - self._t0

    @property
    def rate(self) -> float:
        """Updates per second since this run started (0 before the first)."""
        t = self.elapsed
        return (self.done - self.initial) / t if t > 0 else 0.0

    @property
    def eta(self) -> float:
        """Seconds left at the current rate (inf before the first update)."""
        r = self.rate
        return (self.total - self.done) / r if r > 0 else math.inf

    def line(self) -> str:
        """``desc done/total k v ... [pct%, rate, elapsed, ETA]``."""
        pct = 100.0 * self.done / self.total if self.total else 100.0
        stats = "".join(f" {k} {_fmt_value(v)}" for k, v in self.postfix.items())
        timing = (
            f"{pct:.0f}%, {format_rate(self.rate, self.unit)}, "
            f"elapsed {format_duration(self.elapsed)}, ETA {format_duration(self.eta)}"
        )
        return f"{self.desc} {self.done}/{self.total}{stats} [{timing}]"

    # ------------------------------------------------------------------ updates

    def update(self, n: int = 1, **postfix: Any) -> None:
        """``n`` more done; ``postfix`` (e.g. ``loss=...``) shows in the bar and the lines."""
        self.done += n
        if postfix:
            self.postfix = postfix
        if not self.enabled:
            return
        if self._bar is not None:
            if postfix:
                self._bar.set_postfix({k: _fmt_value(v) for k, v in postfix.items()}, refresh=False)
            self._bar.update(n)
        now = _now()
        finished = self.done >= self.total
        if self.every:
            due = self.done // self.every > (self.done - n) // self.every or finished
        else:
            due = now - self._last_line >= self.interval or (finished and self.lines > 0)
        if due:
            self._last_line = now
            self.lines += 1
            self.log.info("%s", self.line())

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        if self._redirect is not None:
            self._redirect.close()
            self._redirect = None

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def track(
    iterable: Iterable[T],
    desc: str,
    *,
    total: int | None = None,
    unit: str = "it",
    every: int | None = None,
    interval: float | None = None,
    enabled: bool = True,
) -> Iterator[T]:
    """Yield the items of ``iterable`` while a :class:`Progress` counts them."""
    if total is None:
        total = len(iterable)  # type: ignore[arg-type]
    with Progress(total, desc, unit=unit, every=every, interval=interval, enabled=enabled) as bar:
        for item in iterable:
            yield item
            bar.update()
