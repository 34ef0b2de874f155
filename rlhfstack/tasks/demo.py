"""Glue for the embedded demo: base-model assets and the calibrated gold reward.

The gold reward's fluency calibration (``f0``, ``f_scale``) is fitted once on base-model samples
by the data stage and saved to ``<artifacts>/data/gold.json``; every later consumer (PPO's
periodic gold evaluation, the evaluation stage) rebuilds the same function from that file.
"""

from __future__ import annotations

import json
import logging
import os
import re
from pathlib import Path
from typing import Any

from rlhfstack.models.core import load_causal_lm, load_tokenizer
from rlhfstack.models.llama2c import convert
from rlhfstack.progress import Progress
from rlhfstack.rollout.generate import sample_texts
from rlhfstack.runtime import atomic_write_json
from rlhfstack.tasks.stories import GoldReward

log = logging.getLogger("rlhfstack.demo")

HUB_REPO = "karpathy/tinyllamas"
HUB_FILES = {
    "stories260K.bin": "stories260K/stories260K.bin",
    "tok512.bin": "stories260K/tok512.bin",
}


def ensure_base_model(out_dir: str | os.PathLike, data_root: str | os.PathLike) -> Path:
    """Convert stories260K (llama2.c) to an HF directory at ``out_dir`` unless it exists.

    The checkpoint is read from ``<data_root>/models/stories260K``; where that folder is absent
    (a user's machine), it is first downloaded from its public home, the hub repo
    ``karpathy/tinyllamas`` (folder ``stories260K``), into the data root.
    """

    out = Path(out_dir)
    if (out / "config.json").exists():
        return out
    src = Path(data_root) / "models" / "stories260K"
    if not (src / "stories260K.bin").exists() or not (src / "tok512.bin").exists():
        from huggingface_hub import hf_hub_download

        src.mkdir(parents=True, exist_ok=True)
        for name, remote in HUB_FILES.items():
            log.info("downloading %s/%s", HUB_REPO, remote)
            p = hf_hub_download(HUB_REPO, remote)
            os.replace(p, src / name) if not (src / name).exists() else None
    convert(src / "stories260K.bin", src / "tok512.bin", out, overwrite=False)
    return out


_SENT_END = re.compile(r"[.!?](?:\"|')?(?=\s|$)")


def cut_at_sentence(text: str) -> str:
    """Keep the text up to its last sentence end (``.``, ``!``, ``?``); the whole text if none."""
    ends = [m.end() for m in _SENT_END.finditer(text)]
    return text[: ends[-1]].rstrip() if ends else text.rstrip()


def save_gold_params(path: str | os.PathLike, params: dict) -> None:

    atomic_write_json(path, params)


def load_gold(artifacts_dir: str | os.PathLike, device: str = "cpu"):
    """The demo's gold reward, rebuilt from ``data/gold.json`` and the frozen base model."""

    art = Path(artifacts_dir)
    params = json.loads((art / "data" / "gold.json").read_text())
    if not (art / "base_model" / "config.json").is_file():
        raise FileNotFoundError(
            f"{art / 'base_model'}: the gold reward's frozen base model is missing (the demo's "
            f"data stage converts it there; {art / 'data' / 'gold.json'} needs it)"
        )
    base = load_causal_lm(str(art / "base_model"), trainable=False, device=device)
    tok = load_tokenizer(str(art / "base_model"))
    return GoldReward(base, tok, f0=params["f0"], f_scale=params["f_scale"])


def gold_scorer_for(task: str | None, artifacts_dir: str | os.PathLike, device: str = "cpu"):
    """``(prompts, completions) -> np.ndarray`` for a task with a hidden gold reward, else None."""
    if task is None:
        return None
    if task != "stories":
        raise ValueError(f"gold_task: unknown task {task!r} (stories | null)")
    if not (Path(artifacts_dir) / "data" / "gold.json").exists():
        log.warning(
            "gold_task=stories but %s/data/gold.json is missing: no gold evaluation", artifacts_dir
        )
        return None
    gold = load_gold(artifacts_dir, device)
    return gold.score


def sample_story_candidates(
    model: Any,
    tok: Any,
    prompts: list[str],
    k: int,
    *,
    max_new_tokens: int,
    temperature: float,
    seed: int,
    device: str = "cpu",
) -> tuple[list[list[str]], int]:
    """``k`` continuations per prompt, as the data stage samples them (stop at EOS or BOS:
    TinyStories separates stories with BOS; cut at the last sentence end); sample ``j`` uses
    seed ``seed * 1000 + j``. Returns the candidates per prompt and the tokens generated."""
    out: list[list[str]] = [[] for _ in prompts]
    n_tokens = 0
    with Progress(k * len(prompts), "candidates", unit="sample") as bar:
        for j in range(k):
            texts, _, n_tok = sample_texts(
                model,
                tok,
                prompts,
                max_new_tokens=max_new_tokens,
                temperature=temperature,
                seed=seed * 1000 + j,
                device=device,
                batch_size=256,
                stop_ids=(tok.eos_token_id, tok.bos_token_id),
                progress=bar,
            )
            n_tokens += n_tok
            for i, t in enumerate(texts):
                out[i].append(cut_at_sentence(t))
    return out, n_tokens
