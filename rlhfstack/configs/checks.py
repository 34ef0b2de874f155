"""Declared constraints of config fields and the validator that reads them.

A field states what it accepts beside its default, in the field's metadata::

    clip_eps: float = positive(0.2)                 # > 0
    batch_size: int = at_least(32, lo=1)            # >= 1
    gamma: float = in_range(1.0, lo=0.0, hi=1.0)    # 0 <= gamma <= 1
    backend: str = choice("native", "vllm")         # the default, or one of the others
    name: str = free("stories260k", "display name, any text")   # no constraint, and why

``validate(obj)`` walks a config dataclass (nested ones included) and raises one ``ValueError``
listing every bad field as ``dotted.key=value: allowed``. ``None`` passes wherever the field's
type admits it (``int | None``); ``bool`` fields need no declaration (OmegaConf's type check is
their whole constraint). OmegaConf does not accept ``typing.Literal`` annotations (``Unexpected
type annotation``) and Enums would turn the string values the code compares against into enum
members, so choice fields stay ``str`` with a ``choice(...)`` check.

Paths are not checked here: a stage's input is often written by an earlier pipeline stage, so
they are checked when the stage starts (``rlhfstack.training.check_paths``).
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

CHECK = "check"
"""Metadata key of a field's :class:`Check`."""
WHY = "why"
"""Metadata key of the reason a field has no check."""


@dataclass(frozen=True)
class Check:
    """A predicate on a field's value and the words that say what it allows."""

    test: Callable[[Any], bool]
    allowed: str


def _field(default: Any, metadata: dict[str, Any]) -> Any:
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata=metadata)
    return field(default=default, metadata=metadata)


def _number(value: Any) -> bool:
    return (
        isinstance(value, (int, float))
        and not isinstance(value, bool)
        and not (isinstance(value, float) and math.isnan(value))
    )


def checked(default: Any, test: Callable[[Any], bool], allowed: str) -> Any:
    """A field whose value must satisfy ``test`` (``allowed`` says what passes)."""
    return _field(default, {CHECK: Check(test, allowed)})


def at_least(default: Any, *, lo: float) -> Any:
    """A number ``>= lo``."""
    return checked(default, lambda v: _number(v) and v >= lo, f">= {lo}")


def positive(default: Any) -> Any:
    """A number ``> 0``."""
    return checked(default, lambda v: _number(v) and v > 0, "> 0")


def nonnegative(default: Any) -> Any:
    """A number ``>= 0``."""
    return at_least(default, lo=0)


def in_range(
    default: Any, *, lo: float, hi: float, lo_open: bool = False, hi_open: bool = False
) -> Any:
    """A number in ``[lo, hi]`` (``lo_open`` / ``hi_open`` exclude an end)."""

    def test(v: Any) -> bool:
        if not _number(v):
            return False
        return (v > lo if lo_open else v >= lo) and (v < hi if hi_open else v <= hi)

    text = f"{'(' if lo_open else '['}{lo}, {hi}{')' if hi_open else ']'}"
    return checked(default, test, f"a number in {text}")


def choice(default: Any, *others: Any) -> Any:
    """``default`` or one of ``others``."""
    options = (default, *others)
    return checked(default, lambda v: v in options, "one of " + " | ".join(map(str, options)))


def torch_device(default: str, *, auto: bool = False) -> Any:
    """A torch device name: ``cpu``, ``cuda`` or ``cuda:N`` (and ``auto`` when allowed)."""

    def test(v: Any) -> bool:
        if auto and v == "auto":
            return True
        return v in ("cpu", "cuda") or bool(re.fullmatch(r"cuda:\d+", str(v)))

    return checked(default, test, "cpu | cuda | cuda:N" + (" | auto" if auto else ""))


def free(default: Any, why: str) -> Any:
    """A field with no constraint, and the reason why none is needed."""
    return _field(default, {WHY: why})


def reason(why: str) -> dict[str, Any]:
    """Metadata of a ``field(default_factory=..., metadata=reason(...))`` with no constraint."""
    return {WHY: why}


ADAPTER_NAMES = ("auto", "plain", "hh", "ultrafeedback", "alpaca", "sharegpt", "messages", "turns")
"""Record formats of ``rlhfstack.data.adapters`` (prompt files also take ``field:NAME``)."""


def is_adapter_name(value: Any) -> bool:
    return value in ADAPTER_NAMES or (isinstance(value, str) and value.startswith("field:"))


def _admits_none(f: dataclasses.Field) -> bool:
    return "None" in str(f.type)


def problems(obj: Any, prefix: str = "") -> list[str]:
    """``key=value: allowed`` for every field of ``obj`` (recursively) that breaks its check."""
    out: list[str] = []
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        key = f"{prefix}{f.name}"
        if dataclasses.is_dataclass(value) and not isinstance(value, type):
            out.extend(problems(value, key + "."))
            continue
        check = f.metadata.get(CHECK)
        if check is None or (value is None and _admits_none(f)):
            continue
        try:
            ok = bool(check.test(value))
        except TypeError:
            ok = False
        if not ok:
            out.append(f"{key}={value!r}: allowed {check.allowed}")
    return out


def validate(obj: Any, prefix: str = "") -> Any:
    """Raise ``ValueError`` naming every field of ``obj`` that breaks its check (keys start with
    ``prefix``); return ``obj``."""
    bad = problems(obj, prefix)
    if bad:
        name = type(obj).__name__
        raise ValueError(
            f"invalid config for {name} ({len(bad)} bad values):\n  " + "\n  ".join(bad)
        )
    return obj
