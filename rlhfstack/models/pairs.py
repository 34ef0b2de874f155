"""Training passes over preference pairs and responses that share a prompt.

Same math as :func:`rlhfstack.models.core.sequence_logprob_sums`, ``response_logprobs`` and
``RewardModel.raw_scores``, less work: the prompt of a (chosen, rejected) pair runs through the
trunk once for both rows, and the LM head runs only on the positions that are scored. DPO and
the reward-model stage use these; the tests pin them to the plain passes.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import DynamicCache

from rlhfstack.losses import logprobs_from_logits
from rlhfstack.models.core import causal_lm_parts, position_ids_from_mask, trunk_hidden


def _trunk_head(model: nn.Module) -> tuple[nn.Module, nn.Module]:
    lm = model.get_base_model() if hasattr(model, "get_base_model") else model
    if not getattr(lm, "base_model_prefix", None) or not hasattr(lm, "get_output_embeddings"):
        raise TypeError(f"{type(model).__name__} is not an HF causal LM")
    return causal_lm_parts(model)


def masked_logprob_sums(
    model: nn.Module,
    input_ids_BT: torch.Tensor,
    attention_mask_BT: torch.Tensor,
    loss_mask_BT: torch.Tensor,
) -> torch.Tensor:
    """``sequence_logprob_sums`` with the LM head applied only where ``loss_mask`` is 1: ``[B]``.

    The prompt positions' logits are never used, so they are never computed: for a 128-token
    prompt and a 64-token response that is a third of the ``[B, T, V]`` logits (and of their
    memory and gradient).
    """

    trunk, lm_head = _trunk_head(model)
    B, T = input_ids_BT.shape
    h_BTD = trunk_hidden(trunk, input_ids_BT, attention_mask_BT)
    sel_BT = loss_mask_BT[:, 1:].bool()  # token t+1 is scored by the logits at t
    logits_NV = lm_head(h_BTD[:, :-1][sel_BT]).float()
    lp_N = logprobs_from_logits(logits_NV.unsqueeze(0), input_ids_BT[:, 1:][sel_BT].unsqueeze(0))[0]
    rows_N = torch.arange(B, device=input_ids_BT.device).unsqueeze(1).expand(B, T - 1)[sel_BT]
    return torch.zeros(B, dtype=lp_N.dtype, device=lp_N.device).index_add(0, rows_N, lp_N)


def shared_prefix_hidden(
    trunk: nn.Module,
    prefix_ids_BP: torch.Tensor,
    prefix_mask_BP: torch.Tensor,
    suffix_ids_NS: torch.Tensor,
    suffix_mask_NS: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Hidden states of ``N = B * G`` sequences that share ``B`` prefixes, the prefix run once.

    ``prefix_*_BP`` are left-padded; ``suffix_*_NS`` right-padded, grouped by prefix (rows
    ``b*G .. b*G+G-1`` continue prefix ``b``). Causal attention means a prefix's hidden states
    do not depend on what follows, so the prefix pass is shared; its keys and values are repeated
    ``G`` times for the suffix pass, and gradients flow through both (autograd sums the copies).

    Returns ``(h_last_ND, h_NSD)``: the prefix's last hidden state (it predicts the first suffix
    token), repeated per row, and the suffix tokens' hidden states.
    """

    B = prefix_ids_BP.shape[0]
    N = suffix_ids_NS.shape[0]
    if N % B:
        raise ValueError(f"{N} suffixes for {B} prefixes: not a whole number per prefix")
    G = N // B
    cache = DynamicCache()
    pm_BP = prefix_mask_BP.long()
    h_BPD = trunk(
        input_ids=prefix_ids_BP,
        attention_mask=pm_BP,
        position_ids=position_ids_from_mask(pm_BP),
        past_key_values=cache,
        use_cache=True,
    ).last_hidden_state
    if G > 1:
        cache.batch_repeat_interleave(G)
    pm_NP = pm_BP.repeat_interleave(G, 0)
    mask_NT = torch.cat([pm_NP, suffix_mask_NS.long()], dim=1)
    pos_NS = position_ids_from_mask(mask_NT)[:, prefix_ids_BP.shape[1] :]
    h_NSD = trunk(
        input_ids=suffix_ids_NS,
        attention_mask=mask_NT,
        position_ids=pos_NS,
        past_key_values=cache,
        use_cache=True,
    ).last_hidden_state
    return h_BPD[:, -1].repeat_interleave(G, 0), h_NSD


def shared_prefix_response_logprobs(
    model: nn.Module,
    prefix_ids_BP: torch.Tensor,
    prefix_mask_BP: torch.Tensor,
    response_ids_NR: torch.Tensor,
    response_mask_NR: torch.Tensor,
    temperature: float = 1.0,
    value_head: nn.Module | None = None,
) -> dict[str, torch.Tensor]:
    """``response_logprobs`` for ``G`` responses per prompt, each prompt's pass run once.

    Returns ``logprobs`` ``[N, R]`` (and ``values`` with ``value_head``): position ``j`` scores
    response token ``j`` from the hidden state before it, exactly as ``response_logprobs`` on the
    concatenated ``[prompt, response]`` rows.
    """

    trunk, lm_head = _trunk_head(model)
    h_last_ND, h_NRD = shared_prefix_hidden(
        trunk, prefix_ids_BP, prefix_mask_BP, response_ids_NR, response_mask_NR
    )
    h_NRD = torch.cat([h_last_ND.unsqueeze(1), h_NRD[:, :-1]], dim=1)
    out = {"logprobs": logprobs_from_logits(lm_head(h_NRD).float(), response_ids_NR, temperature)}
    if value_head is not None:
        out["values"] = value_head(h_NRD).squeeze(-1).float()
    return out


def split_pairs(batch: dict[str, torch.Tensor], pad_id: int) -> dict[str, torch.Tensor]:
    """A ``collate_preference`` batch as shared prompts + interleaved completions.

    The prompt of pair ``b`` is its leading ``loss_mask == 0`` tokens (the same for chosen and
    rejected, checked). Returns ``prefix_ids``/``prefix_mask`` ``[B, P]`` (left-padded) and
    ``suffix_ids``/``suffix_mask``/``suffix_loss_mask`` ``[2B, S]`` (right-padded; rows
    ``2b`` = chosen, ``2b+1`` = rejected).
    """
    c_ids, r_ids = batch["chosen_input_ids"], batch["rejected_input_ids"]
    c_lm, r_lm = batch["chosen_loss_mask"].bool(), batch["rejected_loss_mask"].bool()
    c_att, r_att = batch["chosen_attention_mask"].bool(), batch["rejected_attention_mask"].bool()
    B, T = c_ids.shape
    ar = torch.arange(T, device=c_ids.device)
    big = torch.full_like(c_ids, T)
    p_len = torch.where(c_lm, ar, big).min(1).values  # first response token = prompt length
    if not torch.equal(p_len, torch.where(r_lm, ar, big).min(1).values):
        raise ValueError("split_pairs: chosen and rejected prompts differ in length")
    keep = ar.unsqueeze(0) < p_len.unsqueeze(1)
    if not torch.equal(c_ids[keep], r_ids[keep]):
        raise ValueError("split_pairs: chosen and rejected do not share their prompt")
    P = int(p_len.max())
    prefix_ids = torch.full((B, P), pad_id, dtype=c_ids.dtype, device=c_ids.device)
    prefix_mask = torch.zeros(B, P, dtype=torch.long, device=c_ids.device)
    seqs, masks, lms = [], [], []
    for b in range(B):
        n = int(p_len[b])
        prefix_ids[b, P - n :] = c_ids[b, :n]
        prefix_mask[b, P - n :] = 1
        for ids, att, lm in ((c_ids, c_att, c_lm), (r_ids, r_att, r_lm)):
            L = int(att[b].sum())
            seqs.append(ids[b, n:L])
            masks.append(torch.ones(L - n, dtype=torch.long, device=c_ids.device))
            lms.append(lm[b, n:L].long())
    S = max(1, max(len(s) for s in seqs))

    def pad(xs, value):
        out = torch.full((len(xs), S), value, dtype=xs[0].dtype, device=c_ids.device)
        for i, x in enumerate(xs):
            out[i, : len(x)] = x
        return out

    return {
        "prefix_ids": prefix_ids,
        "prefix_mask": prefix_mask,
        "suffix_ids": pad(seqs, pad_id),
        "suffix_mask": pad(masks, 0),
        "suffix_loss_mask": pad(lms, 0),
    }


def shared_prompt_pair_logprob_sums(
    model: nn.Module, batch: dict[str, torch.Tensor], pad_id: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """DPO's ``pair_logps`` (summed response log-probs of chosen and rejected, ``[B]`` each)
    with each pair's prompt run once and the LM head on response tokens only."""

    trunk, lm_head = _trunk_head(model)
    s = split_pairs(batch, pad_id)
    h_last_ND, h_NSD = shared_prefix_hidden(
        trunk, s["prefix_ids"], s["prefix_mask"], s["suffix_ids"], s["suffix_mask"]
    )
    h_NSD = torch.cat([h_last_ND.unsqueeze(1), h_NSD[:, :-1]], dim=1)  # predicts suffix token j
    sel_NS = s["suffix_loss_mask"].bool()
    lp_M = logprobs_from_logits(
        lm_head(h_NSD[sel_NS]).float().unsqueeze(0), s["suffix_ids"][sel_NS].unsqueeze(0)
    )[0]
    N, S = sel_NS.shape
    rows_M = torch.arange(N, device=lp_M.device).unsqueeze(1).expand(N, S)[sel_NS]
    lp_N = torch.zeros(N, dtype=lp_M.dtype, device=lp_M.device).index_add(0, rows_M, lp_M)
    return lp_N[0::2], lp_N[1::2]


def shared_prompt_pair_scores(
    rm: nn.Module, batch: dict[str, torch.Tensor], pad_id: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """``pair_scores`` of a causal-LM ``RewardModel`` (raw head outputs ``[B, k]`` of chosen and
    rejected at their last real token) with each pair's prompt run once."""
    s = split_pairs(batch, pad_id)
    h_last_ND, h_NSD = shared_prefix_hidden(
        rm.trunk(), s["prefix_ids"], s["prefix_mask"], s["suffix_ids"], s["suffix_mask"]
    )
    last_N = s["suffix_mask"].sum(1) - 1
    h_ND = h_NSD[torch.arange(h_NSD.shape[0], device=h_NSD.device), last_N]
    scores = rm.head(h_ND).float()
    # The prefix pass reaches the scores only through its keys and values; its output is kept in
    # the graph (times 0: no value or gradient changes) because FSDP2 re-gathers a sharded
    # block's parameters for the backward from a hook on that block's forward output, and the
    # last block's prefix output would otherwise never receive a gradient.
    scores = scores + 0.0 * h_last_ND.sum()
    return scores[0::2], scores[1::2]
