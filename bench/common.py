"""Shared pieces of the benchmark: model sizes, synthetic data, timing and memory probes.

This module imports only the standard library, torch and transformers, because it runs in
three interpreters: the project's ``.venv`` ("ours") and the TRL venvs (``.venv-bench-trl``
with trl 1.16.0, ``.venv-bench-trl112`` with trl 1.12.0 for PPOTrainer).

Every side loads the same random-initialized Llama from ``runs/bench/models/<size>`` (written
once by :func:`build_model_dir`) and the same Llama-2 SentencePiece tokenizer (32,000 tokens,
PAD = ``<unk>`` (id 0), distinct from EOS (id 2)).
"""

from __future__ import annotations

import json
import os
import random
import resource
import statistics
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
DATA_ROOT = Path(os.environ.get("RLHF_DATA_ROOT", REPO.parent / "shared" / "data"))
TOKENIZER_MODEL = DATA_ROOT / "models" / "llama2-tokenizer" / "tokenizer.model"

#: Llama shapes. ``35m``: hidden 512, 8 layers, 8 heads and the Llama-2 vocabulary (32,000,
#: tied input/output embeddings) make 35.69M parameters with a SwiGLU width of 888.
SIZES: dict[str, dict[str, int]] = {
    "tiny": dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64),
    "5m": dict(hidden_size=128, num_hidden_layers=4, num_attention_heads=4, intermediate_size=344),
    "35m": dict(hidden_size=512, num_hidden_layers=8, num_attention_heads=8, intermediate_size=888),
}

#: The peer's shape: batch 8 sequences per optimizer step, prompt 128 + completion 64 tokens.
BATCH = 8
PROMPT_LEN = 128
COMPLETION_LEN = 64
GRPO_PROMPTS = 2
GRPO_GENERATIONS = 4
LR = 1e-6
SEED = 0
VOCAB = 32000
PAD_ID, BOS_ID, EOS_ID = 0, 1, 2


def set_threads(n: int = 2) -> None:
    """Pin intra-op threads (both sides use the same count)."""
    import torch

    torch.set_num_threads(n)
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:  # already set
        pass


def build_model_dir(size: str, out: Path) -> Path:
    """Write ``out`` = random-init LlamaForCausalLM (seed 0) + tokenizer, once."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, LlamaTokenizer

    if (out / "config.json").exists() and (out / "tokenizer_config.json").exists():
        return out
    tmp = out.with_name(out.name + ".tmp")
    tmp.mkdir(parents=True, exist_ok=True)
    (tmp / "tokenizer.model").write_bytes(TOKENIZER_MODEL.read_bytes())
    tok = LlamaTokenizer.from_pretrained(str(tmp))
    tok.pad_token = tok.unk_token  # id 0: a dedicated PAD, distinct from EOS
    cfg = LlamaConfig(
        vocab_size=VOCAB,
        max_position_embeddings=512,
        tie_word_embeddings=True,
        bos_token_id=BOS_ID,
        eos_token_id=EOS_ID,
        pad_token_id=PAD_ID,
        num_key_value_heads=SIZES[size]["num_attention_heads"],
        **SIZES[size],
    )
    torch.manual_seed(SEED)
    model = LlamaForCausalLM(cfg)
    model.generation_config.pad_token_id = PAD_ID
    model.save_pretrained(str(tmp))
    tok.save_pretrained(str(tmp))
    (tmp / "tokenizer.model").unlink(missing_ok=True)
    os.replace(tmp, out)
    return out


def n_params(model_dir: Path) -> int:
    """Parameter count of the saved model (tied embeddings counted once)."""
    from safetensors import safe_open

    n = 0
    with safe_open(str(Path(model_dir) / "model.safetensors"), "pt") as f:
        for k in f.keys():
            n += _prod(f.get_slice(k).get_shape())
    return n


def _prod(shape: list[int]) -> int:
    out = 1
    for s in shape:
        out *= s
    return out


# ----------------------------------------------------------------------------- data


def _rng(tag: str) -> random.Random:
    return random.Random(f"{SEED}-{tag}")


def random_ids(n: int, length: int, tag: str) -> list[list[int]]:
    """``n`` sequences of ``length`` token ids drawn from the ordinary vocabulary (no specials)."""
    r = _rng(tag)
    return [[r.randrange(3, VOCAB) for _ in range(length)] for _ in range(n)]


def prompt_rows(n: int) -> list[list[int]]:
    """``n`` 128-token prompts (BOS first), for sides that take token ids."""
    return [[BOS_ID, *p] for p in random_ids(n, PROMPT_LEN - 1, "rl-prompt")]


_POOL: list[str] | None = None


def word_pool(tokenizer: Any) -> list[str]:
    """Words that are one vocabulary piece each and encode back to it, so that a text of N of
    them, space-separated, tokenizes to exactly N tokens (TRL's DPO and GRPO trainers take
    text and tokenize it themselves)."""
    global _POOL
    if _POOL is None:
        vocab = tokenizer.convert_ids_to_tokens(list(range(3, VOCAB)))
        words = sorted(
            t[1:] for t in vocab if t.startswith("\u2581") and t[1:].isalpha() and len(t) > 3
        )
        words = _rng("pool").sample(words, 2000)
        ids = tokenizer(words, add_special_tokens=False)["input_ids"]
        _POOL = [w for w, i in zip(words, ids) if len(i) == 1]
    return _POOL


def _text(tokenizer: Any, n_words: int, r: random.Random) -> str:
    pool = word_pool(tokenizer)
    return " ".join(r.choice(pool) for _ in range(n_words))


def text_prompts(tokenizer: Any, n: int) -> list[str]:
    """``n`` text prompts of exactly 128 tokens."""
    r = _rng("text-prompt")
    return [_text(tokenizer, PROMPT_LEN, r) for _ in range(n)]


def preference_texts(tokenizer: Any, n: int) -> list[dict[str, str]]:
    """``n`` pairs as text: a 128-token prompt, 63-token chosen / rejected (each starts with a
    space; EOS is appended by whoever tokenizes, so completions are 64 tokens)."""
    r = _rng("pref")
    return [
        {
            "prompt": _text(tokenizer, PROMPT_LEN, r),
            "chosen": " " + _text(tokenizer, COMPLETION_LEN - 1, r),
            "rejected": " " + _text(tokenizer, COMPLETION_LEN - 1, r),
        }
        for _ in range(n)
    ]


def preference_rows(tokenizer: Any, n: int) -> list[dict[str, list[int]]]:
    """The pairs of :func:`preference_texts` as ids: prompt 128, chosen / rejected 64 (EOS last)."""
    rows = []
    for t in preference_texts(tokenizer, n):
        enc = tokenizer(
            [t["prompt"], t["chosen"].strip(), t["rejected"].strip()], add_special_tokens=False
        )
        p, c, rj = enc["input_ids"]
        assert len(p) == PROMPT_LEN and len(c) == len(rj) == COMPLETION_LEN - 1, (
            len(p),
            len(c),
            len(rj),
        )
        rows.append({"prompt_ids": p, "chosen_ids": [*c, EOS_ID], "rejected_ids": [*rj, EOS_ID]})
    return rows


# ----------------------------------------------------------------------------- measuring


def peak_rss_mb() -> float:
    """Peak resident set size of this process so far (MiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


class StepTimer:
    """Wall time between consecutive ``tick()`` calls (one tick per optimizer step)."""

    def __init__(self) -> None:
        self.last: float | None = None
        self.times: list[float] = []

    def start(self) -> None:
        self.last = time.perf_counter()

    def tick(self) -> None:
        now = time.perf_counter()
        if self.last is not None:
            self.times.append(now - self.last)
        self.last = now


def summarize(
    times: list[float], warmup: int, extra: dict[str, Any] | None = None
) -> dict[str, Any]:
    """Median seconds per step over ``times[warmup:]`` plus the raw list and peak RSS."""
    kept = times[warmup:]
    if not kept:
        raise RuntimeError(f"no timed steps ({len(times)} steps, warmup {warmup})")
    return {
        "s_per_step": statistics.median(kept),
        "steps_timed": len(kept),
        "times": [round(t, 4) for t in times],
        "peak_rss_mb": round(peak_rss_mb(), 1),
        **(extra or {}),
    }


def emit(result: dict[str, Any], out: str | None) -> None:
    """Write the child's result as JSON (to ``out`` or stdout)."""
    text = json.dumps(result, indent=2)
    if out:
        Path(out).write_text(text)
    else:
        sys.stdout.write(text + "\n")
