"""Supervised fine-tuning: next-token cross-entropy on completion tokens (prompt tokens masked)."""

from __future__ import annotations

import logging
import math
from pathlib import Path

import torch

from rlhfstack.configs import SFTConfig
from rlhfstack.data.collate import IGNORE_INDEX, collate_sft, tokenize_sft
from rlhfstack.data.loading import load_sft
from rlhfstack.models.core import (
    causal_lm_parts,
    load_causal_lm,
    save_hf,
    tokenizer_for,
    trunk_hidden,
)
from rlhfstack.runtime import plot_metrics, write_stage_done
from rlhfstack.training import setup_run, train_loop

log = logging.getLogger("rlhfstack.sft")


def sft_loss(model, batch: dict[str, torch.Tensor], n_in_step: int) -> tuple[torch.Tensor, dict]:
    """Sum of token cross-entropies per sequence, averaged over the step's sequences' tokens.

    Token-level mean over the step: each micro-batch contributes ``sum(nll) / tokens_in_step``
    (``batch['step_tokens']`` carries the denominator).
    """
    trunk, head = causal_lm_parts(model)
    h = trunk_hidden(trunk, batch["input_ids"], batch["attention_mask"])
    logits = head(h[:, :-1]).float()
    labels = batch["labels"][:, 1:]
    nll = torch.nn.functional.cross_entropy(
        logits.reshape(-1, logits.shape[-1]),
        labels.reshape(-1),
        ignore_index=IGNORE_INDEX,
        reduction="sum",
    )
    n_tok = (labels != IGNORE_INDEX).sum()
    loss = nll / batch["step_tokens"][0]
    return loss, {"nll_per_token": float(nll.detach() / n_tok.clamp(min=1))}


def train(cfg: SFTConfig) -> Path:
    run = setup_run(cfg)
    tok = tokenizer_for(cfg.model)
    model = load_causal_lm(
        cfg.model.path,
        dtype=cfg.model.dtype,
        lora=cfg.model.lora,
        activation_checkpointing=cfg.model.activation_checkpointing,
        device=run.device,
    )
    max_len = cfg.data.max_prompt_tokens + cfg.data.max_response_tokens
    train_ex, rep = load_sft(
        cfg.data.train_path,
        adapter=cfg.data.adapter,
        template=cfg.data.template,
        on_error=cfg.data.on_error,
        data_root=cfg.data_root,
        tokenizer=tok,
        max_prompt_tokens=cfg.data.max_prompt_tokens,
        max_response_tokens=cfg.data.max_response_tokens,
    )
    log.info("SFT data: %s", rep.summary())
    if cfg.data.max_examples:
        train_ex = train_ex[: cfg.data.max_examples]
    items = tokenize_sft(train_ex, tok, max_len)
    if cfg.loss_on_prompt:
        for it in items:
            it["labels"] = list(it["input_ids"])
    val_items = []
    if cfg.data.eval_path:
        val_ex, _ = load_sft(
            cfg.data.eval_path,
            adapter=cfg.data.adapter,
            template=cfg.data.template,
            on_error=cfg.data.on_error,
            data_root=cfg.data_root,
        )
        val_items = tokenize_sft(val_ex, tok, max_len)

    def collate(batch):
        out = collate_sft(batch, tok.pad_token_id)
        n = (out["labels"][:, 1:] != IGNORE_INDEX).sum().float()
        out["step_tokens"] = n.repeat(out["input_ids"].shape[0])
        return out

    @torch.no_grad()
    def evaluate() -> dict[str, float]:
        if not val_items:
            return {}
        model.eval()
        tot, n = 0.0, 0
        for i in range(0, len(val_items), 64):
            b = collate(val_items[i : i + 64])
            b = {k: v.to(run.device) for k, v in b.items()}
            loss, _ = sft_loss(model, b, 1)
            tot += float(loss * b["step_tokens"][0])
            n += int(b["step_tokens"][0])
        model.train()
        return {
            "val/nll_per_token": tot / max(1, n),
            "val/ppl": math.exp(min(20.0, tot / max(1, n))),
        }

    model.train()
    steps = train_loop(
        run,
        params=[p for p in model.parameters() if p.requires_grad],
        items=items,
        collate=collate,
        loss_fn=lambda mb, n: sft_loss(model, mb, n),
        max_steps=cfg.trainer.max_steps,
        eval_fn=evaluate,
        tokens_fn=lambda b: int(b["attention_mask"].sum()),
        model=model,
    )
    model.eval()
    save_hf(model, tok, run.run_dir / "model")
    run.logger.close()
    if cfg.logging.plots:
        plot_metrics(run.run_dir / "metrics.jsonl", run.run_dir / "plots")
    write_stage_done(run.run_dir, {"stage": "sft", "steps": steps, "cost": run.cost.summary()})
    return run.run_dir
