"""A constitution as data: principles for AI feedback (Bai et al. 2022, "Constitutional AI").

A constitution file (YAML; ``conf/constitution/*.yaml`` ship with the project) holds a ``name``
and a list of ``principles``; each principle has

    name                 short id (unique in the file), used in reports and saved rows
    critique_request     SL-CAI: asks a generative model to critique a response against the principle
    revision_request     SL-CAI: asks it to rewrite the response to follow the principle
    comparison_question  RL-CAI: "which of two responses better follows the principle?"
    positive, negative   one or more sentences describing the principle kept / violated; the
                         embedding labeler scores a response by its similarity to these

A malformed file is a :class:`~rlhfstack.data.schemas.DataError` naming the file, the line and
the field (``conf/constitution/x.yaml:12: field 'principles[1].revision_request': missing``):
the YAML is composed into nodes, which keep their positions, before it is read.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import yaml

from rlhfstack.configs import REPO_ROOT
from rlhfstack.data.schemas import DataError

__all__ = ["Constitution", "Principle", "load_constitution", "resolve_constitution_path"]

_TEXT_FIELDS = ("critique_request", "revision_request", "comparison_question")
_LIST_FIELDS = ("positive", "negative")


@dataclass(frozen=True)
class Principle:
    """One principle of a constitution (see the module docstring for each field)."""

    name: str
    critique_request: str
    revision_request: str
    comparison_question: str
    positive: tuple[str, ...]
    negative: tuple[str, ...]


@dataclass(frozen=True)
class Constitution:
    """A named list of principles, read from ``path``."""

    name: str
    principles: tuple[Principle, ...]
    path: str = ""

    def principle(self, name: str) -> Principle:
        """The principle called ``name`` (KeyError listing the names otherwise)."""
        for p in self.principles:
            if p.name == name:
                return p
        raise KeyError(f"{name!r} is not a principle of {self.name!r}: {self.names}")

    @property
    def names(self) -> list[str]:
        return [p.name for p in self.principles]


def resolve_constitution_path(path: str | os.PathLike) -> Path:
    """``path`` as given when it exists, else ``conf/constitution/<path>[.yaml]`` of the project."""
    p = Path(path)
    if p.is_file():
        return p
    for cand in (
        REPO_ROOT / "conf" / "constitution" / p,
        REPO_ROOT / "conf" / "constitution" / f"{p}.yaml",
    ):
        if cand.is_file():
            return cand
    raise DataError(
        "constitution file not found (give a path, or a name in conf/constitution/)",
        path=str(path),
        reason="missing_file",
    )


def _line(node: yaml.Node) -> int:
    return node.start_mark.line + 1


def _mapping(node: yaml.Node, where: str, path: str, field: str | None) -> dict[str, yaml.Node]:
    if not isinstance(node, yaml.MappingNode):
        raise DataError(
            f"expected a mapping ({where})", path=path, line=_line(node), field=field,
            reason="bad_type",
        )  # fmt: skip
    out: dict[str, yaml.Node] = {}
    for k, v in node.value:
        key = str(k.value)
        if key in out:
            raise DataError(
                "duplicate key", path=path, line=_line(k),
                field=f"{field}.{key}" if field else key, reason="bad_format",
            )  # fmt: skip
        out[key] = v
    return out


def _text(node: yaml.Node, path: str, field: str) -> str:
    if not isinstance(node, yaml.ScalarNode) or node.tag != "tag:yaml.org,2002:str":
        raise DataError("expected a string", path=path, line=_line(node), field=field,
                        reason="bad_type")  # fmt: skip
    text = str(node.value).strip()
    if not text:
        raise DataError("empty text", path=path, line=_line(node), field=field,
                        reason="empty_text")  # fmt: skip
    return text


def _principle(node: yaml.Node, i: int, path: str) -> Principle:
    where = f"principles[{i}]"
    fields = _mapping(node, "a principle", path, where)
    known = {"name", *_TEXT_FIELDS, *_LIST_FIELDS}
    for key, value in fields.items():
        if key not in known:
            raise DataError(
                f"unknown field (expected {sorted(known)})", path=path, line=_line(value),
                field=f"{where}.{key}", reason="bad_format",
            )  # fmt: skip
    for key in ("name", *_TEXT_FIELDS, *_LIST_FIELDS):
        if key not in fields:
            raise DataError("missing field", path=path, line=_line(node),
                            field=f"{where}.{key}", reason="missing_field")  # fmt: skip
    lists: dict[str, tuple[str, ...]] = {}
    for key in _LIST_FIELDS:
        seq = fields[key]
        if not isinstance(seq, yaml.SequenceNode) or not seq.value:
            raise DataError("expected a non-empty list of sentences", path=path, line=_line(seq),
                            field=f"{where}.{key}", reason="bad_type")  # fmt: skip
        lists[key] = tuple(_text(s, path, f"{where}.{key}[{j}]") for j, s in enumerate(seq.value))
    return Principle(
        name=_text(fields["name"], path, f"{where}.name"),
        **{k: _text(fields[k], path, f"{where}.{k}") for k in _TEXT_FIELDS},
        positive=lists["positive"],
        negative=lists["negative"],
    )


def load_constitution(path: str | os.PathLike) -> Constitution:
    """Read and validate a constitution file (a name in ``conf/constitution/`` works too).

    Raises:
        DataError: naming the file, the 1-based line and the field of the first problem.
    """
    file = resolve_constitution_path(path)
    where = str(file)
    try:
        root = yaml.compose(file.read_text(encoding="utf-8"))
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        raise DataError(
            f"not valid YAML: {getattr(err, 'problem', err)}", path=where,
            line=None if mark is None else mark.line + 1, reason="bad_format",
        ) from None  # fmt: skip
    if root is None:
        raise DataError("empty file", path=where, reason="bad_format")
    top = _mapping(root, "the file", where, None)
    for key in top:
        if key not in ("name", "principles"):
            raise DataError("unknown field (expected name, principles)", path=where,
                            line=_line(top[key]), field=key, reason="bad_format")  # fmt: skip
    if "principles" not in top:
        raise DataError("missing field", path=where, line=_line(root), field="principles",
                        reason="missing_field")  # fmt: skip
    seq = top["principles"]
    if not isinstance(seq, yaml.SequenceNode) or not seq.value:
        raise DataError("expected a non-empty list of principles", path=where, line=_line(seq),
                        field="principles", reason="bad_type")  # fmt: skip
    principles = tuple(_principle(n, i, where) for i, n in enumerate(seq.value))
    seen: dict[str, int] = {}
    for i, p in enumerate(principles):
        if p.name in seen:
            raise DataError(
                f"duplicate principle name {p.name!r} (also principles[{seen[p.name]}])",
                path=where, line=_line(seq.value[i]), field=f"principles[{i}].name",
                reason="bad_format",
            )  # fmt: skip
        seen[p.name] = i
    name = _text(top["name"], where, "name") if "name" in top else file.stem
    return Constitution(name=name, principles=principles, path=where)
