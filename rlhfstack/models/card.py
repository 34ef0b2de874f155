"""Model cards: the ``README.md`` of every exported model directory.

A Hugging Face model card is a Markdown file whose YAML front matter the Hub reads
(``base_model``, ``datasets``, ``library_name``, ``tags``, ``license``, ``pipeline_tag``; see
https://huggingface.co/docs/hub/model-cards). Only hub ids go into the metadata: a local model
or data path is written in the body, relative to the model directory, so a card never leaks the
layout of the machine that trained it and stays right when ``runs/`` moves.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from rlhfstack.runtime import atomic_write_text

LIBRARY_NAME = "transformers"
"""``library_name``: every exported directory loads with ``transformers``."""


def _is_hub_id(name: str) -> bool:
    """``org/name`` (one slash, no local file of that name): what the Hub accepts as an id."""
    if not name or name.startswith(("/", ".", "~")) or ":" in name or Path(name).exists():
        return False
    return name.count("/") == 1


def portable_path(value: Any, out_dir: str | os.PathLike) -> Any:
    """``value`` with a local path (absolute, or relative to the working directory and existing)
    made relative to ``out_dir``; other values as given (hub ids, ``pkg:`` paths, numbers)."""
    if not isinstance(value, str) or not value or "\n" in value:
        return value
    if not os.path.isabs(value) and not (_is_local_relative(value) and Path(value).exists()):
        return value
    try:
        return os.path.relpath(value, os.path.abspath(out_dir))
    except ValueError:  # another drive (Windows): keep only the name
        return Path(value).name


def _is_local_relative(value: str) -> bool:
    return ":" not in value and not value.startswith("~")


def _yaml_value(v: Any) -> str:
    # JSON strings and lists are valid YAML flow scalars/sequences
    return json.dumps(v)


def render_card(
    *,
    title: str | None = None,
    description: str = "",
    body: str = "",
    base_model: str | None = None,
    datasets: list[str] | tuple[str, ...] = (),
    tags: list[str] | tuple[str, ...] = (),
    license: str | None = None,
    pipeline_tag: str | None = None,
    sections: Mapping[str, Mapping[str, Any] | str] | None = None,
    out_dir: str | os.PathLike = ".",
) -> str:
    """The card's text: YAML metadata, ``# title`` and ``description`` (when ``title``), then
    ``body`` (ready Markdown with its own title when ``title`` is None), then ``sections``.
    ``base_model`` and ``datasets`` enter the metadata only when they are hub ids (else the
    "Origin" section names them, relative to ``out_dir``). ``sections``: heading ->
    ``{key: value}`` (a bullet list; local paths made relative) or ready Markdown text."""
    meta: dict[str, Any] = {"library_name": LIBRARY_NAME}
    if license:
        meta["license"] = license
    if base_model and _is_hub_id(base_model):
        meta["base_model"] = base_model
    hub_data = [d for d in datasets if _is_hub_id(d)]
    if hub_data:
        meta["datasets"] = hub_data
    meta["tags"] = ["rlhfstack", *[t for t in tags if t != "rlhfstack"]]
    if pipeline_tag:
        meta["pipeline_tag"] = pipeline_tag
    lines = ["---"]
    for k, v in meta.items():
        if isinstance(v, list):
            lines.append(f"{k}:")
            lines += [f"- {_yaml_value(x)}" for x in v]
        else:
            lines.append(f"{k}: {_yaml_value(v)}")
    lines += ["---", ""]
    if title:
        lines += [f"# {title}", "", description.strip(), ""]
    if body:
        lines += [body.strip(), ""]
    origin: dict[str, Any] = {}
    if base_model:
        origin["base model"] = portable_path(base_model, out_dir)
    local_data = [portable_path(d, out_dir) for d in datasets if d and not _is_hub_id(d)]
    if local_data:
        origin["data"] = ", ".join(str(d) for d in local_data)
    all_sections: dict[str, Mapping[str, Any] | str] = {}
    if origin:
        all_sections["Origin"] = origin
    all_sections.update(sections or {})
    for heading, body in all_sections.items():
        lines += [f"## {heading}", ""]
        if isinstance(body, str):
            lines += [body.strip(), ""]
            continue
        for k, v in body.items():
            lines.append(f"- **{k}**: {portable_path(v, out_dir)}")
        lines.append("")
    return "\n".join(lines)


def write_card(out_dir: str | os.PathLike, **card: Any) -> Path:
    """Write ``out_dir/README.md`` (atomically) from :func:`render_card`'s arguments."""
    path = Path(out_dir) / "README.md"
    atomic_write_text(path, render_card(out_dir=out_dir, **card))
    return path
