"""Read data files (or hub datasets) into typed examples, with precise errors.

Local files are read by a validating pass in plain Python, so that every problem is reported
with its file, line and field, e.g. ``data/x.jsonl:17: field 'chosen': empty text``:

* formats: ``.json`` (a JSON list; a ``.json`` file that does not start with ``[`` is read
  as JSON lines), ``.jsonl`` / ``.ndjson``, ``.csv``, ``.tsv``, each optionally ``.gz``;
  ``.parquet`` / ``.pq`` (read with pyarrow; a row's 1-based number stands where a line
  number would: ``data/x.parquet:17: field 'chosen': empty text``).
* checked: UTF-8 (strict), JSON syntax, record type, then the adapter's fields (missing,
  wrong type, empty text, chosen identical to rejected, format-specific structure).

With ``on_error="skip"`` malformed records are counted per reason in the :class:`LoadReport`
instead of raising. A missing or unreadable file, a syntax error inside a JSON list (the rest
of the list cannot be trusted) and a source with no usable record always raise.

Hub datasets: a source ``"hf://org/name[:split]"`` is loaded with
``datasets.load_dataset("org/name", split=split or "train")`` and its rows go through the same
adapters and checks. Use :func:`to_hf_dataset` to turn examples into a ``datasets.Dataset``.
"""

from __future__ import annotations

import csv
import dataclasses
import gzip
import io
import json
import logging
import os
import re
import zlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, TypeVar

from rlhfstack.runtime import require

from .adapters import Kind, adapt, detect_adapter, get_adapter
from .collate import filter_by_length
from .schemas import (
    DataError,
    DataFileNotFoundError,
    Example,
    LoadReport,
    PreferenceExample,
    PromptExample,
    SFTExample,
    UnpairedExample,
)
from .templates import ChatTemplate, get_template

if TYPE_CHECKING:
    import datasets

__all__ = [
    "DataError",
    "DataFileNotFoundError",
    "REPO_ROOT",
    "HUB_PREFIX",
    "default_data_root",
    "resolve_data_path",
    "iter_records",
    "load_records",
    "map_records",
    "load_sft",
    "load_preferences",
    "load_prompts",
    "load_examples",
    "to_hf_dataset",
]

logger = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parents[2]
"""The repository root (parent of the ``rlhfstack`` package directory)."""

HUB_PREFIX = "hf://"
OnError = Literal["raise", "skip"]

_SURROGATE = re.compile("[\udc80-\udcff]")  # undecodable bytes under errors="surrogateescape"


# --------------------------------------------------------------------------- paths
def default_data_root() -> Path:
    """``$RLHF_DATA_ROOT`` if set (relative values are relative to the working directory),
    else ``<repo>/../shared/data``."""
    env = os.environ.get("RLHF_DATA_ROOT")
    if env:
        return Path(env).expanduser().resolve()
    return (REPO_ROOT / ".." / "shared" / "data").resolve()


def resolve_data_path(
    path: str | os.PathLike[str], data_root: str | os.PathLike[str] | None = None
) -> Path | str:
    """Resolve a data path: absolute paths are kept, relative ones are joined to ``data_root``
    (default :func:`default_data_root`). ``hf://`` sources are returned unchanged (as str)."""
    if isinstance(path, str) and path.startswith(HUB_PREFIX):
        return path
    p = Path(path).expanduser()
    if p.is_absolute():
        return p
    root = Path(data_root).expanduser().resolve() if data_root is not None else default_data_root()
    return root / p


# --------------------------------------------------------------------------- raw records
@dataclass
class _Row:
    """One raw record, or the error that prevented reading it, with its location."""

    line: int | None
    index: int | None
    record: Any = None
    error: DataError | None = None


def _bad_byte_error(text: str, field: str | None = None) -> DataError:
    m = _SURROGATE.search(text)
    assert m is not None
    byte = ord(m.group()) - 0xDC00
    col = text.rfind("\n", 0, m.start()) + 1
    return DataError(
        f"invalid UTF-8 byte 0x{byte:02x} (column {m.start() - col + 1})",
        field=field,
        reason="bad_utf8",
    )


def _field_with_bad_bytes(value: Any, prefix: str = "") -> str | None:
    """Path of the first string (key or value) in a parsed record holding undecodable bytes."""
    if isinstance(value, str):
        return prefix or None if _SURROGATE.search(value) else None
    if isinstance(value, Mapping):
        for k, v in value.items():
            name = f"{prefix}.{k}" if prefix else str(k)
            if _SURROGATE.search(str(k)):
                return name
            found = _field_with_bad_bytes(v, name)
            if found:
                return found
    elif isinstance(value, list):
        for i, v in enumerate(value):
            found = _field_with_bad_bytes(v, f"{prefix}[{i}]")
            if found:
                return found
    return None


def _detect_format(path: Path, text: str, fmt: str | None) -> str:
    if fmt is not None:
        fmt = fmt.lower().lstrip(".")
        if fmt not in ("json", "jsonl", "csv", "tsv"):
            raise ValueError(
                f"unknown data format {fmt!r}; expected json, jsonl, csv, tsv or parquet"
            )
    else:
        name = path.name.lower()
        if name.endswith(".gz"):
            name = name[:-3]
        suffix = name.rsplit(".", 1)[-1] if "." in name else ""
        fmt = {"json": "json", "jsonl": "jsonl", "ndjson": "jsonl", "csv": "csv", "tsv": "tsv"}.get(
            suffix
        )
        if fmt is None:
            raise DataError(
                "cannot tell the format from the file name; pass fmt= (json, jsonl, csv, tsv)",
                path=str(path),
                reason="unreadable",
            )
    if fmt == "json" and not text.lstrip().startswith("["):
        fmt = "jsonl"  # many ".json" files are JSON lines
    return fmt


def _read_text(path: Path) -> str:
    if not path.exists():
        hint = ""
        if not path.is_absolute() or "RLHF_DATA_ROOT" not in os.environ:
            hint = f" (relative data paths resolve against RLHF_DATA_ROOT={default_data_root()})"
        raise DataFileNotFoundError(
            f"data file not found{hint}", path=str(path), reason="missing_file"
        )
    try:
        if path.name.lower().endswith(".gz"):
            with gzip.open(path, "rb") as f:
                data = f.read()
        else:
            data = path.read_bytes()
    except (OSError, EOFError, zlib.error) as e:
        raise DataError(f"cannot read file: {e}", path=str(path), reason="unreadable") from e
    text = data.decode("utf-8", errors="surrogateescape")
    return text[1:] if text.startswith("\ufeff") else text


def _iter_jsonl(text: str) -> Iterator[_Row]:
    for lineno, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        if _SURROGATE.search(line):
            field = None
            try:
                field = _field_with_bad_bytes(json.loads(line))
            except ValueError:
                pass
            yield _Row(lineno, None, error=_bad_byte_error(line, field))
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            err = DataError(f"invalid JSON: {e.msg} (column {e.colno})", reason="bad_json")
            yield _Row(lineno, None, error=err)
            continue
        yield _Row(lineno, None, record=record)


def _iter_json_list(text: str, path: str) -> Iterator[_Row]:
    decoder = json.JSONDecoder()
    ws = re.compile(r"\s*")
    pos = ws.match(text, 0).end()
    line, line_pos = 1, 0  # line number of character offset `line_pos`

    def line_of(offset: int) -> int:
        nonlocal line, line_pos
        line += text.count("\n", line_pos, offset)
        line_pos = offset
        return line

    def syntax_error(offset: int, msg: str) -> DataError:
        col = offset - (text.rfind("\n", 0, offset) + 1) + 1
        return DataError(
            f"invalid JSON: {msg} (column {col}); a JSON list cannot be read past a syntax error",
            path=path,
            line=text.count("\n", 0, offset) + 1,
            reason="bad_json",
        )

    if text[pos : pos + 1] != "[":
        raise syntax_error(pos, "expected '[' at the start of a JSON list")
    pos = ws.match(text, pos + 1).end()
    if text[pos : pos + 1] == "]":
        return
    index = 0
    while True:
        start = pos
        try:
            record, end = decoder.raw_decode(text, pos)
        except json.JSONDecodeError as e:
            raise syntax_error(e.pos, e.msg) from None
        row = _Row(line_of(start), index, record=record)
        if _SURROGATE.search(text, start, end):
            row = _Row(
                row.line,
                index,
                error=_bad_byte_error(text[start:end], _field_with_bad_bytes(record)),
            )
        yield row
        index += 1
        pos = ws.match(text, end).end()
        sep = text[pos : pos + 1]
        if sep == "]":
            return
        if sep != ",":
            raise syntax_error(pos, "expected ',' or ']' after a list item")
        pos = ws.match(text, pos + 1).end()


def _iter_csv(text: str, delimiter: str) -> Iterator[_Row]:
    reader = csv.DictReader(io.StringIO(text, newline=""), delimiter=delimiter)
    try:
        header = reader.fieldnames or []
    except csv.Error as e:
        yield _Row(1, None, error=DataError(f"invalid CSV header: {e}", reason="bad_record"))
        return
    for name in header:
        if _SURROGATE.search(name):
            yield _Row(1, None, error=_bad_byte_error(name, "<header>"))
            return
    prev = reader.line_num
    while True:
        start = prev + 1
        try:
            row = next(reader)
        except StopIteration:
            return
        except csv.Error as e:
            yield _Row(start, None, error=DataError(f"invalid CSV: {e}", reason="bad_record"))
            return
        prev = reader.line_num
        if None in row:  # more cells than header columns
            err = DataError(
                f"row has {len(header) + len(row[None])} cells but the header has {len(header)}",
                reason="bad_record",
            )
            yield _Row(start, None, error=err)
            continue
        bad = next((k for k, v in row.items() if isinstance(v, str) and _SURROGATE.search(v)), None)
        if bad is not None:
            yield _Row(start, None, error=_bad_byte_error(row[bad], bad))
            continue
        yield _Row(start, None, record=dict(row))


PARQUET_SUFFIXES = (".parquet", ".pq")


def _is_parquet(path: Path, fmt: str | None) -> bool:
    if fmt is not None:
        return fmt.lower().lstrip(".") == "parquet"
    return path.name.lower().endswith(PARQUET_SUFFIXES)


def _iter_parquet(path: Path) -> Iterator[_Row]:
    """Rows of a parquet file as dicts (nested columns as lists and dicts), numbered from 1 in
    the ``line`` slot, so that errors read ``file.parquet:ROW: field 'x': ...``."""
    if not path.exists():
        raise DataFileNotFoundError("data file not found", path=str(path), reason="missing_file")
    pq = require("pyarrow.parquet", f"reading {path.name} (parquet)")
    try:
        batches = pq.ParquetFile(path).iter_batches(batch_size=1024)
        row = 0
        for batch in batches:
            for record in batch.to_pylist():
                row += 1
                yield _Row(row, None, record=record)
    except (OSError, ValueError) as e:  # pyarrow's ArrowInvalid is a ValueError
        raise DataError(f"cannot read parquet: {e}", path=str(path), reason="unreadable") from e


def _iter_rows(path: Path, fmt: str | None) -> Iterator[_Row]:
    if _is_parquet(path, fmt):
        return _iter_parquet(path)
    text = _read_text(path)
    fmt = _detect_format(path, text, fmt)
    if fmt == "json":
        return _iter_json_list(text, str(path))
    if fmt == "jsonl":
        return _iter_jsonl(text)
    return _iter_csv(text, "\t" if fmt == "tsv" else ",")


def _iter_hub_rows(source: str) -> Iterator[_Row]:
    spec = source[len(HUB_PREFIX) :]
    name, _, split = spec.partition(":")
    if not name:
        raise ValueError(f"bad hub source {source!r}; expected hf://org/name[:split]")
    datasets = require("datasets", f"the hub source {source}")  # slow: imported only here
    ds = datasets.load_dataset(name, split=split or "train")
    for i, row in enumerate(ds):
        yield _Row(None, i, record=dict(row))


def _source_rows(
    source: str | os.PathLike[str], fmt: str | None, data_root: str | os.PathLike[str] | None
) -> tuple[str, Iterator[_Row]]:
    resolved = resolve_data_path(source, data_root)
    if isinstance(resolved, str):  # hub
        return resolved, _iter_hub_rows(resolved)
    return str(resolved), _iter_rows(resolved, fmt)


def iter_records(
    path: str | os.PathLike[str],
    *,
    fmt: str | None = None,
    data_root: str | os.PathLike[str] | None = None,
) -> Iterator[tuple[int | None, Any]]:
    """Yield ``(line, record)`` for each record of a file (``line`` is 1-based; ``None`` for hub
    rows). Raises :class:`DataError` at the first undecodable / unparsable record."""
    display, rows = _source_rows(path, fmt, data_root)
    for row in rows:
        if row.error is not None:
            raise row.error.located(display, row.line, row.index)
        yield row.line, row.record


def load_records(
    path: str | os.PathLike[str],
    *,
    fmt: str | None = None,
    data_root: str | os.PathLike[str] | None = None,
) -> list[Any]:
    """All raw records of a json / jsonl / csv / tsv (optionally .gz) file, strictly checked."""
    return [record for _, record in iter_records(path, fmt=fmt, data_root=data_root)]


_T = TypeVar("_T")


def map_records(
    path: str | os.PathLike[str],
    check: Callable[[Any], _T],
    *,
    fmt: str | None = None,
    data_root: str | os.PathLike[str] | None = None,
) -> list[_T]:
    """``check(record)`` for each record of a file, in order: the reader for files that are not
    training examples (evaluation samples, run metrics, probe sets). A :class:`DataError` that
    ``check`` raises (e.g. from :func:`rlhfstack.data.adapters.require_field`) is located at the
    record's file and line, like a syntax error, so every problem reads
    ``file:line: field 'x': ...``. ``data_root`` as in :func:`resolve_data_path` (pass ``"."``
    for paths relative to the working directory)."""
    try:
        display, rows = _source_rows(path, fmt, data_root)
    except DataFileNotFoundError as e:
        if data_root is None:
            raise
        # without the default root's hint: this path did not resolve against RLHF_DATA_ROOT
        raise DataFileNotFoundError("file not found", path=e.path, reason="missing_file") from None
    out: list[_T] = []
    for row in rows:
        try:
            if row.error is not None:
                raise row.error
            out.append(check(row.record))
        except DataError as e:
            raise e.located(display, row.line, row.index) from None
    return out


# --------------------------------------------------------------------------- typed loading
def load_examples(
    kind: Kind,
    source: str | os.PathLike[str],
    *,
    adapter: str = "auto",
    template: str | ChatTemplate = "hh",
    on_error: OnError = "raise",
    tokenizer: Any = None,
    max_prompt_tokens: int | None = None,
    max_response_tokens: int | None = None,
    max_records: int | None = None,
    fmt: str | None = None,
    data_root: str | os.PathLike[str] | None = None,
) -> tuple[list[Example], LoadReport]:
    """Load ``source`` as ``kind`` examples; see :func:`load_sft` for the arguments."""
    if on_error not in ("raise", "skip"):
        raise ValueError(f"on_error must be 'raise' or 'skip', got {on_error!r}")
    tmpl = get_template(template, tokenizer)
    name: str | None = None
    if adapter != "auto":
        get_adapter(kind, adapter)  # fail fast on a bad name
        name = adapter
    display, rows = _source_rows(source, fmt, data_root)
    report = LoadReport(source=display)
    examples: list[Example] = []
    for row in rows:
        if max_records is not None and report.read >= max_records:
            break
        report.read += 1
        try:
            if row.error is not None:
                raise row.error
            chosen_name = name or detect_adapter(kind, row.record)
            example = adapt(kind, chosen_name, row.record, tmpl)
            name = chosen_name  # auto-detection happens once, on the first usable record
        except DataError as e:
            err = e.located(display, row.line, row.index)
            if on_error == "raise":
                raise err from None
            report.add_skip(err.reason, str(err))
            continue
        examples.append(example)
    report.adapter = name or adapter
    if tokenizer is not None and (max_prompt_tokens is not None or max_response_tokens is not None):
        examples, _ = filter_by_length(
            examples, tokenizer, max_prompt_tokens, max_response_tokens, report=report
        )
    report.kept = len(examples)
    if not examples:
        raise DataError(
            f"no usable {kind} examples\n{report.summary()}", path=display, reason="no_examples"
        )
    logger.info("%s", report.summary())
    return examples, report


def load_sft(
    source: str | os.PathLike[str],
    *,
    adapter: str = "auto",
    template: str | ChatTemplate = "hh",
    on_error: OnError = "raise",
    tokenizer: Any = None,
    max_prompt_tokens: int | None = None,
    max_response_tokens: int | None = None,
    max_records: int | None = None,
    fmt: str | None = None,
    data_root: str | os.PathLike[str] | None = None,
) -> tuple[list[SFTExample], LoadReport]:
    """Load SFT examples (prompt + completion).

    Args:
        source: file path (relative paths resolve against ``data_root``) or ``hf://org/name[:split]``.
        adapter: record format (``"auto"`` detects it from the first record); see ``adapters.py``.
        template: chat template name or :class:`ChatTemplate` used to render prompts.
        on_error: ``"raise"`` at the first malformed record, or ``"skip"`` and count it.
        tokenizer, max_prompt_tokens, max_response_tokens: if given, drop examples that are too
            long (see :func:`rlhfstack.data.filter_by_length`); counted in the report.
        max_records: read at most this many records (before any skipping / filtering).
        fmt: force ``"json"``, ``"jsonl"``, ``"csv"``, ``"tsv"`` or ``"parquet"`` instead of using the suffix.
        data_root: base for relative paths (default ``$RLHF_DATA_ROOT`` or ``../shared/data``).

    Returns:
        ``(examples, report)``.
    """
    return load_examples(
        "sft",
        source,
        adapter=adapter,
        template=template,
        on_error=on_error,
        tokenizer=tokenizer,
        max_prompt_tokens=max_prompt_tokens,
        max_response_tokens=max_response_tokens,
        max_records=max_records,
        fmt=fmt,
        data_root=data_root,
    )


def load_preferences(
    source: str | os.PathLike[str],
    *,
    adapter: str = "auto",
    template: str | ChatTemplate = "hh",
    on_error: OnError = "raise",
    tokenizer: Any = None,
    max_prompt_tokens: int | None = None,
    max_response_tokens: int | None = None,
    max_records: int | None = None,
    fmt: str | None = None,
    data_root: str | os.PathLike[str] | None = None,
) -> tuple[list[PreferenceExample], LoadReport]:
    """Load preference pairs (prompt, chosen response, rejected response); arguments as
    :func:`load_sft` (the length limit applies to both responses)."""
    return load_examples(
        "preference",
        source,
        adapter=adapter,
        template=template,
        on_error=on_error,
        tokenizer=tokenizer,
        max_prompt_tokens=max_prompt_tokens,
        max_response_tokens=max_response_tokens,
        max_records=max_records,
        fmt=fmt,
        data_root=data_root,
    )


def load_unpaired(
    source: str | os.PathLike[str],
    *,
    adapter: str = "auto",
    template: str | ChatTemplate = "hh",
    on_error: OnError = "raise",
    tokenizer: Any = None,
    max_prompt_tokens: int | None = None,
    max_response_tokens: int | None = None,
    max_records: int | None = None,
    fmt: str | None = None,
    data_root: str | os.PathLike[str] | None = None,
) -> tuple[list[UnpairedExample], LoadReport]:
    """Load unpaired examples ``{"prompt", "completion", "label": true|false}`` (KTO); arguments
    as :func:`load_sft`."""
    return load_examples(
        "unpaired",
        source,
        adapter=adapter,
        template=template,
        on_error=on_error,
        tokenizer=tokenizer,
        max_prompt_tokens=max_prompt_tokens,
        max_response_tokens=max_response_tokens,
        max_records=max_records,
        fmt=fmt,
        data_root=data_root,
    )


def load_prompts(
    source: str | os.PathLike[str],
    *,
    adapter: str = "auto",
    template: str | ChatTemplate = "hh",
    on_error: OnError = "raise",
    tokenizer: Any = None,
    max_prompt_tokens: int | None = None,
    max_records: int | None = None,
    fmt: str | None = None,
    data_root: str | os.PathLike[str] | None = None,
    prompt_field: str | None = None,
) -> tuple[list[PromptExample], LoadReport]:
    """Load prompts for generation; arguments as :func:`load_sft`. ``prompt_field="goal"`` is
    short for ``adapter="field:goal"`` (take the prompt text from that column)."""
    if prompt_field is not None:
        adapter = f"field:{prompt_field}"
    return load_examples(
        "prompt",
        source,
        adapter=adapter,
        template=template,
        on_error=on_error,
        tokenizer=tokenizer,
        max_prompt_tokens=max_prompt_tokens,
        max_records=max_records,
        fmt=fmt,
        data_root=data_root,
    )


def to_hf_dataset(examples: Sequence[Example]) -> datasets.Dataset:
    """A ``datasets.Dataset`` with one column per example field (for ``.map`` / ``.shuffle``);
    preference pairs get a ``p_chosen`` column only when some label is soft (else the usual
    ``prompt, chosen, rejected``)."""
    datasets = require("datasets", "to_hf_dataset")

    rows = [dataclasses.asdict(e) for e in examples]
    if rows and "p_chosen" in rows[0] and all(r["p_chosen"] == 1.0 for r in rows):
        for r in rows:
            del r["p_chosen"]
    return datasets.Dataset.from_list(rows)
