"""Tests for the llama2.c -> Hugging Face converter (stories260K).

The reference is an *independent* numpy port of llama2.c's ``run.c`` forward pass (its own
``.bin`` reader, adjacent-pair RoPE, GQA, RMSNorm, SwiGLU) run in float64, plus the greedy sample
published in llama2.c's ``doc/stories260K.md``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from rlhfstack.models.llama2c import (
    PAD_TOKEN,
    convert,
    llama2c_encode,
    permute_for_rotate_half,
    read_llama2c_checkpoint,
    read_llama2c_tokenizer,
)

REPO_ROOT = Path(__file__).resolve().parents[1]
DATA_ROOT = Path(os.environ.get("RLHF_DATA_ROOT", REPO_ROOT.parent / "shared" / "data"))
MODEL_DIR = DATA_ROOT / "models" / "stories260K"
CKPT = MODEL_DIR / "stories260K.bin"
TOK = MODEL_DIR / "tok512.bin"

pytestmark = pytest.mark.skipif(
    not (CKPT.is_file() and TOK.is_file()),
    reason=f"stories260K files not found under {MODEL_DIR} (set RLHF_DATA_ROOT)",
)

# llama2.c doc/stories260K.md: `./run stories260K.bin -z tok512.bin -t 0.0` (256 tokens after BOS).
DOC_GREEDY_SAMPLE = (
    "Once upon a time, there was a little girl named Lily. She loved to play outside in the park. "
    "One day, she saw a big, red ball. She wanted to play with it, but it was too high.\n"
    "Lily's mom said, \"Lily, let's go to the park.\" Lily was sad and didn't know what to do. "
    'She said, "I want to play with your ball, but I can\'t find it."\n'
    "Lily was sad and didn't know what to do. She said, \"I'm sorry, Lily. I didn't know what to "
    'do."\n'
    "Lily didn't want to help her mom, so she said, \"I'm sorry, mom. I didn't know what to do.\" "
    "Her mom said, \"Don't worry, Lily. We can help you."
)
KNOWN_START = (
    "Once upon a time, there was a little girl named Lily. She loved to play outside in the park. "
    "One day, she saw a big, red ball."
)
STORY_SENTENCES = [
    "Once upon a time",
    "Once upon a time, there was a little girl named Lily.",
    'Tim said, "Can I play with your red ball?" Lily smiled and said, "Yes!"',
    "The dog ran to the park.\nHe was very happy.",
    "It's 3 o'clock... time for a nap; Mom—said \u201cnow\u201d!",
    "Caf\u00e9 na\u00efve \u2603 \u65e5\u672c \U0001f916 tabs\tand  two spaces",
]


# --------------------------------------------------------------------------------------
# Independent llama2.c reference (numpy, float64)
# --------------------------------------------------------------------------------------
class Llama2cReference:
    """Straight port of run.c's ``forward`` for a legacy v0 checkpoint."""

    def __init__(self, path: Path) -> None:
        dim, hidden, n_layers, n_heads, n_kv, vocab, seq_len = np.fromfile(path, "<i4", count=7)
        self.shared = vocab > 0
        vocab = abs(int(vocab))
        hd = dim // n_heads
        self.dim, self.n_layers, self.n_heads, self.n_kv, self.hd = dim, n_layers, n_heads, n_kv, hd
        self.vocab, self.seq_len = vocab, seq_len
        flat = np.fromfile(path, "<f4", offset=28).astype(np.float64)
        kv = n_kv * hd
        pos = 0

        def take(*shape: int) -> np.ndarray:
            nonlocal pos
            n = int(np.prod(shape))
            out = flat[pos : pos + n].reshape(shape)
            pos += n
            return out

        self.emb = take(vocab, dim)
        self.rms_att = take(n_layers, dim)
        self.wq = take(n_layers, dim, dim)
        self.wk = take(n_layers, kv, dim)
        self.wv = take(n_layers, kv, dim)
        self.wo = take(n_layers, dim, dim)
        self.rms_ffn = take(n_layers, dim)
        self.w1 = take(n_layers, hidden, dim)
        self.w2 = take(n_layers, dim, hidden)
        self.w3 = take(n_layers, hidden, dim)
        self.rms_final = take(dim)
        take(seq_len, hd // 2)  # freq_cis_real (run.c recomputes it)
        take(seq_len, hd // 2)  # freq_cis_imag
        self.wcls = self.emb if self.shared else take(vocab, dim)
        assert pos == flat.size

    @staticmethod
    def _rmsnorm(x_TD: np.ndarray, w_D: np.ndarray) -> np.ndarray:
        return x_TD / np.sqrt(np.mean(x_TD**2, axis=-1, keepdims=True) + 1e-5) * w_D

    def _rope_adjacent(self, x_THd: np.ndarray) -> np.ndarray:
        """Rotate pairs (2j, 2j+1) by pos * 10000^(-2j/hd), as run.c does."""
        T = x_THd.shape[0]
        freq_F = 1.0 / 10000.0 ** (np.arange(0, self.hd, 2) / self.hd)
        ang_TF = np.arange(T)[:, None] * freq_F[None, :]
        cos, sin = np.cos(ang_TF)[:, None, :], np.sin(ang_TF)[:, None, :]
        x0, x1 = x_THd[..., 0::2], x_THd[..., 1::2]
        out = np.empty_like(x_THd)
        out[..., 0::2] = x0 * cos - x1 * sin
        out[..., 1::2] = x0 * sin + x1 * cos
        return out

    def logits(self, tokens: list[int]) -> np.ndarray:
        """Logits (T, V) for every position of ``tokens`` (causal)."""
        T = len(tokens)
        x_TD = self.emb[np.asarray(tokens)]
        kv_mul = self.n_heads // self.n_kv
        causal_TT = np.tril(np.ones((T, T), dtype=bool))
        for layer in range(self.n_layers):
            h_TD = self._rmsnorm(x_TD, self.rms_att[layer])
            q = self._rope_adjacent((h_TD @ self.wq[layer].T).reshape(T, self.n_heads, self.hd))
            k = self._rope_adjacent((h_TD @ self.wk[layer].T).reshape(T, self.n_kv, self.hd))
            v = (h_TD @ self.wv[layer].T).reshape(T, self.n_kv, self.hd)
            att_out = np.empty((T, self.n_heads, self.hd))
            for head in range(self.n_heads):
                kvh = head // kv_mul
                s_TT = q[:, head] @ k[:, kvh].T / np.sqrt(self.hd)
                s_TT = np.where(causal_TT, s_TT, -np.inf)
                p_TT = np.exp(s_TT - s_TT.max(-1, keepdims=True))
                p_TT /= p_TT.sum(-1, keepdims=True)
                att_out[:, head] = p_TT @ v[:, kvh]
            x_TD = x_TD + att_out.reshape(T, self.dim) @ self.wo[layer].T
            h_TD = self._rmsnorm(x_TD, self.rms_ffn[layer])
            g_TH = h_TD @ self.w1[layer].T
            u_TH = h_TD @ self.w3[layer].T
            x_TD = x_TD + (g_TH / (1 + np.exp(-g_TH)) * u_TH) @ self.w2[layer].T
        return self._rmsnorm(x_TD, self.rms_final) @ self.wcls.T

    def greedy(self, prompt: list[int], max_new_tokens: int) -> list[int]:
        """run.c at temperature 0: argmax, stop when BOS (=1) is produced."""
        tokens = list(prompt)
        for _ in range(max_new_tokens):
            nxt = int(np.argmax(self.logits(tokens)[-1]))
            if nxt == 1:
                break
            tokens.append(nxt)
        return tokens


# --------------------------------------------------------------------------------------
# Fixtures
# --------------------------------------------------------------------------------------
@pytest.fixture(scope="module", autouse=True)
def _single_thread():
    """A 64-dim model gains nothing from intra-op threads; on a busy 2-core box they hurt a lot."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def hf_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return convert(CKPT, TOK, tmp_path_factory.mktemp("llama2c") / "stories260K-hf")


@pytest.fixture(scope="session")
def hf_model(hf_dir: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(hf_dir).eval()


@pytest.fixture(scope="session")
def hf_tok(hf_dir: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(hf_dir)


@pytest.fixture(scope="session")
def ref() -> Llama2cReference:
    return Llama2cReference(CKPT)


@pytest.fixture(scope="session")
def l2c_vocab() -> tuple[list[str], list[float]]:
    return read_llama2c_tokenizer(TOK)


# --------------------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------------------
def test_read_checkpoint_header_and_shapes():
    header, w = read_llama2c_checkpoint(CKPT)
    assert {k: header[k] for k in ("dim", "hidden_dim", "n_layers", "n_heads", "n_kv_heads")} == {
        "dim": 64,
        "hidden_dim": 172,
        "n_layers": 5,
        "n_heads": 8,
        "n_kv_heads": 4,
    }
    assert header["vocab_size"] == 512 and header["seq_len"] == 512
    assert header["shared_classifier"] is True and "wcls" not in w
    assert w["wq"].shape == (5, 64, 64) and w["wk"].shape == (5, 32, 64)
    assert w["w2"].shape == (5, 64, 172) and w["freq_cis_real"].shape == (512, 4)
    assert sum(a.size for a in w.values()) == 264_128  # all fp32 values, freq_cis tables included


def test_read_checkpoint_rejects_truncated(tmp_path: Path):
    bad = tmp_path / "bad.bin"
    bad.write_bytes(CKPT.read_bytes()[:-4])
    with pytest.raises(ValueError, match="does not match header"):
        read_llama2c_checkpoint(bad)


def test_read_tokenizer(l2c_vocab):
    pieces, scores = l2c_vocab
    assert len(pieces) == len(scores) == 512
    assert pieces[:3] == ["<unk>", "\n<s>\n", "\n</s>\n"]
    assert pieces[3] == "<0x00>" and pieces[258] == "<0xFF>"
    assert pieces[403] == " Once"  # "▁" is rendered as a space in tok512.bin


# --------------------------------------------------------------------------------------
# Model
# --------------------------------------------------------------------------------------
def test_permute_for_rotate_half_matches_adjacent_rope():
    """Adjacent-pair RoPE on W x equals rotate-half RoPE on (P W) x, up to the same row order."""
    rng = np.random.default_rng(0)
    n_heads, hd, d_in = 2, 8, 5
    w = rng.normal(size=(n_heads * hd, d_in))
    x = rng.normal(size=d_in)
    pos = 7
    freq = 1.0 / 10000.0 ** (np.arange(0, hd, 2) / hd)
    cos, sin = np.cos(pos * freq), np.sin(pos * freq)

    y = (w @ x).reshape(n_heads, hd)
    adj = np.empty_like(y)
    adj[:, 0::2] = y[:, 0::2] * cos - y[:, 1::2] * sin
    adj[:, 1::2] = y[:, 0::2] * sin + y[:, 1::2] * cos

    z = (permute_for_rotate_half(w, n_heads) @ x).reshape(n_heads, hd)
    z1, z2 = z[:, : hd // 2], z[:, hd // 2 :]
    half = np.concatenate([z1 * cos - z2 * sin, z1 * sin + z2 * cos], axis=1)
    # rotate-half layout [even components..., odd components...] per head
    np.testing.assert_allclose(half[:, : hd // 2], adj[:, 0::2], atol=1e-12)
    np.testing.assert_allclose(half[:, hd // 2 :], adj[:, 1::2], atol=1e-12)


def test_output_directory(hf_dir: Path, hf_model):
    names = {p.name for p in hf_dir.iterdir()}
    assert {"config.json", "generation_config.json", "model.safetensors", "tokenizer.json"} <= names
    assert not [p for p in hf_dir.parent.iterdir() if ".tmp-" in p.name]
    cfg = hf_model.config
    assert (cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers) == (64, 172, 5)
    assert (cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim) == (8, 4, 8)
    assert cfg.rms_norm_eps == 1e-5 and cfg.max_position_embeddings == 512
    assert cfg.rope_parameters["rope_theta"] == 10000.0
    assert cfg.tie_word_embeddings is True and cfg.attention_dropout == 0.0
    assert (cfg.vocab_size, cfg.bos_token_id, cfg.eos_token_id, cfg.pad_token_id) == (
        513,
        1,
        2,
        512,
    )
    emb = hf_model.get_input_embeddings().weight
    assert emb.shape == (513, 64)
    assert hf_model.get_output_embeddings().weight.data_ptr() == emb.data_ptr()
    assert torch.count_nonzero(emb[512]) == 0
    gen = json.loads((hf_dir / "generation_config.json").read_text())
    assert gen["suppress_tokens"] == [512] and gen["pad_token_id"] == 512
    assert gen["eos_token_id"] == [2, 1]


def test_logits_match_reference(hf_model, hf_tok, ref: Llama2cReference):
    ids = hf_tok("Once upon a time, there was a little girl named Lily. She").input_ids
    rng = np.random.default_rng(0)
    ids = ids + rng.integers(3, 512, size=20).tolist()  # also arbitrary (incl. byte) tokens
    with torch.no_grad():
        logits_TV = hf_model(torch.tensor([ids])).logits[0].double().numpy()
    ref_TV = ref.logits(ids)
    assert logits_TV.shape == (len(ids), 513)
    np.testing.assert_allclose(logits_TV[:, :512], ref_TV, atol=1e-4, rtol=0)
    assert np.all(logits_TV[:, 512] == 0.0)  # zero pad row -> logit exactly 0


def test_greedy_matches_reference_and_known_sample(hf_model, hf_tok, ref: Llama2cReference):
    prompt = hf_tok("Once upon a time").input_ids
    assert prompt[0] == 1
    expected = ref.greedy(prompt, max_new_tokens=60)
    with torch.no_grad():
        out = hf_model.generate(
            torch.tensor([prompt]), do_sample=False, max_new_tokens=60, attention_mask=None
        )[0].tolist()
    assert out == expected
    assert hf_tok.decode(out, skip_special_tokens=True).startswith(KNOWN_START)


def test_greedy_from_bos_reproduces_llama2c_doc(hf_model, hf_tok):
    """`./run stories260K.bin -z tok512.bin -t 0.0` (steps=256): BOS then 256 greedy tokens."""
    with torch.no_grad():
        out = hf_model.generate(torch.tensor([[1]]), do_sample=False, max_new_tokens=256)[0]
    assert len(out) == 257 and 512 not in out.tolist()
    assert hf_tok.decode(out, skip_special_tokens=True) == DOC_GREEDY_SAMPLE


# --------------------------------------------------------------------------------------
# Tokenizer
# --------------------------------------------------------------------------------------
def test_tokenizer_special_tokens(hf_tok):
    assert len(hf_tok) == 513
    assert (hf_tok.unk_token_id, hf_tok.bos_token_id, hf_tok.eos_token_id) == (0, 1, 2)
    assert hf_tok.pad_token == PAD_TOKEN and hf_tok.pad_token_id == 512
    assert len({hf_tok.bos_token_id, hf_tok.eos_token_id, hf_tok.pad_token_id}) == 3
    ids = hf_tok("Once upon a time").input_ids
    assert ids == [1, 403, 407, 261, 378]  # BOS added, no EOS
    assert hf_tok("Once", add_special_tokens=False).input_ids == [403]
    batch = hf_tok(["Hi", "Once upon a time"], padding=True)
    assert batch.input_ids[0][0] == 512 and batch.attention_mask[0][0] == 0


@pytest.mark.parametrize("text", STORY_SENTENCES + ["", "x\n\ny"])
def test_tokenizer_matches_llama2c_encode(hf_tok, l2c_vocab, text: str):
    pieces, scores = l2c_vocab
    assert hf_tok(text).input_ids == llama2c_encode(text, pieces, scores, bos=True)


@pytest.mark.parametrize("text", STORY_SENTENCES)
def test_tokenizer_round_trip(hf_tok, text: str):
    ids = hf_tok(text).input_ids
    assert ids[0] == 1 and 2 not in ids and 512 not in ids
    assert hf_tok.decode(ids, skip_special_tokens=True) == text


def test_tokenizer_leading_space_difference(hf_tok, l2c_vocab):
    """Documented difference: HF does not add a second dummy-prefix space (run.c does)."""
    pieces, scores = l2c_vocab
    assert llama2c_encode(" Once", pieces, scores) == [1, 410, 403]
    assert hf_tok(" Once").input_ids == [1, 403]


# --------------------------------------------------------------------------------------
# CLI / atomic output
# --------------------------------------------------------------------------------------
def test_cli_overwrite(tmp_path: Path):
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "convert_llama2c_to_hf", REPO_ROOT / "tools" / "convert_llama2c_to_hf.py"
    )
    cli = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cli)
    out = tmp_path / "m"
    args = ["--checkpoint", str(CKPT), "--tokenizer", str(TOK), "--out", str(out)]
    assert cli.main(args) == 0 and (out / "model.safetensors").is_file()
    (out / "stale.txt").write_text("old")
    with pytest.raises(SystemExit):
        cli.main(args)
    with pytest.raises(FileExistsError):
        convert(CKPT, TOK, out)
    assert cli.main(args + ["--overwrite"]) == 0
    assert not (out / "stale.txt").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]


def test_convert_unshared_classifier_synthetic(tmp_path: Path):
    """A random llama2.c model with an untied classifier (negative vocab_size in the header)."""
    from transformers import AutoModelForCausalLM

    dim, hidden, n_layers, n_heads, n_kv, vocab, seq_len = 16, 40, 2, 4, 2, 512, 32
    hd, kv = dim // n_heads, n_kv * dim // n_heads
    rng = np.random.default_rng(0)
    freq_F = 10000.0 ** (-np.arange(0, hd, 2) / hd)
    ang_SF = np.arange(seq_len)[:, None] * freq_F[None, :]
    parts = [
        rng.normal(size=(vocab, dim)),
        1 + 0.1 * rng.normal(size=(n_layers, dim)),
        *(0.3 * rng.normal(size=s) for s in [(n_layers, dim, dim), (n_layers, kv, dim)]),
        0.3 * rng.normal(size=(n_layers, kv, dim)),
        0.3 * rng.normal(size=(n_layers, dim, dim)),
        1 + 0.1 * rng.normal(size=(n_layers, dim)),
        *(0.3 * rng.normal(size=s) for s in [(n_layers, hidden, dim), (n_layers, dim, hidden)]),
        0.3 * rng.normal(size=(n_layers, hidden, dim)),
        1 + 0.1 * rng.normal(size=dim),
        np.cos(ang_SF),
        np.sin(ang_SF),
        rng.normal(size=(vocab, dim)),  # wcls
    ]
    ckpt = tmp_path / "tiny.bin"
    header = np.array([dim, hidden, n_layers, n_heads, n_kv, -vocab, seq_len], "<i4")
    ckpt.write_bytes(header.tobytes() + b"".join(p.astype("<f4").tobytes() for p in parts))

    out = convert(ckpt, TOK, tmp_path / "tiny-hf")
    model = AutoModelForCausalLM.from_pretrained(out).eval()
    assert model.config.tie_word_embeddings is False
    lm_head = model.get_output_embeddings().weight
    assert lm_head.data_ptr() != model.get_input_embeddings().weight.data_ptr()
    assert torch.count_nonzero(lm_head[vocab]) == 0
    ids = rng.integers(0, vocab, size=12).tolist()
    with torch.no_grad():
        logits_TV = model(torch.tensor([ids])).logits[0].double().numpy()
    np.testing.assert_allclose(logits_TV[:, :vocab], Llama2cReference(ckpt).logits(ids), atol=1e-4)
