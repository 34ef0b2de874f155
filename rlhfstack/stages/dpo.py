"""Direct Preference Optimization (Rafailov et al. 2023), IPO and conservative DPO.

Reference log-probs are computed once, before training, in one no-grad pass over the data
(the reference is frozen, so they never change). Each pair's prompt runs once for both responses
and the LM head sees response tokens only (``dpo.shared_prompt``; same log-probs, fewer FLOPs).
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from rlhfstack.config import DPOConfig
from rlhfstack.data.collate import collate_preference, tokenize_preference
from rlhfstack.data.loading import load_preferences
from rlhfstack.losses import dpo_loss
from rlhfstack.models.core import load_causal_lm, save_hf, sequence_logprob_sums, tokenizer_for
from rlhfstack.rollout.fast import shared_prompt_pair_logprob_sums
from rlhfstack.runtime import plot_metrics, write_stage_done
from rlhfstack.training import setup_run, shared_prompt_pad, train_loop

log = logging.getLogger("rlhfstack.dpo")


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
        except ValueError:  # the prompts differ (truncated differently): the plain pass
            pass
    B = batch["chosen_input_ids"].shape[0]
    ids = torch.cat([batch["chosen_input_ids"], batch["rejected_input_ids"]])
    att = torch.cat([batch["chosen_attention_mask"], batch["rejected_attention_mask"]])
    lm = torch.cat([batch["chosen_loss_mask"], batch["rejected_loss_mask"]])
    lp = sequence_logprob_sums(model, ids, att, lm)
    return lp[:B], lp[B:]


def train(cfg: DPOConfig) -> Path:
    run = setup_run(cfg)
    tok = tokenizer_for(cfg.model)
    policy = load_causal_lm(
        cfg.model.path,
        dtype=cfg.model.dtype,
        lora=cfg.model.lora,
        activation_checkpointing=cfg.model.activation_checkpointing,
        device=run.device,
    )
    max_len = cfg.data.max_prompt_tokens + cfg.data.max_response_tokens
    pairs, rep = load_preferences(
        cfg.data.train_path,
        adapter=cfg.data.adapter,
        template=cfg.data.template,
        on_error=cfg.data.on_error,
        data_root=cfg.data_root,
        tokenizer=tok,
        max_prompt_tokens=cfg.data.max_prompt_tokens,
        max_response_tokens=cfg.data.max_response_tokens,
    )
    log.info("DPO data: %s", rep.summary())
    if cfg.data.max_examples:
        pairs = pairs[: cfg.data.max_examples]
    items = tokenize_preference(pairs, tok, max_len)
    ps = run.dist
    shared_pad = shared_prompt_pad(cfg.dpo.shared_prompt, tok.pad_token_id, items, ps)

    # reference log-probs, once
    ref = None
    if not cfg.model.lora.enabled or cfg.dpo.ref_path:
        ref = load_causal_lm(
            cfg.dpo.ref_path or cfg.model.path,
            dtype=cfg.model.dtype,
            trainable=False,
            device=run.device,
        )
    with torch.no_grad():
        for i in range(0, len(items), 64):
            chunk = items[i : i + 64]
            b = {
                k: v.to(run.device) for k, v in collate_preference(chunk, tok.pad_token_id).items()
            }
            if ref is not None:
                c, r = pair_logps(ref, b, shared_pad)
            else:  # LoRA: the reference is the policy with its adapter switched off
                with policy.disable_adapter():
                    c, r = pair_logps(policy, b, shared_pad)
            for it, cc, rr in zip(chunk, c.tolist(), r.tolist()):
                it["ref_chosen"], it["ref_rejected"] = cc, rr
    del ref

    def collate(batch):
        out = collate_preference(batch, tok.pad_token_id)
        out["ref_chosen"] = torch.tensor([b["ref_chosen"] for b in batch])
        out["ref_rejected"] = torch.tensor([b["ref_rejected"] for b in batch])
        return out

    def loss_fn(mb, n_in_step):
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

    policy.train()
    steps = train_loop(
        run,
        params=[p for p in policy.parameters() if p.requires_grad],
        items=items,
        collate=collate,
        loss_fn=loss_fn,
        max_steps=cfg.trainer.max_steps,
        epochs=cfg.dpo.epochs,
        tokens_fn=lambda b: int(
            b["chosen_attention_mask"].sum() + b["rejected_attention_mask"].sum()
        ),
        model=policy,
    )
    policy.eval()
    save_hf(policy, tok, run.run_dir / "model")
    run.logger.close()
    if cfg.logging.plots:
        plot_metrics(run.run_dir / "metrics.jsonl", run.run_dir / "plots")
    write_stage_done(run.run_dir, {"stage": "dpo", "steps": steps, "cost": run.cost.summary()})
    return run.run_dir
