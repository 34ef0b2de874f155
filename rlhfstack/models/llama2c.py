"""Convert a llama2.c checkpoint (legacy "v0" ``.bin``) plus its tokenizer ``.bin`` to a
Hugging Face ``LlamaForCausalLM`` directory.

The reference target is Karpathy's ``stories260K`` (dim 64, 5 layers, 8 heads, 4 kv heads,
vocab 512), a real TinyStories-pretrained Llama small enough to train on a laptop CPU.

Format notes
------------
Checkpoint (``run.c`` legacy layout): 7 little-endian int32 header values
``dim, hidden_dim, n_layers, n_heads, n_kv_heads, vocab_size, seq_len`` (a negative
``vocab_size`` means the classifier is *not* shared with the token embedding), followed by
float32 tensors, each stored row-major as ``nn.Linear.weight`` i.e. ``(out, in)``::

    token_embedding (V, D), rms_att (L, D), wq (L, D, D), wk (L, KV, D), wv (L, KV, D),
    wo (L, D, D), rms_ffn (L, D), w1 (L, H, D), w2 (L, D, H), w3 (L, H, D), rms_final (D,),
    freq_cis_real (S, hd/2), freq_cis_imag (S, hd/2), [wcls (V, D)]

with ``KV = n_kv_heads * head_dim`` and ``hd = head_dim = D / n_heads``.

Tokenizer: int32 ``max_token_len`` then, per id, ``float32 score, int32 len, bytes``. It is a
sentencepiece BPE vocab exported with ``"▁"`` replaced by ``" "`` and BOS/EOS rendered as
``"\\n<s>\\n"`` / ``"\\n</s>\\n"``; byte-fallback pieces are ``"<0x00>"`` .. ``"<0xFF>"``.

Conversion decisions
--------------------
* RoPE: llama2.c rotates adjacent pairs ``(2j, 2j+1)``; HF rotates ``(j, j + hd/2)``. The rows
  of ``wq``/``wk`` are permuted per head (see :func:`permute_for_rotate_half`), which makes the
  two models numerically identical.
* Padding: a *distinct* ``<pad>`` token is appended as id ``V`` (512 for stories260K); EOS is
  never reused as PAD. The embedding gets one extra all-zero row (tied, so ``lm_head`` does too).
  A zero row yields a logit of exactly 0, which can beat the real logits, so the pad id is listed
  in ``generation_config.suppress_tokens`` and samplers outside ``generate`` must mask it
  (:data:`PAD_TOKEN`; logits ``[..., :V]`` are exactly the original model's logits).
* Stopping: llama2.c's base models were trained with BOS as the document delimiter and ``run.c``
  stops when BOS is sampled. ``config.eos_token_id`` stays 2 (``</s>``) but the generation
  config stops on either: ``eos_token_id = [2, 1]``.
* Tokenizer: a ``tokenizers`` BPE with ``byte_fallback``; merges are derived from the piece
  scores (highest score merges first), which reproduces ``run.c``'s greedy
  "merge the best-scoring adjacent pair" encoder. Saved as the stock transformers
  ``LlamaTokenizer`` (Metaspace ``"▁"`` pre-tokenizer, prefix added to the first segment only,
  BOS added, no EOS). One documented difference to ``run.c``: for text that already starts with
  a space, HF does not add a second dummy-prefix space (``run.c`` would).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import struct
import tempfile
from pathlib import Path

import numpy as np
import torch
from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM, LlamaTokenizer

__all__ = [
    "HEADER_KEYS",
    "PAD_TOKEN",
    "SPIECE_UNDERLINE",
    "bpe_merges_from_scores",
    "build_hf_config",
    "build_hf_state_dict",
    "build_hf_tokenizer",
    "convert",
    "llama2c_encode",
    "permute_for_rotate_half",
    "read_llama2c_checkpoint",
    "read_llama2c_tokenizer",
    "to_sentencepiece_pieces",
]

HEADER_KEYS = ("dim", "hidden_dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "seq_len")
PAD_TOKEN = "<pad>"
SPIECE_UNDERLINE = "▁"
ROPE_THETA = 10000.0
RMS_NORM_EPS = 1e-5  # run.c hard-codes 1e-5 in rmsnorm()

# How llama2.c's export renders sentencepiece control pieces -> their sentencepiece spelling.
_SPECIAL_PIECES = {"<unk>": "<unk>", "\n<s>\n": "<s>", "\n</s>\n": "</s>"}
_BYTE_PIECE_RE = re.compile(r"^<0x[0-9A-F]{2}>$")


# --------------------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------------------
def read_llama2c_checkpoint(path: str | os.PathLike) -> tuple[dict, dict[str, np.ndarray]]:
    """Read a llama2.c legacy (v0) checkpoint.

    Returns ``(header, weights)``. ``header`` has the 7 :data:`HEADER_KEYS` (``vocab_size`` made
    positive) plus ``head_dim`` and ``shared_classifier``. ``weights`` maps names to float32
    numpy arrays with shapes (L layers, D dim, H hidden, KV = n_kv_heads*head_dim, S seq_len)::

        token_embedding (V, D)   rms_att (L, D)   wq (L, D, D)   wk (L, KV, D)   wv (L, KV, D)
        wo (L, D, D)   rms_ffn (L, D)   w1 (L, H, D)   w2 (L, D, H)   w3 (L, H, D)
        rms_final (D,)   freq_cis_real (S, hd/2)   freq_cis_imag (S, hd/2)   [wcls (V, D)]
    """
    raw = Path(path).read_bytes()
    n_header = len(HEADER_KEYS)
    if len(raw) < 4 * n_header:
        raise ValueError(f"{path}: too small to be a llama2.c checkpoint ({len(raw)} bytes)")
    values = struct.unpack_from(f"<{n_header}i", raw, 0)
    header: dict = dict(zip(HEADER_KEYS, values))
    header["shared_classifier"] = header["vocab_size"] > 0
    header["vocab_size"] = abs(header["vocab_size"])
    if any(header[k] <= 0 for k in HEADER_KEYS):
        raise ValueError(f"{path}: invalid header {header}")
    dim, hidden, n_layers = header["dim"], header["hidden_dim"], header["n_layers"]
    n_heads, n_kv_heads = header["n_heads"], header["n_kv_heads"]
    vocab, seq_len = header["vocab_size"], header["seq_len"]
    if dim % n_heads or n_heads % n_kv_heads or (dim // n_heads) % 2:
        raise ValueError(f"{path}: inconsistent head configuration {header}")
    head_dim = dim // n_heads
    header["head_dim"] = head_dim
    kv_dim = n_kv_heads * head_dim

    shapes: list[tuple[str, tuple[int, ...]]] = [
        ("token_embedding", (vocab, dim)),
        ("rms_att", (n_layers, dim)),
        ("wq", (n_layers, dim, dim)),
        ("wk", (n_layers, kv_dim, dim)),
        ("wv", (n_layers, kv_dim, dim)),
        ("wo", (n_layers, dim, dim)),
        ("rms_ffn", (n_layers, dim)),
        ("w1", (n_layers, hidden, dim)),
        ("w2", (n_layers, dim, hidden)),
        ("w3", (n_layers, hidden, dim)),
        ("rms_final", (dim,)),
        ("freq_cis_real", (seq_len, head_dim // 2)),
        ("freq_cis_imag", (seq_len, head_dim // 2)),
    ]
    if not header["shared_classifier"]:
        shapes.append(("wcls", (vocab, dim)))
    n_floats = sum(int(np.prod(s)) for _, s in shapes)
    expected = 4 * n_header + 4 * n_floats
    if len(raw) != expected:
        raise ValueError(
            f"{path}: size {len(raw)} bytes does not match header {header} "
            f"(expected {expected}); not a legacy v0 llama2.c checkpoint?"
        )
    flat = np.frombuffer(raw, dtype="<f4", offset=4 * n_header, count=n_floats)
    weights: dict[str, np.ndarray] = {}
    offset = 0
    for name, shape in shapes:
        size = int(np.prod(shape))
        weights[name] = flat[offset : offset + size].reshape(shape).astype(np.float32)
        offset += size
    return header, weights


def read_llama2c_tokenizer(path: str | os.PathLike) -> tuple[list[str], list[float]]:
    """Read a llama2.c tokenizer ``.bin``.

    Returns ``(pieces, scores)`` exactly as stored (``"▁"`` rendered as ``" "``, BOS as
    ``"\\n<s>\\n"``); use :func:`to_sentencepiece_pieces` for the sentencepiece spelling.
    """
    raw = Path(path).read_bytes()
    (max_token_len,) = struct.unpack_from("<i", raw, 0)
    offset = 4
    pieces: list[str] = []
    scores: list[float] = []
    while offset < len(raw):
        if offset + 8 > len(raw):
            raise ValueError(f"{path}: truncated record at byte {offset}")
        score, length = struct.unpack_from("<fi", raw, offset)
        offset += 8
        if length < 0 or length > max_token_len + 8 or offset + length > len(raw):
            raise ValueError(f"{path}: bad piece length {length} at byte {offset - 4}")
        pieces.append(raw[offset : offset + length].decode("utf-8"))
        scores.append(float(score))
        offset += length
    if len(set(pieces)) != len(pieces):
        raise ValueError(f"{path}: duplicate pieces in vocabulary")
    return pieces, scores


def to_sentencepiece_pieces(pieces: list[str]) -> list[str]:
    """Map llama2.c-rendered pieces back to sentencepiece spelling.

    ``"\\n<s>\\n"`` -> ``"<s>"``, ``"\\n</s>\\n"`` -> ``"</s>"``, byte pieces unchanged, and
    ``" "`` -> ``"▁"`` in every normal piece.
    """
    out = []
    for p in pieces:
        if p in _SPECIAL_PIECES:
            out.append(_SPECIAL_PIECES[p])
        elif _BYTE_PIECE_RE.match(p):
            out.append(p)
        else:
            out.append(p.replace(" ", SPIECE_UNDERLINE))
    return out


def _special_ids(pieces: list[str]) -> dict[str, int]:
    """Ids of unk/bos/eos in a llama2.c-rendered vocab (run.c assumes BOS=1, EOS=2)."""
    ids = {}
    for raw, name in (("<unk>", "unk"), ("\n<s>\n", "bos"), ("\n</s>\n", "eos")):
        if raw not in pieces:
            raise ValueError(f"tokenizer has no {name} piece {raw!r}")
        ids[name] = pieces.index(raw)
    return ids


def _is_normal_piece(p: str) -> bool:
    return p not in _SPECIAL_PIECES and not _BYTE_PIECE_RE.match(p)


# --------------------------------------------------------------------------------------
# Tokenizer
# --------------------------------------------------------------------------------------
def llama2c_encode(
    text: str, pieces: list[str], scores: list[float], bos: bool = True, eos: bool = False
) -> list[int]:
    """Pure-python port of llama2.c ``run.c`` ``encode()`` (reference for tests).

    ``pieces`` are llama2.c-rendered (spaces, not ``"▁"``). Adds the dummy-prefix ``" "`` when
    ``text`` is non-empty, looks each code point up (byte fallback id = byte + 3 when missing),
    then repeatedly merges the adjacent pair whose concatenation has the highest score (leftmost
    on ties) until no pair is in the vocab.
    """
    lookup = {p: i for i, p in enumerate(pieces)}
    special = _special_ids(pieces)
    tokens: list[int] = []
    if bos:
        tokens.append(special["bos"])
    if text:
        tokens.append(lookup[" "])
    for ch in text:
        if ch in lookup:
            tokens.append(lookup[ch])
        else:
            tokens.extend(b + 3 for b in ch.encode("utf-8"))
    start = 1 if bos else 0  # BOS is never merged: "\n<s>\n"+x is never a piece
    while True:
        best_score, best_id, best_idx = -1e10, -1, -1
        for i in range(start, len(tokens) - 1):
            merged = lookup.get(pieces[tokens[i]] + pieces[tokens[i + 1]])
            if merged is not None and scores[merged] > best_score:
                best_score, best_id, best_idx = scores[merged], merged, i
        if best_idx == -1:
            break
        tokens[best_idx : best_idx + 2] = [best_id]
    if eos:
        tokens.append(special["eos"])
    return tokens


def bpe_merges_from_scores(sp_pieces: list[str], scores: list[float]) -> list[tuple[str, str]]:
    """Derive an ordered BPE merge list from a sentencepiece-BPE vocab with scores.

    Every split ``(left, right)`` of a normal piece into two normal pieces becomes a merge; merges
    are ranked by the merged piece's score (highest first, ties by id), then by the ids of
    ``left`` and ``right``. Special and byte-fallback pieces never take part in merges.
    """
    vocab = {p: i for i, p in enumerate(sp_pieces)}
    normal = {p for p in sp_pieces if _is_normal_piece(p)}
    order = sorted(
        (i for i, p in enumerate(sp_pieces) if p in normal), key=lambda i: (-scores[i], i)
    )
    merges: list[tuple[str, str]] = []
    for i in order:
        piece = sp_pieces[i]
        splits = [
            (piece[:k], piece[k:])
            for k in range(1, len(piece))
            if piece[:k] in normal and piece[k:] in normal
        ]
        splits.sort(key=lambda lr: (vocab[lr[0]], vocab[lr[1]]))
        merges.extend(splits)
    return merges


def build_hf_tokenizer(
    pieces: list[str], scores: list[float], model_max_length: int = 512
) -> LlamaTokenizer:
    """Build a transformers ``LlamaTokenizer`` (tokenizers-backed) from llama2.c pieces/scores.

    Adds :data:`PAD_TOKEN` as id ``len(pieces)``; BOS is prepended on encode, EOS is not.
    """
    sp_pieces = to_sentencepiece_pieces(pieces)
    special = _special_ids(pieces)
    if special != {"unk": 0, "bos": 1, "eos": 2}:
        raise ValueError(f"expected unk/bos/eos at ids 0/1/2 as in run.c, got {special}")
    vocab = {p: i for i, p in enumerate(sp_pieces)}
    tok = LlamaTokenizer(
        vocab=vocab,
        merges=bpe_merges_from_scores(sp_pieces, scores),
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="</s>",
        pad_token=PAD_TOKEN,
        add_bos_token=True,
        add_eos_token=False,
        add_prefix_space=True,
        legacy=False,
        model_max_length=model_max_length,
        padding_side="left",
    )
    if tok.convert_tokens_to_ids(PAD_TOKEN) != len(pieces):
        raise RuntimeError("pad token did not land at id len(vocab)")
    return tok


# --------------------------------------------------------------------------------------
# Model
# --------------------------------------------------------------------------------------
def permute_for_rotate_half(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Reorder q/k projection rows from adjacent-pair RoPE to HF rotate-half RoPE.

    ``w``: (n_heads * head_dim, in). Within each head, output row ``2j + c`` (pair ``j``,
    component ``c``) moves to ``c * head_dim/2 + j``.
    """
    out_dim, in_dim = w.shape
    head_dim = out_dim // n_heads
    return (
        w.reshape(n_heads, head_dim // 2, 2, in_dim)
        .transpose(0, 2, 1, 3)
        .reshape(out_dim, in_dim)
        .copy()
    )


def _check_rope(header: dict, weights: dict[str, np.ndarray], theta: float = ROPE_THETA) -> None:
    """Check the stored freq_cis tables match standard RoPE with base ``theta``."""
    hd = header["head_dim"]
    inv_freq_F = theta ** (-np.arange(0, hd, 2, dtype=np.float64) / hd)
    angles_SF = np.arange(header["seq_len"], dtype=np.float64)[:, None] * inv_freq_F[None, :]
    ok = np.allclose(weights["freq_cis_real"], np.cos(angles_SF), atol=1e-3) and np.allclose(
        weights["freq_cis_imag"], np.sin(angles_SF), atol=1e-3
    )
    if not ok:
        raise ValueError(f"freq_cis tables do not match RoPE with theta={theta}")


def build_hf_config(header: dict, n_extra_tokens: int = 1) -> LlamaConfig:
    """``LlamaConfig`` for a llama2.c header; vocab grows by ``n_extra_tokens`` (the pad)."""
    vocab = header["vocab_size"]
    return LlamaConfig(
        vocab_size=vocab + n_extra_tokens,
        hidden_size=header["dim"],
        intermediate_size=header["hidden_dim"],
        num_hidden_layers=header["n_layers"],
        num_attention_heads=header["n_heads"],
        num_key_value_heads=header["n_kv_heads"],
        head_dim=header["head_dim"],
        hidden_act="silu",
        max_position_embeddings=header["seq_len"],
        rms_norm_eps=RMS_NORM_EPS,
        rope_parameters={"rope_type": "default", "rope_theta": ROPE_THETA},
        tie_word_embeddings=header["shared_classifier"],
        attention_bias=False,
        attention_dropout=0.0,
        mlp_bias=False,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=vocab if n_extra_tokens else None,
        use_cache=True,
    )


def build_hf_state_dict(
    header: dict, weights: dict[str, np.ndarray], n_extra_tokens: int = 1
) -> dict[str, torch.Tensor]:
    """Map llama2.c weights to ``LlamaForCausalLM`` parameter names (float32 tensors).

    The embedding (and untied classifier) gets ``n_extra_tokens`` zero rows appended:
    ``model.embed_tokens.weight`` is (V + n_extra_tokens, D).
    """

    def t(a: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32))

    def pad_rows(a_VD: np.ndarray) -> np.ndarray:
        return np.concatenate([a_VD, np.zeros((n_extra_tokens, a_VD.shape[1]), np.float32)], 0)

    sd: dict[str, torch.Tensor] = {
        "model.embed_tokens.weight": t(pad_rows(weights["token_embedding"]))
    }
    for i in range(header["n_layers"]):
        p = f"model.layers.{i}."
        sd[p + "input_layernorm.weight"] = t(weights["rms_att"][i])
        sd[p + "self_attn.q_proj.weight"] = t(
            permute_for_rotate_half(weights["wq"][i], header["n_heads"])
        )
        sd[p + "self_attn.k_proj.weight"] = t(
            permute_for_rotate_half(weights["wk"][i], header["n_kv_heads"])
        )
        sd[p + "self_attn.v_proj.weight"] = t(weights["wv"][i])
        sd[p + "self_attn.o_proj.weight"] = t(weights["wo"][i])
        sd[p + "post_attention_layernorm.weight"] = t(weights["rms_ffn"][i])
        sd[p + "mlp.gate_proj.weight"] = t(weights["w1"][i])
        sd[p + "mlp.up_proj.weight"] = t(weights["w3"][i])
        sd[p + "mlp.down_proj.weight"] = t(weights["w2"][i])
    sd["model.norm.weight"] = t(weights["rms_final"])
    if header["shared_classifier"]:
        sd["lm_head.weight"] = sd["model.embed_tokens.weight"]
    else:
        sd["lm_head.weight"] = t(pad_rows(weights["wcls"]))
    return sd


def _sha256(path: str | os.PathLike) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def convert(
    checkpoint: str | os.PathLike,
    tokenizer: str | os.PathLike,
    out_dir: str | os.PathLike,
    overwrite: bool = False,
) -> Path:
    """Convert a llama2.c checkpoint + tokenizer into an HF directory at ``out_dir``.

    Writes ``config.json``, ``generation_config.json``, ``model.safetensors``,
    ``tokenizer.json``, ``tokenizer_config.json`` and ``llama2c_conversion.json`` (provenance).
    The directory is built in a sibling ``<out_dir>.tmp-XXXX`` and renamed into place, so a
    reader never sees a half-written model. Raises ``FileExistsError`` if ``out_dir`` exists and
    ``overwrite`` is False. Returns ``out_dir`` as a ``Path``.
    """
    out = Path(out_dir).resolve()
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} exists (pass overwrite=True / --overwrite)")

    header, weights = read_llama2c_checkpoint(checkpoint)
    pieces, scores = read_llama2c_tokenizer(tokenizer)
    if len(pieces) != header["vocab_size"]:
        raise ValueError(
            f"tokenizer has {len(pieces)} pieces but checkpoint vocab_size={header['vocab_size']}"
        )
    _check_rope(header, weights)

    config = build_hf_config(header, n_extra_tokens=1)
    state_dict = build_hf_state_dict(header, weights, n_extra_tokens=1)
    with torch.random.fork_rng(devices=[]):  # random init is overwritten; keep caller's RNG
        model = LlamaForCausalLM(config)
    model.load_state_dict(state_dict, strict=True)
    if header["shared_classifier"]:
        model.tie_weights()
    model.eval()
    pad_id = header["vocab_size"]
    model.generation_config = GenerationConfig(
        bos_token_id=1,
        eos_token_id=[2, 1],  # </s>, and BOS which run.c treats as end of document
        pad_token_id=pad_id,
        suppress_tokens=[pad_id],
    )
    tok = build_hf_tokenizer(pieces, scores, model_max_length=header["seq_len"])

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=out.name + ".tmp-", dir=out.parent))
    try:
        tmp.chmod(0o755)  # mkdtemp creates 0700; the final directory should be shareable
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        info = {
            "source_checkpoint": str(Path(checkpoint).resolve()),
            "source_checkpoint_sha256": _sha256(checkpoint),
            "source_tokenizer": str(Path(tokenizer).resolve()),
            "source_tokenizer_sha256": _sha256(tokenizer),
            "llama2c_header": header,
            "pad_token": PAD_TOKEN,
            "pad_token_id": pad_id,
            "notes": "wq/wk rows permuted from adjacent-pair RoPE to rotate-half; pad row is zero; "
            "mask logits[..., pad_token_id] when sampling outside generate().",
        }
        (tmp / "llama2c_conversion.json").write_text(json.dumps(info, indent=2) + "\n")
        for f in tmp.iterdir():
            f.chmod(0o644)
        if out.exists():
            old = Path(tempfile.mkdtemp(prefix=out.name + ".old-", dir=out.parent))
            os.replace(out, old / "old")
            try:
                os.replace(tmp, out)
            except BaseException:
                os.replace(old / "old", out)  # put the previous model back
                raise
            finally:
                shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out
