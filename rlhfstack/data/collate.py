"""Tokenization, length filtering and padded batches.

Conventions (the same for SFT, reward model / DPO and PPO, so prompt tokens always match):

* A prompt is tokenized on its own, without special tokens, then BOS is prepended if the
  tokenizer normally adds one (Llama does, GPT-2 does not) and the text does not already start
  with it (chat-template output often does).
* A response is the tokens of ``join_prompt_response(prompt, response)`` after the prompt
  tokens (so the boundary is tokenized as in running text), followed by EOS.
* Sequences for training are RIGHT-padded; prompts for generation are LEFT-padded.
* Too-long sequences (prefer :func:`filter_by_length` upstream) are cut: a prompt longer than
  ``max_len // 2`` that does not leave room for the response keeps its last tokens (and BOS),
  then the response is cut on the right (losing its EOS).
* The tokenizer must have a pad token distinct from EOS: :func:`check_tokenizer`.

Shape suffixes: B = batch, T = padded sequence length.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch

from .schemas import Example, LoadReport, PreferenceExample, PromptExample, SFTExample
from .templates import join_prompt_response

__all__ = [
    "IGNORE_INDEX",
    "check_tokenizer",
    "adds_bos",
    "encode_prompts",
    "encode_responses",
    "filter_by_length",
    "tokenize_sft",
    "collate_sft",
    "tokenize_preference",
    "collate_preference",
    "pairs_share_prompts",
    "collate_prompts",
    "count_long_prompts",
    "pad_sequences",
]

logger = logging.getLogger(__name__)

IGNORE_INDEX = -100
"""Label value ignored by the cross-entropy loss (prompt and padding positions)."""


# --------------------------------------------------------------------------- tokenizer helpers
def check_tokenizer(tokenizer: Any, *, need_pad: bool = True) -> None:
    """Raise ``ValueError`` unless the tokenizer has an EOS token and (if ``need_pad``) a pad
    token that is not EOS."""
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ValueError("the tokenizer has no eos_token: every response must end with EOS")
    if not need_pad:
        return
    pad = tokenizer.pad_token_id
    if pad is None:
        raise ValueError(
            "the tokenizer has no pad_token. Add a dedicated one, e.g. "
            "tokenizer.add_special_tokens({'pad_token': '<pad>'}), and resize the model's "
            "embeddings (model.resize_token_embeddings(len(tokenizer)))"
        )
    if pad == eos:
        raise ValueError(
            f"the tokenizer's pad_token ({tokenizer.pad_token!r}) is its eos_token: padding must "
            "use a distinct token so that EOS stays a real, learned token. Add one with "
            "tokenizer.add_special_tokens({'pad_token': '<pad>'}) and resize the embeddings"
        )


def adds_bos(tokenizer: Any) -> bool:
    """True if ``tokenizer(text)`` starts sequences with ``bos_token_id``."""
    bos = tokenizer.bos_token_id
    if bos is None:
        return False
    ids = tokenizer("a", add_special_tokens=True)["input_ids"]
    return len(ids) > 0 and ids[0] == bos


def _encode(tokenizer: Any, texts: Sequence[str]) -> list[list[int]]:
    if not texts:
        return []
    return [list(x) for x in tokenizer(list(texts), add_special_tokens=False)["input_ids"]]


def _with_bos(tokenizer: Any, raw_ids: list[list[int]]) -> list[list[int]]:
    if not adds_bos(tokenizer):
        return raw_ids
    bos = tokenizer.bos_token_id
    return [x if x[:1] == [bos] else [bos, *x] for x in raw_ids]


def encode_prompts(tokenizer: Any, prompts: Sequence[str]) -> list[list[int]]:
    """Token ids of each prompt, with BOS first if the tokenizer adds one."""
    return _with_bos(tokenizer, _encode(tokenizer, prompts))


def _responses_after(
    tokenizer: Any,
    prompts: Sequence[str],
    raw_prompt_ids: list[list[int]],
    responses: Sequence[str],
) -> list[list[int]]:
    fulls = [join_prompt_response(p, r) for p, r in zip(prompts, responses, strict=True)]
    out: list[list[int]] = []
    fallback: list[int] = []
    for i, (p, f) in enumerate(zip(raw_prompt_ids, _encode(tokenizer, fulls))):
        if f[: len(p)] == p and len(f) > len(p):
            out.append(f[len(p) :])
        else:  # a token merged across the boundary: tokenize the response text on its own
            out.append([])
            fallback.append(i)
    if fallback:
        texts = [fulls[i][len(prompts[i]) :] for i in fallback]
        for i, ids in zip(fallback, _encode(tokenizer, texts)):
            out[i] = ids
    return out


def encode_responses(
    tokenizer: Any, prompts: Sequence[str], responses: Sequence[str]
) -> list[list[int]]:
    """Token ids of each response as it follows its prompt (no EOS; see module docstring)."""
    return _responses_after(tokenizer, prompts, _encode(tokenizer, prompts), responses)


def _encode_examples(
    tokenizer: Any, examples: Sequence[Example], fields: Sequence[str]
) -> tuple[list[list[int]], dict[str, list[list[int]]]]:
    """Prompt ids (with BOS) and, per response field, response ids (prompts tokenized once)."""
    prompts = [e.prompt for e in examples]
    raw = _encode(tokenizer, prompts)
    responses = {
        f: _responses_after(tokenizer, prompts, raw, [getattr(e, f) for e in examples])
        for f in fields
    }
    return _with_bos(tokenizer, raw), responses


def _left_truncate(ids: list[int], n: int, bos: int | None) -> list[int]:
    if len(ids) <= n:
        return ids
    if bos is not None and ids[:1] == [bos] and n > 1:
        return [bos, *ids[len(ids) - (n - 1) :]]
    return ids[len(ids) - n :]


def _cut_prompt(prompt: list[int], n_response: int, max_len: int, bos: int | None) -> list[int]:
    """The prompt kept beside a response of ``n_response`` tokens within ``max_len``: all of it
    if both fit, else its end, in the room the response leaves (at least ``max_len // 2``)."""
    if len(prompt) + n_response <= max_len:
        return prompt
    return _left_truncate(prompt, min(len(prompt), max(max_len - n_response, max_len // 2)), bos)


def _fit(
    prompt: list[int], response: list[int], max_len: int, bos: int | None
) -> tuple[list[int], list[int], bool]:
    """Cut ``prompt + response`` (response already ends with EOS) to at most ``max_len``."""
    if len(prompt) + len(response) <= max_len:
        return prompt, response, False
    prompt = _cut_prompt(prompt, len(response), max_len, bos)
    return prompt, response[: max_len - len(prompt)], True


def _bos_id(tokenizer: Any) -> int | None:
    return tokenizer.bos_token_id if adds_bos(tokenizer) else None


# --------------------------------------------------------------------------- length filter
def filter_by_length(
    examples: Sequence[Example],
    tokenizer: Any,
    max_prompt_tokens: int | None,
    max_response_tokens: int | None,
    *,
    report: LoadReport | None = None,
) -> tuple[list[Example], int]:
    """Drop examples whose prompt or response is too long; returns ``(kept, n_filtered)``.

    Prompt length counts BOS; response length counts the EOS that will be appended (for
    preference pairs both responses must fit; prompt examples only check the prompt). So a
    kept example is never truncated by ``tokenize_*`` with
    ``max_len >= max_prompt_tokens + max_response_tokens``. ``None`` disables a limit.
    If ``report`` is given its ``filtered_too_long`` and ``kept`` are updated.
    """
    examples = list(examples)
    if not examples or (max_prompt_tokens is None and max_response_tokens is None):
        return examples, 0
    fields = [f for f in ("completion", "chosen", "rejected") if hasattr(examples[0], f)]
    prompt_ids, responses = _encode_examples(
        tokenizer, examples, fields if max_response_tokens is not None else ()
    )
    ok = [True] * len(examples)
    for i, ids in enumerate(prompt_ids):
        if max_prompt_tokens is not None and len(ids) > max_prompt_tokens:
            ok[i] = False
        for f in responses:
            if len(responses[f][i]) + 1 > max_response_tokens:
                ok[i] = False
    kept = [e for e, keep in zip(examples, ok) if keep]
    n_filtered = len(examples) - len(kept)
    if report is not None:
        report.filtered_too_long += n_filtered
        report.kept = len(kept)
    return kept, n_filtered


# --------------------------------------------------------------------------- padding
def pad_sequences(
    seqs: Sequence[Sequence[int]], pad_value: int, *, side: str = "right", length: int | None = None
) -> torch.Tensor:
    """Stack int lists into a ``[B, T]`` long tensor padded with ``pad_value`` on ``side``
    (``T = max(len) `` or ``length``)."""
    T = max((len(s) for s in seqs), default=0) if length is None else length
    out_BT = torch.full((len(seqs), T), pad_value, dtype=torch.long)
    for i, s in enumerate(seqs):
        if not s:
            continue
        t = torch.as_tensor(list(s), dtype=torch.long)
        if side == "right":
            out_BT[i, : len(s)] = t
        elif side == "left":
            out_BT[i, T - len(s) :] = t
        else:
            raise ValueError(f"side must be 'left' or 'right', got {side!r}")
    return out_BT


def _check_max_len(max_len: int) -> None:
    if max_len < 2:
        raise ValueError(f"max_len must be at least 2, got {max_len}")


# --------------------------------------------------------------------------- SFT
def tokenize_sft(
    examples: Sequence[SFTExample], tokenizer: Any, max_len: int
) -> list[dict[str, list[int]]]:
    """Tokenize SFT examples into ``{"input_ids", "labels"}`` int lists (unpadded).

    ``input_ids`` = [BOS] prompt completion EOS, at most ``max_len`` tokens;
    ``labels`` = ``input_ids`` with the prompt positions set to ``IGNORE_INDEX`` (unshifted,
    as HF causal LMs expect).
    """
    check_tokenizer(tokenizer)
    _check_max_len(max_len)
    p_ids, resp = _encode_examples(tokenizer, examples, ["completion"])
    r_ids = resp["completion"]
    eos, bos = tokenizer.eos_token_id, _bos_id(tokenizer)
    out, n_cut = [], 0
    for p, r in zip(p_ids, r_ids):
        p, r, cut = _fit(p, [*r, eos], max_len, bos)
        n_cut += cut
        out.append({"input_ids": p + r, "labels": [IGNORE_INDEX] * len(p) + r})
    if n_cut:
        logger.warning(
            "tokenize_sft: %d of %d examples truncated to %d tokens", n_cut, len(out), max_len
        )
    return out


def collate_sft(
    batch: Sequence[Mapping[str, Sequence[int]]], pad_id: int
) -> dict[str, torch.Tensor]:
    """Right-pad tokenized SFT examples.

    Returns:
        ``input_ids`` [B, T] (``pad_id`` padding), ``attention_mask`` [B, T] (1 = token),
        ``labels`` [B, T] (``IGNORE_INDEX`` on prompt and padding).
    """
    input_ids_BT = pad_sequences([b["input_ids"] for b in batch], pad_id)
    labels_BT = pad_sequences([b["labels"] for b in batch], IGNORE_INDEX)
    attention_mask_BT = pad_sequences([[1] * len(b["input_ids"]) for b in batch], 0)
    return {"input_ids": input_ids_BT, "attention_mask": attention_mask_BT, "labels": labels_BT}


# --------------------------------------------------------------------------- preferences
def tokenize_preference(
    examples: Sequence[PreferenceExample], tokenizer: Any, max_len: int
) -> list[dict[str, list[int]]]:
    """Tokenize preference pairs into ``{chosen,rejected}_{input_ids,loss_mask}`` int lists.

    Each sequence is [BOS] prompt response EOS (at most ``max_len``); ``loss_mask`` is 1 on
    the response tokens including EOS, 0 on the prompt. A too-long pair keeps the *same* prompt
    tokens in both rows (cut as for the longer response), so chosen and rejected always share
    their prompt (the shared-prompt passes of RM and DPO training rely on it).
    """
    check_tokenizer(tokenizer)
    _check_max_len(max_len)
    p_ids, resp = _encode_examples(tokenizer, examples, ["chosen", "rejected"])
    c_ids, r_ids = resp["chosen"], resp["rejected"]
    eos, bos = tokenizer.eos_token_id, _bos_id(tokenizer)
    out, n_cut = [], 0
    for p, c, r in zip(p_ids, c_ids, r_ids):
        item: dict[str, list[int]] = {}
        pp = _cut_prompt(p, max(len(c), len(r)) + 1, max_len, bos)  # one cut for the pair
        for name, resp in (("chosen", c), ("rejected", r)):
            rr = [*resp, eos][: max_len - len(pp)]
            n_cut += len(pp) < len(p) or len(rr) <= len(resp)
            item[f"{name}_input_ids"] = pp + rr
            item[f"{name}_loss_mask"] = [0] * len(pp) + [1] * len(rr)
        out.append(item)
    for item, ex in zip(out, examples):
        if getattr(ex, "p_chosen", 1.0) != 1.0:  # a soft label travels with its pair
            item["p_chosen"] = ex.p_chosen
    if n_cut:
        logger.warning(
            "tokenize_preference: %d of %d sequences truncated to %d tokens",
            n_cut,
            2 * len(out),
            max_len,
        )
    return out


def pairs_share_prompts(items: Iterable[Mapping[str, Sequence[int]]]) -> bool:
    """True if every tokenized pair's chosen and rejected rows begin with the same prompt (their
    leading ``loss_mask == 0`` tokens): the condition under which the shared-prompt passes
    (``rlhfstack.models.pairs.split_pairs``) never fall back to the plain pass."""
    for it in items:
        prompts = []
        for name in ("chosen", "rejected"):
            lm = it[f"{name}_loss_mask"]
            n = next((i for i, m in enumerate(lm) if m), len(lm))
            prompts.append(list(it[f"{name}_input_ids"][:n]))
        if prompts[0] != prompts[1]:
            return False
    return True


def collate_preference(
    batch: Sequence[Mapping[str, Sequence[int]]], pad_id: int
) -> dict[str, torch.Tensor]:
    """Right-pad tokenized pairs; chosen and rejected share one length T (so they can be
    concatenated into a single [2B, T] forward pass).

    Returns:
        ``chosen_input_ids``, ``chosen_attention_mask``, ``chosen_loss_mask`` and the same for
        ``rejected_``, each [B, T]. ``loss_mask[b, t] = 1`` iff token t is a response token
        (the log-prob of token t comes from the logits at t-1).
    """
    T = max(max(len(b["chosen_input_ids"]), len(b["rejected_input_ids"])) for b in batch)
    out: dict[str, torch.Tensor] = {}
    for name in ("chosen", "rejected"):
        ids = [b[f"{name}_input_ids"] for b in batch]
        out[f"{name}_input_ids"] = pad_sequences(ids, pad_id, length=T)
        out[f"{name}_attention_mask"] = pad_sequences([[1] * len(x) for x in ids], 0, length=T)
        out[f"{name}_loss_mask"] = pad_sequences(
            [b[f"{name}_loss_mask"] for b in batch], 0, length=T
        )
    if any("p_chosen" in b for b in batch):
        out["p_chosen"] = torch.tensor([float(b.get("p_chosen", 1.0)) for b in batch])
    return out


# --------------------------------------------------------------------------- prompts
def collate_prompts(
    prompts: Sequence[str | PromptExample | Any], tokenizer: Any, max_prompt_len: int
) -> dict[str, torch.Tensor]:
    """LEFT-pad prompts for generation (anything with a ``.prompt`` attribute, or strings).

    Prompts longer than ``max_prompt_len`` keep their last tokens (and BOS).

    Returns:
        ``input_ids`` [B, T] (``pad_token_id`` on the left), ``attention_mask`` [B, T].
    """
    check_tokenizer(tokenizer)
    texts = [p if isinstance(p, str) else p.prompt for p in prompts]
    bos = _bos_id(tokenizer)
    ids = [_left_truncate(x, max_prompt_len, bos) for x in encode_prompts(tokenizer, texts)]
    return {
        "input_ids": pad_sequences(ids, tokenizer.pad_token_id, side="left"),
        "attention_mask": pad_sequences([[1] * len(x) for x in ids], 0, side="left"),
    }


def count_long_prompts(
    prompts: Sequence[str | PromptExample | Any], tokenizer: Any, max_prompt_len: int
) -> int:
    """How many prompts :func:`collate_prompts` would cut: those longer than ``max_prompt_len``
    tokens (BOS counted), which it cuts to their last tokens (BOS kept)."""
    texts = [p if isinstance(p, str) else p.prompt for p in prompts]
    return sum(len(ids) > max_prompt_len for ids in encode_prompts(tokenizer, texts))
