"""Direct Preference Optimization (Rafailov et al. 2023), IPO, conservative DPO and KTO.

Reference log-probs are computed once, before training, in one no-grad pass over the data
(the reference is frozen, so they never change). Each pair's prompt runs once for both responses
and the LM head sees response tokens only (``dpo.shared_prompt``; same log-probs, fewer FLOPs).

KTO (``dpo.loss_type=kto``, Ethayarajh et al. 2024) reads each pair as two unpaired examples:
``(x, y_chosen)`` desirable and ``(x, y_rejected)`` undesirable. Its reference point
``z0 = KL(pi || pi_ref)`` is estimated, as in the paper, from mismatched pairs: pair ``i``'s prompt
with both responses of pair ``sigma(i)``, ``sigma`` a fixed seeded derangement of the data set.
Because the mismatched sequences are fixed, their reference log-probs are also computed once; the
policy scores them in a no-grad pass each micro-batch (no gradient flows through ``z0``), and
``z0 = mean(log pi - log pi_ref)`` over them, clamped at 0 (per micro-batch and rank).
"""

from __future__ import annotations

import json
import logging
import shutil
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from rlhfstack.configs import DPOConfig, recipe_diff, recipe_of
from rlhfstack.data import map_records, require_field
from rlhfstack.data.collate import (
    IGNORE_INDEX,
    collate_preference,
    collate_sft,
    tokenize_preference,
    tokenize_sft,
)
from rlhfstack.data.loading import load_preferences, load_unpaired, resolve_data_path
from rlhfstack.data.schemas import PreferenceExample, SFTExample
from rlhfstack.feedback import (
    build_feedback_model,
    label_pairs_with_feedback,
    load_constitution,
    preference_rows,
    resolve_constitution_path,
)
from rlhfstack.losses import DPO_LOSS_TYPES, dpo_loss, kto_loss
from rlhfstack.models.core import load_causal_lm, save_hf, sequence_logprob_sums, tokenizer_for
from rlhfstack.models.pairs import shared_prompt_pair_logprob_sums
from rlhfstack.rewards import label_pairs_by_reward, load_reward
from rlhfstack.rollout.generate import sample_pairs, sampled_logprob_sums
from rlhfstack.runtime import atomic_write_json, atomic_write_jsonl, read_jsonl
from rlhfstack.tasks.demo import cut_at_sentence, load_gold
from rlhfstack.tasks.stories import default_labeler_pool, label_pairs
from rlhfstack.training import (
    RecipeMismatch,
    finish_stage,
    load_policy,
    load_train_eval,
    setup_run,
    shared_prompt_pad,
    train_loop,
)

log = logging.getLogger("rlhfstack.dpo")


def _prompt_of(row: Any) -> str:
    return require_field(row, "prompt", str)


def pair_logps(
    model, batch: dict[str, torch.Tensor], pad_id: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed response log-probs of chosen and rejected ``[B]`` each.

    With ``pad_id`` (``dpo.shared_prompt``): each pair's prompt runs once and the LM head sees
    response tokens only (:func:`shared_prompt_pair_logprob_sums`); a batch whose chosen and
    rejected prompts differ falls back to the plain pass. Without: one ``[2B, T]`` forward.
    """
    if pad_id is not None:
        try:
            return shared_prompt_pair_logprob_sums(model, batch, pad_id)
        except ValueError:  # the prompts differ (pairs built that way): the plain pass
            pass
    B = batch["chosen_input_ids"].shape[0]
    ids = torch.cat([batch["chosen_input_ids"], batch["rejected_input_ids"]])
    att = torch.cat([batch["chosen_attention_mask"], batch["rejected_attention_mask"]])
    lm = torch.cat([batch["chosen_loss_mask"], batch["rejected_loss_mask"]])
    lp = sequence_logprob_sums(model, ids, att, lm)
    return lp[:B], lp[B:]


KL_PREFIX = "kl_"
"""Batch keys of KTO's mismatched pairs (``kl_chosen_input_ids``, ...)."""


def derangement(n: int, seed: int) -> list[int]:
    """``sigma`` with ``sigma[i] != i`` for every i: a seeded permutation's cycle shifted by one."""
    if n < 2:
        raise ValueError(f"KTO needs at least 2 examples for its KL reference point, got {n}")
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    sigma = [0] * n
    for k in range(n):
        sigma[perm[k]] = perm[(k + 1) % n]
    return sigma


def mismatched_pairs(pairs: list[PreferenceExample], sigma: list[int]) -> list[PreferenceExample]:
    """Pair ``i``'s prompt with the chosen and rejected responses of pair ``sigma[i]``."""
    return [
        PreferenceExample(prompt=p.prompt, chosen=pairs[j].chosen, rejected=pairs[j].rejected)
        for p, j in zip(pairs, sigma, strict=True)
    ]


def kto_pair_loss(
    pc_B: torch.Tensor,
    pr_B: torch.Tensor,
    ref_c_B: torch.Tensor,
    ref_r_B: torch.Tensor,
    kl_policy_B2: torch.Tensor,
    kl_ref_B2: torch.Tensor,
    beta: float,
    desirable_weight: float,
    undesirable_weight: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """KTO over ``B`` pairs read as ``2B`` examples (chosen desirable, rejected undesirable).

    ``kl_*_B2``: ``[B, 2]`` log-probs of the mismatched sequences under policy and reference;
    ``z0 = mean(kl_policy - kl_ref)`` (:func:`rlhfstack.losses.kto_loss` detaches and clamps it).
    Returns ``(losses_2B, chosen_rewards_B, rejected_rewards_B, z0_raw)``; ``z0_raw`` is the
    estimate before the clamp at 0 (the loss uses ``max(z0_raw, 0)``).
    """
    B = pc_B.shape[0]
    z0 = (kl_policy_B2 - kl_ref_B2).mean().detach()  # KL(pi || pi_ref) estimate, mismatched pairs
    desirable_2B = torch.cat([torch.ones(B), torch.zeros(B)]).bool().to(pc_B.device)
    losses, rewards = kto_loss(
        torch.cat([pc_B, pr_B]),
        torch.cat([ref_c_B, ref_r_B]),
        desirable_2B,
        z0,
        beta=beta,
        desirable_weight=desirable_weight,
        undesirable_weight=undesirable_weight,
    )
    return losses, rewards[:B], rewards[B:], z0


def _reference(cfg: DPOConfig, run: Any) -> Any:
    """The frozen reference (``dpo.ref_path`` or the starting model), or None under LoRA, where
    the policy with its adapter switched off is the reference."""
    if cfg.model.lora.enabled and not cfg.dpo.ref_path:
        return None
    return load_causal_lm(
        cfg.dpo.ref_path or cfg.model.path,
        dtype=cfg.model.dtype,
        trainable=False,
        device=run.device,
    )


def _under_reference(ref: Any, policy: Any, score: Any) -> Any:
    """``score(model)`` without gradients on the reference: ``ref``, or under LoRA (``ref`` is
    None) the policy with its adapter switched off."""
    with torch.no_grad():
        if ref is not None:
            return score(ref)
        with policy.disable_adapter():
            return score(policy)


_LOAD = object()
"""``_pair_setup(reference=_LOAD)``: load the frozen reference (:func:`_reference`)."""


def _pair_setup(
    cfg: DPOConfig,
    run: Any,
    tok: Any,
    policy: Any,
    max_len: int,
    kto: bool,
    pairs: list[PreferenceExample] | None = None,
    reference: Any = _LOAD,
):
    """Preference pairs: items with reference log-probs, collate, loss and token count (DPO / IPO /
    cDPO, or KTO over pairs split into a desirable and an undesirable example).

    ``pairs``: None = ``data.train_path``. ``reference``: the model whose log-probs are the
    reference's (an online round's ``previous`` passes the policy itself, scored before training);
    by default :func:`_reference` is loaded."""
    if pairs is None:
        pairs, _ = load_train_eval(load_preferences, cfg, "DPO", tokenizer=tok, with_eval=False)
    items = tokenize_preference(pairs, tok, max_len)
    kl_items: list[dict] = []
    if kto:
        kl_items = tokenize_preference(
            mismatched_pairs(pairs, derangement(len(pairs), cfg.seed)), tok, max_len
        )
    ps = run.dist
    shared_pad = shared_prompt_pad(cfg.dpo.shared_prompt, tok.pad_token_id, items + kl_items, ps)

    # reference log-probs, once
    ref = _reference(cfg, run) if reference is _LOAD else reference
    for group, prefix in ((items, ""), (kl_items, KL_PREFIX)):
        for i in range(0, len(group), 64):
            chunk = group[i : i + 64]
            b = {
                k: v.to(run.device) for k, v in collate_preference(chunk, tok.pad_token_id).items()
            }
            c, r = _under_reference(ref, policy, lambda m, b=b: pair_logps(m, b, shared_pad))
            for j, cc, rr in zip(range(i, i + len(chunk)), c.tolist(), r.tolist()):
                items[j][f"{prefix}ref_chosen"], items[j][f"{prefix}ref_rejected"] = cc, rr
    del ref
    for it, kl_it in zip(items, kl_items):
        it.update({KL_PREFIX + k: v for k, v in kl_it.items()})

    def collate(batch):
        out = collate_preference(batch, tok.pad_token_id)
        out["ref_chosen"] = torch.tensor([b["ref_chosen"] for b in batch])
        out["ref_rejected"] = torch.tensor([b["ref_rejected"] for b in batch])
        if kto:  # the mismatched pairs, padded on their own, under kl_ keys
            kl = [
                {k[len(KL_PREFIX) :]: v for k, v in b.items() if k.startswith(KL_PREFIX)}
                for b in batch
            ]
            out.update(
                {KL_PREFIX + k: v for k, v in collate_preference(kl, tok.pad_token_id).items()}
            )
            out["kl_ref_B2"] = torch.tensor(
                [[b["kl_ref_chosen"], b["kl_ref_rejected"]] for b in batch]
            )
        return out

    def kto_loss_fn(mb, n_in_step):
        pc, pr = pair_logps(policy, mb, shared_pad)
        with torch.no_grad():
            kl_mb = {k[len(KL_PREFIX) :]: v for k, v in mb.items() if k.startswith(KL_PREFIX)}
            kc, kr = pair_logps(policy, kl_mb, shared_pad)
        losses, cr, rr, z0 = kto_pair_loss(
            pc,
            pr,
            mb["ref_chosen"],
            mb["ref_rejected"],
            torch.stack([kc, kr], dim=1),
            mb["kl_ref_B2"],
            beta=cfg.dpo.beta,
            desirable_weight=cfg.dpo.kto_desirable_weight,
            undesirable_weight=cfg.dpo.kto_undesirable_weight,
        )
        return losses.sum() / (2 * n_in_step), {  # mean over the step's 2B examples
            "reward_accuracy": float((cr > rr).float().mean()),
            "reward_margin": float((cr - rr).mean()),
            "chosen_reward": float(cr.mean()),
            "rejected_reward": float(rr.mean()),
            "kto_kl_ref": float(z0.clamp(min=0)),  # z0 the loss used
            "kto_kl_ref_raw": float(z0),  # before the clamp: < 0 when mismatched pairs lost mass
        }

    def loss_fn(mb, n_in_step):
        if kto:
            return kto_loss_fn(mb, n_in_step)
        pc, pr = pair_logps(policy, mb, shared_pad)
        losses, cr, rr = dpo_loss(
            pc,
            pr,
            mb["ref_chosen"],
            mb["ref_rejected"],
            beta=cfg.dpo.beta,
            label_smoothing=cfg.dpo.label_smoothing,
            loss_type=cfg.dpo.loss_type,
        )
        return losses.sum() / n_in_step, {
            "reward_accuracy": float((cr > rr).float().mean()),
            "reward_margin": float((cr - rr).mean()),
            "chosen_reward": float(cr.mean()),
            "rejected_reward": float(rr.mean()),
        }

    def tokens_fn(b):
        return int(b["chosen_attention_mask"].sum() + b["rejected_attention_mask"].sum())

    return items, collate, loss_fn, tokens_fn


def _unpaired_kto_setup(cfg: DPOConfig, run: Any, tok: Any, policy: Any, max_len: int):
    """KTO on unpaired ``{prompt, completion, label}`` rows: items with reference log-probs of the
    example and of its mismatched sequence (prompt i, completion sigma(i)), collate, loss, tokens."""
    examples, _ = load_train_eval(
        load_unpaired, cfg, "KTO unpaired", tokenizer=tok, with_eval=False
    )
    n_d = sum(e.desirable for e in examples)
    n_u = len(examples) - n_d
    if n_d == 0 or n_u == 0:
        raise ValueError(
            f"{cfg.data.train_path}: KTO needs desirable and undesirable examples, "
            f"got {n_d} desirable and {n_u} undesirable"
        )
    ratio = cfg.dpo.kto_desirable_weight * n_d / (cfg.dpo.kto_undesirable_weight * n_u)
    log.info(
        "KTO: %d desirable, %d undesirable; lambda_D n_D / (lambda_U n_U) = %.3f", n_d, n_u, ratio
    )
    if not 1.0 <= ratio <= 4.0 / 3.0:
        log.warning(
            "KTO: lambda_D n_D / (lambda_U n_U) = %.3f is outside [1, 4/3], the range Ethayarajh "
            "et al. 2024 recommend; set dpo.kto_desirable_weight / kto_undesirable_weight",
            ratio,
        )
    sigma = derangement(len(examples), cfg.seed)
    mismatched = [
        SFTExample(prompt=e.prompt, completion=examples[j].completion)
        for e, j in zip(examples, sigma, strict=True)
    ]
    items = tokenize_sft(examples, tok, max_len)
    kl_items = tokenize_sft(mismatched, tok, max_len)
    for it, kl_it, e in zip(items, kl_items, examples, strict=True):
        it["desirable"] = bool(e.desirable)
        it["kl_input_ids"], it["kl_labels"] = kl_it["input_ids"], kl_it["labels"]

    def seq_batch(batch, prefix=""):
        b = collate_sft(
            [{"input_ids": x[f"{prefix}input_ids"], "labels": x[f"{prefix}labels"]} for x in batch],
            tok.pad_token_id,
        )
        return {
            f"{prefix}input_ids": b["input_ids"],
            f"{prefix}attention_mask": b["attention_mask"],
            f"{prefix}loss_mask": (b["labels"] != IGNORE_INDEX).long(),
        }

    def logps(model, b, prefix=""):
        return sequence_logprob_sums(
            model, b[f"{prefix}input_ids"], b[f"{prefix}attention_mask"], b[f"{prefix}loss_mask"]
        )

    ref = _reference(cfg, run)
    # reference log-probs of the examples and of their mismatched sequences, once
    for i in range(0, len(items), 64):
        chunk = items[i : i + 64]
        for prefix in ("", KL_PREFIX):
            b = {k: v.to(run.device) for k, v in seq_batch(chunk, prefix).items()}
            lp = _under_reference(ref, policy, lambda m, b=b, p=prefix: logps(m, b, p))
            for it, v in zip(chunk, lp.tolist()):
                it[f"{prefix}ref"] = v
    del ref

    def collate(batch):
        out = {**seq_batch(batch), **seq_batch(batch, KL_PREFIX)}
        out["desirable"] = torch.tensor([b["desirable"] for b in batch])
        out["ref"] = torch.tensor([b["ref"] for b in batch])
        out["kl_ref"] = torch.tensor([b["kl_ref"] for b in batch])
        return out

    def loss_fn(mb, n_in_step):
        lp = logps(policy, mb)
        with torch.no_grad():
            z0 = (logps(policy, mb, KL_PREFIX) - mb["kl_ref"]).mean()  # KL(pi || pi_ref) estimate
        losses, rewards = kto_loss(
            lp,
            mb["ref"],
            mb["desirable"],
            z0,
            beta=cfg.dpo.beta,
            desirable_weight=cfg.dpo.kto_desirable_weight,
            undesirable_weight=cfg.dpo.kto_undesirable_weight,
        )
        sign = mb["desirable"].float() * 2 - 1  # +1 desirable, -1 undesirable
        stats = {
            "kto_kl_ref": float(z0.clamp(min=0)),
            "kto_kl_ref_raw": float(z0),
            "desirable_fraction": float((sign > 0).float().mean()),
            # beta r with the label's sign (> 0: moved the intended way), and how often it is > 0
            "signed_reward": float((sign * rewards).mean()),
            "reward_accuracy": float((sign * rewards > 0).float().mean()),
        }
        return losses.sum() / n_in_step, stats

    def tokens_fn(b):
        return int(b["attention_mask"].sum())

    return items, collate, loss_fn, tokens_fn


def _check_rounds(cfg: DPOConfig) -> None:
    """Settings and inputs of iterative DPO (``dpo.rounds > 1``), before anything loads."""
    d = cfg.dpo
    bad = []
    if d.kto_unpaired:
        bad.append("dpo.kto_unpaired=true (the online rounds sample pairs)")
    if cfg.model.lora.enabled:
        bad.append("model.lora.enabled=true (each round's policy is saved merged)")
    if cfg.trainer.save_every:
        bad.append(
            "trainer.save_every > 0 (a run resumes at the start of its first unfinished round)"
        )
    par = cfg.parallel
    if par.mixed_precision != "none" or (par.dp_shard, par.tp, par.pp) != (1, 1, 1):
        bad.append("parallel.* (the online rounds sample in one process)")
    if bad:
        raise NotImplementedError(f"dpo.rounds={d.rounds}: not supported with " + "; ".join(bad))
    missing = []
    if not d.online_prompts_path:
        missing.append("dpo.online_prompts_path: required when dpo.rounds > 1")
    elif not Path(resolve_data_path(d.online_prompts_path, cfg.data_root)).is_file():
        missing.append(f"dpo.online_prompts_path={d.online_prompts_path!r}: no such file")
    if d.online_labeler == "simulated":
        gold_dir = Path(d.online_gold_dir or cfg.artifacts_dir)
        for need in ("data/gold.json", "base_model/config.json"):
            if not (gold_dir / need).is_file():
                missing.append(
                    f"dpo.online_gold_dir={str(gold_dir)!r}: the simulated labelers read "
                    f"{need}; none there"
                )
    elif d.online_labeler == "ai_feedback":
        try:
            resolve_constitution_path(d.online_feedback.constitution)
        except FileNotFoundError as err:
            missing.append(f"dpo.online_feedback.constitution: {err}")
    elif not d.online_reward_path or not Path(d.online_reward_path).is_dir():
        missing.append(
            f"dpo.online_reward_path={d.online_reward_path!r}: online_labeler=reward_model needs "
            "a reward model directory"
        )
    if missing:
        raise FileNotFoundError("missing inputs:\n  " + "\n  ".join(missing))


def train(cfg: DPOConfig) -> Path:
    if cfg.dpo.loss_type not in (*DPO_LOSS_TYPES, "kto"):
        raise ValueError(
            f"dpo.loss_type={cfg.dpo.loss_type!r}: expected one of {(*DPO_LOSS_TYPES, 'kto')}"
        )
    kto = cfg.dpo.loss_type == "kto"
    if cfg.dpo.kto_unpaired and not kto:
        raise ValueError(
            f"dpo.kto_unpaired=true needs dpo.loss_type=kto, got {cfg.dpo.loss_type!r}"
        )
    if kto and cfg.parallel.pp > 1:
        raise ValueError(
            "dpo.loss_type=kto: pipeline parallelism (parallel.pp > 1) is not supported "
            "(its no-grad pass over the mismatched pairs is not scheduled)"
        )
    if cfg.dpo.rounds > 1:
        _check_rounds(cfg)
    run = setup_run(cfg)
    tok = tokenizer_for(cfg.model)
    policy = load_policy(cfg, run)
    max_len = cfg.data.max_prompt_tokens + cfg.data.max_response_tokens
    if cfg.dpo.rounds > 1:
        return _train_rounds(cfg, run, tok, policy, max_len, kto)
    if cfg.dpo.kto_unpaired:
        items, collate, loss_fn, tokens_fn = _unpaired_kto_setup(cfg, run, tok, policy, max_len)
    else:
        items, collate, loss_fn, tokens_fn = _pair_setup(cfg, run, tok, policy, max_len, kto)

    policy.train()
    steps = train_loop(
        run,
        params=[p for p in policy.parameters() if p.requires_grad],
        items=items,
        collate=collate,
        loss_fn=loss_fn,
        max_steps=cfg.trainer.max_steps,
        epochs=cfg.dpo.epochs,
        tokens_fn=tokens_fn,
        model=policy,
    )
    return finish_stage(run, "dpo", steps, model=policy, tokenizer=tok, labels=len(items))


# ---------------------------------------------------------------------------- iterative DPO


ROUND_DIR = "round-{r}"
"""``run_dir/round-<r>/``: a finished round's ``model/`` (not for the last round: that is
``run_dir/model``), ``pairs.jsonl`` (the labeled pairs it trained on, for an online round),
``metrics.jsonl`` (its rows) and ``done.json`` (its summary, written last)."""


class _RoundLogger:
    """The run's logger for one round: steps continue from the rounds before (``offset``), every
    row carries ``round``, and the first row also the round's sampling and labeling statistics."""

    def __init__(self, base: Any, r: int, offset: int, first: dict[str, Any]) -> None:
        self.base, self.r, self.offset, self.first = base, r, offset, dict(first)
        self.rows: list[dict[str, Any]] = []

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        row = {"round": self.r, **metrics, **self.first}
        self.first = {}
        self.rows.append({"step": self.offset + step, **row})
        self.base.log(self.offset + step, row)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.base, name)


def _round_prompts(cfg: DPOConfig, prompts: list[str], r: int) -> list[str]:
    """Round ``r``'s ``online_pairs`` prompts: a seeded draw without replacement (with replacement
    only when the file holds fewer prompts)."""
    n = cfg.dpo.online_pairs
    rng = np.random.default_rng([cfg.seed, r])
    idx = rng.choice(len(prompts), size=n, replace=n > len(prompts))
    return [prompts[int(i)] for i in idx]


def _label_online(
    cfg: DPOConfig, run: Any, tok: Any, prompts: list[str], a: list[str], b: list[str], r: int
) -> tuple[list[dict[str, Any]], dict[str, float]]:
    """Label the sampled pairs with ``dpo.online_labeler``: rows ``{prompt, chosen, rejected,
    ...}`` (pairs of identical texts and, for a reward model, exact ties dropped) and statistics
    for the round's first metrics row."""
    if cfg.dpo.online_labeler == "simulated":
        gold = load_gold(cfg.dpo.online_gold_dir or cfg.artifacts_dir, run.device)
        pool = default_labeler_pool(cfg.dpo.online_flip_prob)
        rows = label_pairs(prompts, a, b, gold, pool, seed=cfg.seed * 1000 + r)
        stats = {}
        if rows:
            gold_ab = [x for row in rows for x in (row["gold_chosen"], row["gold_rejected"])]
            stats = {
                "online/samples_gold": float(np.mean(gold_ab)),  # the current policy's gold
                "online/label_gold_agreement": float(
                    np.mean([row["agrees_with_gold"] for row in rows])
                ),
            }
        return rows, stats
    if cfg.dpo.online_labeler == "ai_feedback":
        fcfg = cfg.dpo.online_feedback
        fb = build_feedback_model(fcfg, device=run.device)
        keep = [i for i in range(len(prompts)) if a[i] != b[i]]  # identical texts: no preference
        p_, a_, b_ = ([x[i] for i in keep] for x in (prompts, a, b))
        cmp, names, _ = label_pairs_with_feedback(
            fb,
            p_,
            a_,
            b_,
            load_constitution(fcfg.constitution).principles,
            fcfg.principles,
            np.random.default_rng(cfg.seed * 1000 + r),
        )
        rows = preference_rows(p_, a_, b_, cmp, names)
        if not rows:
            return rows, {}
        return rows, {
            "online/mean_p_chosen": float(np.mean([row["p_chosen"] for row in rows])),
            "online/order_disagreement": cmp.order_disagreement,
            "online/feedback_cpu_seconds": fb.cpu_seconds,
        }
    reward = load_reward(cfg.dpo.online_reward_path, tok, device=run.device)
    rows = label_pairs_by_reward(reward, prompts, a, b)
    margins = [row["score_margin"] for row in rows]
    return rows, {"online/score_margin": float(np.mean(margins))} if margins else {}


def _sample_round(
    cfg: DPOConfig, run: Any, tok: Any, policy: Any, start: Any, prompts: list[str], r: int
) -> tuple[list[dict[str, Any]], dict[str, float]]:
    """Round ``r``'s labeled pairs: two samples per drawn prompt from the current ``policy``, cut
    at the last sentence end when configured, labeled; with the sequence KL (k1) of the policy to
    the starting model ``start`` on those samples."""
    d = cfg.dpo
    chosen_prompts = _round_prompts(cfg, prompts, r)
    policy.eval()
    a, b = sample_pairs(
        policy,
        tok,
        chosen_prompts,
        max_new_tokens=d.online_max_new_tokens,
        max_prompt_tokens=cfg.data.max_prompt_tokens,
        temperature=d.online_temperature,
        seed=cfg.seed * 1000 + r,
        device=run.device,
        stop_ids=(tok.eos_token_id, tok.bos_token_id),
    )
    run.cost.add_tokens(a.n_tokens + b.n_tokens)
    kl = []
    for s in (a, b):
        lp_pi, _ = sampled_logprob_sums(policy, s, tok.pad_token_id, device=run.device)
        lp_start, _ = sampled_logprob_sums(start, s, tok.pad_token_id, device=run.device)
        kl.append(lp_pi - lp_start)
    texts_a, texts_b = a.texts, b.texts
    if d.online_cut_at_sentence:
        texts_a = [cut_at_sentence(t) for t in texts_a]
        texts_b = [cut_at_sentence(t) for t in texts_b]
    rows, stats = _label_online(cfg, run, tok, chosen_prompts, texts_a, texts_b, r)
    rows = [row for row in rows if row["chosen"].strip() and row["rejected"].strip()]
    stats["online/samples_kl_to_start"] = float(torch.cat(kl).mean())
    return rows, stats


def _finished_rounds(cfg: DPOConfig, run_dir: Path) -> list[dict[str, Any]]:
    """The ``done.json`` of each round finished before (1, 2, ... without a gap; the last round is
    the stage's own ``done.json``), checked against this run's recipe like a checkpoint."""
    done = []
    recipe = recipe_of(cfg)
    for r in range(1, cfg.dpo.rounds):
        path = run_dir / ROUND_DIR.format(r=r) / "done.json"
        if not path.is_file():
            break
        info = json.loads(path.read_text())
        diff = recipe_diff(info.get("recipe", {}), recipe)
        if diff and cfg.resume != "force":
            lines = "\n".join(f"  {k}: {x!r} -> {y!r}" for k, (x, y) in diff.items())
            raise RecipeMismatch(
                f"{path.parent} was written under other settings than this run's:\n{lines}\n"
                "Rerun with resume=force to continue from it, or overwrite=true to start over."
            )
        done.append(info)
    return done


def _train_rounds(cfg: DPOConfig, run: Any, tok: Any, policy: Any, max_len: int, kto: bool) -> Path:
    """Iterative DPO: for r = 1..K, pairs (round 1: ``data.train_path`` unless
    ``online_first_round``; else sampled from the current policy and labeled), the reference's
    log-probs on them (``online_reference``), then the DPO loop from the current policy with a
    fresh optimizer and schedule. A resumed run loads the newest finished round's policy."""
    d = cfg.dpo
    if cfg.overwrite:
        for old in sorted(run.run_dir.glob("round-*")):
            shutil.rmtree(old)
            log.warning("overwrite=true: deleted %s", old)
    finished = _finished_rounds(cfg, run.run_dir)
    if finished:
        last = run.run_dir / ROUND_DIR.format(r=len(finished)) / "model"
        policy.load_state_dict(load_causal_lm(str(last), dtype=cfg.model.dtype).state_dict())
        for info in finished:  # the earlier rounds' rows (setup_run started a fresh metrics.jsonl)
            for row in read_jsonl(
                run.run_dir / ROUND_DIR.format(r=info["round"]) / "metrics.jsonl"
            ):
                run.logger.log(row.pop("step"), row)
        log.info(
            "iterative DPO: rounds 1-%d finished before; resuming at round %d",
            len(finished),
            len(finished) + 1,
        )
    start = _reference(cfg, run)  # the SFT / starting model: KL of the samples, reference=sft
    prompts = map_records(d.online_prompts_path, _prompt_of, fmt="jsonl", data_root=cfg.data_root)
    summaries = [info["summary"] for info in finished]
    offset = sum(s["steps"] for s in summaries)
    labels_total = sum(s["labels"] for s in summaries)
    for r in range(len(finished) + 1, d.rounds + 1):
        rdir = run.run_dir / ROUND_DIR.format(r=r)
        rdir.mkdir(parents=True, exist_ok=True)
        stats: dict[str, Any] = {}
        if r == 1 and not d.online_first_round:
            pairs = None  # data.train_path
        else:
            rows, stats = _sample_round(cfg, run, tok, policy, start, prompts, r)
            atomic_write_jsonl(rdir / "pairs.jsonl", rows)
            pairs = [PreferenceExample(x["prompt"], x["chosen"], x["rejected"]) for x in rows]
        reference = start if (d.online_reference == "sft" or r == 1) else policy
        policy.eval()
        items, collate, loss_fn, tokens_fn = _pair_setup(
            cfg, run, tok, policy, max_len, kto, pairs=pairs, reference=reference
        )
        labels_total += len(items)
        stats = {"online/labels": len(items), "online/labels_total": labels_total, **stats}
        log.info("round %d/%d: %d pairs %s", r, d.rounds, len(items), stats)
        round_logger = _RoundLogger(run.logger, r, offset, stats)
        policy.train()
        steps = train_loop(
            replace(run, logger=round_logger),
            params=[p for p in policy.parameters() if p.requires_grad],
            items=items,
            collate=collate,
            loss_fn=loss_fn,
            max_steps=cfg.trainer.max_steps,
            epochs=d.epochs,
            tokens_fn=tokens_fn,
            model=None,  # no checkpoints within a round: a finished round is the resume point
        )
        summary = {"round": r, "steps": steps, "step_offset": offset, "labels": len(items), **stats}
        summaries.append(summary)
        offset += steps
        if r < d.rounds:
            policy.eval()
            save_hf(policy, tok, rdir / "model")
            atomic_write_jsonl(rdir / "metrics.jsonl", round_logger.rows)
            atomic_write_json(
                rdir / "done.json", {"round": r, "summary": summary, "recipe": recipe_of(cfg)}
            )
    del start
    return finish_stage(run, "dpo", offset, model=policy, tokenizer=tok, rounds=summaries)
