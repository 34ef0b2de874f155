"""Batched sampling with a KV cache: left-padded prompts in, right-padded responses out.

The loop runs the model with a KV cache and explicit position ids (counted over real tokens, as
in training), so the log-probs of the rollout pass and of the training pass agree. Sampling is
plain ancestral sampling from ``softmax(logits / T)`` (inverse CDF,
:func:`rlhfstack.rollout.fast.sample_categorical`): no top-k, no top-p (truncated sampling would
break the log-prob semantics PPO relies on). HF causal LMs take the fast loop of
:mod:`rlhfstack.rollout.fast`; other modules the plain loop below (same tokens for the same
generator state).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from transformers import DynamicCache

from rlhfstack.data.collate import collate_prompts
from rlhfstack.models.core import position_ids_from_mask, response_logprobs
from rlhfstack.progress import Progress
from rlhfstack.rollout.fast import fast_decode, sample_categorical, supports_fast_decode


@dataclass
class Generation:
    """Prompt and response tensors of one batch.

    prompt_ids_BP / prompt_mask_BP: left-padded prompts.
    response_ids_BR: right-padded with PAD after the first EOS (EOS itself kept).
    response_mask_BR: 1 on response tokens up to and including the first EOS.
    ended_B: True where the response emitted EOS within the budget.
    logprobs_BR: (``return_logprobs=True``) ``log softmax(logits / T)`` of each response token
        under the sampling policy, 0 where the mask is 0.
    hidden_BRD: (``return_hidden=True``) the policy's last hidden state at the position that
        predicted each response token (what a value head on the policy trunk reads).
    """

    prompt_ids_BP: torch.Tensor
    prompt_mask_BP: torch.Tensor
    response_ids_BR: torch.Tensor
    response_mask_BR: torch.Tensor
    ended_B: torch.Tensor
    logprobs_BR: torch.Tensor | None = None
    hidden_BRD: torch.Tensor | None = None

    def full(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Concatenated ``(input_ids, attention_mask)`` of prompt + response."""
        ids = torch.cat([self.prompt_ids_BP, self.response_ids_BR], dim=1)
        mask = torch.cat([self.prompt_mask_BP, self.response_mask_BR], dim=1)
        return ids, mask


@torch.no_grad()
def generate(
    model: nn.Module,
    prompt_ids_BP: torch.Tensor,
    prompt_mask_BP: torch.Tensor,
    *,
    max_new_tokens: int,
    eos_id: int,
    pad_id: int,
    temperature: float = 1.0,
    greedy: bool = False,
    generator: torch.Generator | None = None,
    suppress_ids: tuple[int, ...] | None = None,
    stop_ids: tuple[int, ...] | None = None,
    return_logprobs: bool = False,
    return_hidden: bool = False,
    fast: bool = True,
    prompt_group_size: int = 1,
    compile_steps: bool = False,
    packed_weights: bool = True,
) -> Generation:
    """Sample up to ``max_new_tokens`` per prompt; stops early once every row has ended.

    ``suppress_ids`` (default: the PAD id) are never sampled. A row ends at the first token in
    ``stop_ids`` (default: EOS), which is kept in the response and its mask.

    ``fast`` (default) uses :func:`rlhfstack.rollout.fast.fast_decode` for HF causal LMs
    (preallocated KV cache and mask, LM head on the last position only); ``fast=False`` or any
    other module runs the plain loop. Both draw the same tokens for the same generator state.
    ``return_logprobs`` / ``return_hidden`` fill :attr:`Generation.logprobs_BR` /
    :attr:`Generation.hidden_BRD` (fast path only). ``prompt_group_size=G`` says the rows come
    in contiguous groups of ``G`` identical prompts (several samples per prompt, as in GRPO): the
    fast path then runs each prompt's pass once. ``compile_steps`` compiles the one-token step
    of Llama-family trunks with static shapes (:func:`rlhfstack.rollout.fast.fast_decode`);
    ``packed_weights`` runs their eager steps on oneDNN-packed weight copies (CPU float32).
    """

    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if not greedy and temperature <= 0:
        raise ValueError(f"temperature must be > 0 (or greedy=True), got {temperature}")
    use_fast = fast and supports_fast_decode(model)
    G = int(prompt_group_size)
    if G < 1 or prompt_ids_BP.shape[0] % G:
        raise ValueError(
            f"prompt_group_size={G} must divide the batch ({prompt_ids_BP.shape[0]} rows)"
        )
    if G > 1:
        grouped = prompt_ids_BP.reshape(-1, G, prompt_ids_BP.shape[1])
        gm = prompt_mask_BP.reshape(-1, G, prompt_mask_BP.shape[1])
        if not (
            torch.equal(grouped, grouped[:, :1].expand_as(grouped))
            and torch.equal(gm, gm[:, :1].expand_as(gm))
        ):
            raise ValueError(f"prompt_group_size={G}: rows are not groups of {G} identical prompts")
    if (return_logprobs or return_hidden) and not use_fast:
        raise ValueError("return_logprobs / return_hidden need the fast path (an HF causal LM)")
    was_training = model.training
    model.eval()
    device = prompt_ids_BP.device
    suppress = list(suppress_ids) if suppress_ids is not None else [pad_id]
    stops = torch.tensor(list(stop_ids) if stop_ids is not None else [eos_id], device=device)
    stops = stops.long()
    attn_BP = prompt_mask_BP.long()
    pos_BP = position_ids_from_mask(attn_BP)
    try:
        if use_fast:
            res = fast_decode(
                model,
                prompt_ids_BP,
                attn_BP,
                pos_BP,
                max_new_tokens=max_new_tokens,
                pad_id=pad_id,
                temperature=temperature,
                greedy=greedy,
                generator=generator,
                suppress=suppress,
                stops_S=stops,
                return_logprobs=return_logprobs,
                return_hidden=return_hidden,
                prompt_group_size=G,
                compile_steps=compile_steps,
                packed_weights=packed_weights,
            )
            response_ids_BR, logprobs_BR, hidden_BRD = (
                res.tokens_BN,
                res.logprobs_BN,
                res.hidden_BND,
            )
        else:
            response_ids_BR = _plain_decode(
                model,
                prompt_ids_BP,
                attn_BP,
                pos_BP,
                max_new_tokens=max_new_tokens,
                pad_id=pad_id,
                temperature=temperature,
                greedy=greedy,
                generator=generator,
                suppress=suppress,
                stops=stops,
            )
            logprobs_BR = hidden_BRD = None
    finally:
        if was_training:
            model.train()
    # mask: tokens up to and including the first stop token
    is_eos_BR = torch.isin(response_ids_BR, stops)
    after_eos_BR = (is_eos_BR.long().cumsum(1) - is_eos_BR.long()) > 0
    response_mask_BR = (~after_eos_BR).long()
    response_ids_BR = response_ids_BR.masked_fill(after_eos_BR, pad_id)
    if logprobs_BR is not None:
        logprobs_BR = logprobs_BR.masked_fill(after_eos_BR, 0.0)
    return Generation(
        prompt_ids_BP=prompt_ids_BP,
        prompt_mask_BP=prompt_mask_BP.long(),
        response_ids_BR=response_ids_BR,
        response_mask_BR=response_mask_BR,
        ended_B=is_eos_BR.any(1),
        logprobs_BR=logprobs_BR,
        hidden_BRD=hidden_BRD,
    )


def _plain_decode(
    model: nn.Module,
    prompt_ids_BP: torch.Tensor,
    attn_BT: torch.Tensor,
    pos_BT: torch.Tensor,
    *,
    max_new_tokens: int,
    pad_id: int,
    temperature: float,
    greedy: bool,
    generator: torch.Generator | None,
    suppress: list[int],
    stops: torch.Tensor,
) -> torch.Tensor:
    """The reference loop: the model's own forward with a ``DynamicCache``. Returns ``[B, N]``."""

    B = prompt_ids_BP.shape[0]
    device = prompt_ids_BP.device
    out = model(
        input_ids=prompt_ids_BP,
        attention_mask=attn_BT,
        position_ids=pos_BT,
        past_key_values=DynamicCache(),
        use_cache=True,
    )
    next_pos_B = pos_BT[:, -1] + 1
    ended_B = torch.zeros(B, dtype=torch.bool, device=device)
    tokens = []
    for _ in range(max_new_tokens):
        logits_BV = out.logits[:, -1, :].float()
        if suppress:
            logits_BV[:, suppress] = float("-inf")
        if greedy:
            tok_B = logits_BV.argmax(-1)
        else:
            probs_BV = torch.softmax(logits_BV / temperature, dim=-1)
            tok_B = sample_categorical(probs_BV, generator)
        tok_B = torch.where(ended_B, torch.full_like(tok_B, pad_id), tok_B)
        tokens.append(tok_B)
        is_stop_B = torch.isin(tok_B, stops) & ~ended_B
        ended_B = ended_B | is_stop_B
        if bool(ended_B.all()) or len(tokens) == max_new_tokens:
            break
        attn_BT = torch.cat([attn_BT, (~ended_B | is_stop_B).long().unsqueeze(1)], dim=1)
        out = model(
            input_ids=tok_B.unsqueeze(1),
            attention_mask=attn_BT,
            position_ids=next_pos_B.unsqueeze(1),
            past_key_values=out.past_key_values,
            use_cache=True,
        )
        next_pos_B = next_pos_B + 1
    return torch.stack(tokens, dim=1)


def left_pad_prompts(
    tokenizer, prompts: list[str], max_prompt_tokens: int, device: str = "cpu"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded prompt ids and mask on ``device`` (see ``rlhfstack.data.collate.collate_prompts``)."""
    b = collate_prompts(prompts, tokenizer, max_prompt_tokens)
    return b["input_ids"].to(device), b["attention_mask"].to(device)


def decode_responses(tokenizer, gen: Generation) -> list[str]:
    """Decode the response tokens (EOS and PAD dropped)."""
    texts = []
    for ids, m in zip(gen.response_ids_BR.tolist(), gen.response_mask_BR.tolist()):
        drop = {tokenizer.eos_token_id, tokenizer.pad_token_id, tokenizer.bos_token_id}
        toks = [t for t, k in zip(ids, m) if k and t not in drop]
        texts.append(tokenizer.decode(toks, skip_special_tokens=True))
    return texts


@dataclass
class SampledTokens:
    """One sample per prompt, kept as the token ids that were sampled (unpadded lists).

    prompt_ids: the prompt as the policy saw it (after the cut to ``max_prompt_tokens``).
    response_ids: the sampled response tokens, ending with the stop token iff ``ended``
        (a response cut by the length budget gets no EOS).
    ended: True where the response emitted a stop token within the budget.
    texts: the decoded responses (EOS, BOS and PAD dropped).
    """

    prompt_ids: list[list[int]]
    response_ids: list[list[int]]
    ended: list[bool]
    texts: list[str]

    def __len__(self) -> int:
        return len(self.response_ids)

    @property
    def n_tokens(self) -> int:
        """Prompt + response tokens over all samples."""
        return sum(len(p) + len(r) for p, r in zip(self.prompt_ids, self.response_ids))

    def batch(
        self, start: int, stop: int, pad_id: int, device: str = "cpu"
    ) -> tuple[torch.Tensor, torch.Tensor, int]:
        """Rows ``[start, stop)`` in the rollout's layout: ``(input_ids_BT, attention_mask_BT, P)``
        with the prompts left-padded to ``P`` tokens and the responses right-padded after them."""
        prompts, responses = self.prompt_ids[start:stop], self.response_ids[start:stop]
        P = max(len(p) for p in prompts)
        R = max(len(r) for r in responses)
        ids = torch.full((len(prompts), P + R), pad_id, dtype=torch.long)
        mask = torch.zeros((len(prompts), P + R), dtype=torch.long)
        for i, (p, r) in enumerate(zip(prompts, responses)):
            ids[i, P - len(p) : P + len(r)] = torch.tensor(p + r, dtype=torch.long)
            mask[i, P - len(p) : P + len(r)] = 1
        return ids.to(device), mask.to(device), P


def sample_tokens(
    model: nn.Module,
    tokenizer,
    prompts: list[str],
    *,
    max_new_tokens: int,
    max_prompt_tokens: int = 64,
    temperature: float = 1.0,
    greedy: bool = False,
    batch_size: int = 128,
    seed: int = 0,
    device: str = "cpu",
    stop_ids: tuple[int, ...] | None = None,
    progress: Progress | str | None = None,
) -> SampledTokens:
    """Sample one completion per prompt; keeps the sampled token ids beside the decoded texts.

    ``progress``: a :class:`~rlhfstack.progress.Progress` to advance by one per sample, or a
    description (``"eval samples"``) for one of this call's own; None reports nothing."""
    g = torch.Generator(device=device).manual_seed(seed)
    out = SampledTokens(prompt_ids=[], response_ids=[], ended=[], texts=[])
    own = isinstance(progress, str)
    bar = Progress(len(prompts), progress, unit="sample") if own else progress
    try:
        for i in range(0, len(prompts), batch_size):
            ids, mask = left_pad_prompts(
                tokenizer, prompts[i : i + batch_size], max_prompt_tokens, device
            )
            gen = generate(
                model,
                ids,
                mask,
                max_new_tokens=max_new_tokens,
                eos_id=tokenizer.eos_token_id,
                pad_id=tokenizer.pad_token_id,
                temperature=temperature,
                greedy=greedy,
                generator=g,
                stop_ids=stop_ids,
            )
            out.texts.extend(decode_responses(tokenizer, gen))
            out.ended.extend(gen.ended_B.tolist())
            for p, pm, r, rm in zip(
                ids.tolist(),
                mask.tolist(),
                gen.response_ids_BR.tolist(),
                gen.response_mask_BR.tolist(),
            ):
                out.prompt_ids.append([t for t, k in zip(p, pm) if k])
                out.response_ids.append([t for t, k in zip(r, rm) if k])
            if bar is not None:
                bar.update(len(gen.ended_B))
    finally:
        if own:
            bar.close()
    return out


def sample_texts(
    model: nn.Module,
    tokenizer,
    prompts: list[str],
    *,
    max_new_tokens: int,
    max_prompt_tokens: int = 64,
    temperature: float = 1.0,
    greedy: bool = False,
    batch_size: int = 128,
    seed: int = 0,
    device: str = "cpu",
    stop_ids: tuple[int, ...] | None = None,
    progress: Progress | str | None = None,
) -> tuple[list[str], list[bool], int]:
    """Sample one completion per prompt. Returns (texts, ended flags, tokens generated);
    ``progress`` as in :func:`sample_tokens`."""
    s = sample_tokens(
        model,
        tokenizer,
        prompts,
        max_new_tokens=max_new_tokens,
        max_prompt_tokens=max_prompt_tokens,
        temperature=temperature,
        greedy=greedy,
        batch_size=batch_size,
        seed=seed,
        device=device,
        stop_ids=stop_ids,
        progress=progress,
    )
    return s.texts, s.ended, s.n_tokens


@torch.no_grad()
def sampled_logprob_sums(
    model: nn.Module,
    samples: SampledTokens,
    pad_id: int,
    *,
    batch_size: int = 64,
    device: str = "cpu",
) -> tuple[torch.Tensor, torch.Tensor]:
    """``sum_t log pi(y_t | x, y_<t)`` over exactly the sampled response tokens (temperature 1;
    an EOS counts only where it was sampled) and the number of those tokens, each ``[N]``.

    The difference of two models' sums on one model's samples is the k1 estimate of their
    sequence KL; the scoring pass is the training pass of PPO (``response_logprobs``)."""

    sums, counts = [], []
    for i in range(0, len(samples), batch_size):
        ids, mask, P = samples.batch(i, i + batch_size, pad_id, device)
        lp_BR = response_logprobs(model, ids, mask, P)["logprobs"]
        m_BR = mask[:, P:].to(lp_BR.dtype)
        sums.append((lp_BR * m_BR).sum(-1).cpu())
        counts.append(mask[:, P:].sum(-1).cpu())
    return torch.cat(sums), torch.cat(counts)


def sample_pairs(
    model: nn.Module,
    tokenizer,
    prompts: list[str],
    *,
    max_new_tokens: int,
    max_prompt_tokens: int = 64,
    temperature: float = 1.0,
    batch_size: int = 128,
    seed: int = 0,
    device: str = "cpu",
    stop_ids: tuple[int, ...] | None = None,
) -> tuple[SampledTokens, SampledTokens]:
    """Two independent samples per prompt (one pass over ``prompts + prompts``, one generator):
    ``(a, b)``, row ``i`` of each answering ``prompts[i]``: the candidate pairs of online
    preference learning."""
    s = sample_tokens(
        model,
        tokenizer,
        [*prompts, *prompts],
        max_new_tokens=max_new_tokens,
        max_prompt_tokens=max_prompt_tokens,
        temperature=temperature,
        batch_size=batch_size,
        seed=seed,
        device=device,
        stop_ids=stop_ids,
    )
    n = len(prompts)

    def half(lo: int, hi: int) -> SampledTokens:
        return SampledTokens(
            prompt_ids=s.prompt_ids[lo:hi],
            response_ids=s.response_ids[lo:hi],
            ended=s.ended[lo:hi],
            texts=s.texts[lo:hi],
        )

    return half(0, n), half(n, 2 * n)
