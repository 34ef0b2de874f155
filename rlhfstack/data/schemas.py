"""Typed examples produced by the loaders, plus the per-load report.

Every loader turns raw records (whatever their on-disk shape) into one of three frozen
dataclasses. Prompts are already *rendered* by a chat template (see ``templates.py``), so
downstream code never has to know which dataset or template an example came from:

* :class:`SFTExample` -- ``prompt`` + ``completion`` (the text the model is trained to produce).
* :class:`PreferenceExample` -- ``prompt`` + two *responses* ``chosen`` / ``rejected``
  (the responses only, never prompt + response).
* :class:`PromptExample` -- a ``prompt`` to generate from (PPO rollouts, evaluation).
* :class:`UnpairedExample` -- ``prompt`` + one ``completion`` labelled desirable or not (KTO's
  thumbs-up / thumbs-down data).
"""

from __future__ import annotations

from dataclasses import dataclass, field

__all__ = [
    "SFTExample",
    "PreferenceExample",
    "PromptExample",
    "UnpairedExample",
    "LoadReport",
    "Example",
    "DataError",
    "DataFileNotFoundError",
]


@dataclass(frozen=True)
class SFTExample:
    """A rendered prompt and the completion to imitate."""

    prompt: str
    completion: str


@dataclass(frozen=True)
class PreferenceExample:
    """A rendered prompt and two responses to it; ``chosen`` is preferred over ``rejected``.

    ``p_chosen``: the probability that ``chosen`` is the better one (a soft label, e.g. an AI
    feedback model's; 1.0 = a hard label). The reward model's Bradley-Terry loss uses it as its
    target; other consumers read only the order.
    """

    prompt: str
    chosen: str
    rejected: str
    p_chosen: float = 1.0


@dataclass(frozen=True)
class PromptExample:
    """A rendered prompt to generate a response for."""

    prompt: str


@dataclass(frozen=True)
class UnpairedExample:
    """A rendered prompt, one response, and whether that response is desirable (KTO)."""

    prompt: str
    completion: str
    desirable: bool


Example = SFTExample | PreferenceExample | PromptExample | UnpairedExample

_MAX_MESSAGES_IN_SUMMARY = 5


@dataclass
class LoadReport:
    """What happened while loading one source, for the run log.

    ``read`` = records seen; ``kept`` = examples returned. Every record that was read and
    not kept is either in ``skipped_by_reason`` (malformed; only with ``on_error="skip"``) or
    in ``filtered_too_long`` (dropped by :func:`rlhfstack.data.filter_by_length`), so
    ``read == kept + sum(skipped_by_reason.values()) + filtered_too_long``.
    """

    source: str = ""
    adapter: str = ""
    read: int = 0
    kept: int = 0
    skipped_by_reason: dict[str, int] = field(default_factory=dict)
    filtered_too_long: int = 0
    messages: list[str] = field(default_factory=list)

    @property
    def skipped(self) -> int:
        """Total number of malformed records that were skipped."""
        return sum(self.skipped_by_reason.values())

    def add_skip(self, reason: str, message: str) -> None:
        """Count one skipped record under ``reason`` and keep its message."""
        self.skipped_by_reason[reason] = self.skipped_by_reason.get(reason, 0) + 1
        self.messages.append(message)

    def summary(self) -> str:
        """A few human-readable lines: counts, skip reasons and the first skip messages."""
        head = f"{self.source or '<data>'}"
        if self.adapter:
            head += f" [adapter={self.adapter}]"
        line = f"{head}: read {self.read}, kept {self.kept}"
        if self.skipped:
            reasons = ", ".join(f"{k}={v}" for k, v in sorted(self.skipped_by_reason.items()))
            line += f", skipped {self.skipped} ({reasons})"
        if self.filtered_too_long:
            line += f", filtered as too long {self.filtered_too_long}"
        lines = [line]
        for msg in self.messages[:_MAX_MESSAGES_IN_SUMMARY]:
            lines.append(f"  skipped: {msg}")
        if len(self.messages) > _MAX_MESSAGES_IN_SUMMARY:
            lines.append(f"  ... and {len(self.messages) - _MAX_MESSAGES_IN_SUMMARY} more")
        return "\n".join(lines)


class DataError(ValueError):
    """A malformed record or unreadable data file, located as precisely as possible.

    ``str(err)`` reads like ``"data/x.jsonl:17: field 'chosen': empty text"``; for records
    of a JSON list (or a hub dataset) the 0-based item index is added:
    ``"data/x.json:120 (item [3]): field 'output': missing field"``.

    Attributes:
        path: the file (or ``hf://`` source) the record came from, if known.
        line: 1-based line where the record starts, if known.
        index: 0-based position of the record in a JSON list / hub split, if relevant.
        field: the offending field (``"conversations[2].value"``), if any.
        reason: a short machine-readable key used to count skips (``"bad_json"``,
            ``"bad_utf8"``, ``"missing_field"`` (key absent), ``"null_field"`` (value null),
            ``"empty_text"``, ``"identical_pair"``,
            ``"bad_type"``, ``"bad_format"``, ``"bad_record"``, ``"missing_file"``, ...).
        detail: the message without the location prefix.
    """

    def __init__(
        self,
        detail: str,
        *,
        path: str | None = None,
        line: int | None = None,
        index: int | None = None,
        field: str | None = None,
        reason: str = "invalid",
    ) -> None:
        self.detail = detail
        self.path = None if path is None else str(path)
        self.line = line
        self.index = index
        self.field = field
        self.reason = reason
        super().__init__(self._format())

    def _format(self) -> str:
        loc = self.path if self.path is not None else "<record>"
        if self.line is not None:
            loc += f":{self.line}"
        if self.index is not None:
            loc += f" (item [{self.index}])"
        field = f" field '{self.field}':" if self.field else ""
        return f"{loc}:{field} {self.detail}"

    def __reduce__(self):  # keep the attributes when pickled (e.g. from DataLoader workers)
        kwargs = {k: getattr(self, k) for k in ("path", "line", "index", "field", "reason")}
        return (_rebuild_error, (type(self), self.detail, kwargs))

    def located(
        self, path: str | None, line: int | None = None, index: int | None = None
    ) -> DataError:
        """A copy of this error with its location filled in (existing values win)."""
        return type(self)(
            self.detail,
            path=self.path if self.path is not None else path,
            line=self.line if self.line is not None else line,
            index=self.index if self.index is not None else index,
            field=self.field,
            reason=self.reason,
        )


def _rebuild_error(cls: type[DataError], detail: str, kwargs: dict) -> DataError:
    return cls(detail, **kwargs)


class DataFileNotFoundError(DataError, FileNotFoundError):
    """The data file does not exist (always raised, also with ``on_error="skip"``)."""
