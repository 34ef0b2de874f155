"""Reward model: a backbone plus a scalar head trained with the Bradley-Terry loss.

Ouyang et al. 2022, eq. 1: loss = -log sigmoid(r(x, y_c) - r(x, y_r)). The head reads the
last non-pad token (causal LM) or the mean-pooled encoder output. After training, rewards are
normalized so that samples of the starting policy score mean 0, std 1 (gain and bias recorded).
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch

from rlhfstack.config import RMConfig
from rlhfstack.data.collate import collate_preference, tokenize_preference
from rlhfstack.data.loading import load_preferences, load_prompts
from rlhfstack.evaluation.calibration import plot_reliability, reliability_bins
from rlhfstack.losses import bradley_terry_loss
from rlhfstack.models.core import RewardModel, load_causal_lm, load_tokenizer
from rlhfstack.rollout.generate import sample_texts
from rlhfstack.runtime import atomic_dir, atomic_write_json, plot_metrics, write_stage_done
from rlhfstack.training import setup_run, train_loop

log = logging.getLogger("rlhfstack.rm")


def build_reward_model(cfg: RMConfig, device: str) -> RewardModel:
    """Backbone from ``model.path`` + fresh scalar head(s)."""
    if cfg.rm.backbone == "causal_lm":
        backbone = load_causal_lm(cfg.model.path, dtype=cfg.model.dtype, device=device)
    elif cfg.rm.backbone == "encoder":
        from transformers import AutoModel

        from rlhfstack.models.core import disable_dropout

        backbone = AutoModel.from_pretrained(cfg.model.path)
        disable_dropout(backbone)
    else:
        raise ValueError(f"rm.backbone: unknown backbone {cfg.rm.backbone!r} (causal_lm | encoder)")
    return RewardModel(backbone, kind=cfg.rm.backbone, k=cfg.rm.ensemble_size, init_std=cfg.rm.head_init_std).to(device)


def pair_scores(rm: RewardModel, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Raw head outputs ``[B, k]`` for chosen and rejected, in one ``[2B, T]`` forward."""
    B = batch["chosen_input_ids"].shape[0]
    ids = torch.cat([batch["chosen_input_ids"], batch["rejected_input_ids"]])
    att = torch.cat([batch["chosen_attention_mask"], batch["rejected_attention_mask"]])
    s = rm.raw_scores(ids, att)
    return s[:B], s[B:]


@torch.no_grad()
def score_pairs(rm: RewardModel, items: list[dict], pad_id: int, device: str, bs: int = 64) -> tuple[np.ndarray, np.ndarray]:
    """Normalized mean rewards of chosen and rejected for tokenized pairs."""
    rm.eval()
    cs, rs = [], []
    for i in range(0, len(items), bs):
        b = {k: v.to(device) for k, v in collate_preference(items[i : i + bs], pad_id).items()}
        c = rm.score(b["chosen_input_ids"], b["chosen_attention_mask"])["mean"]
        r = rm.score(b["rejected_input_ids"], b["rejected_attention_mask"])["mean"]
        cs.append(c.cpu().numpy())
        rs.append(r.cpu().numpy())
    return np.concatenate(cs), np.concatenate(rs)


def preference_metrics(chosen: np.ndarray, rejected: np.ndarray, seed: int = 0) -> dict:
    """Accuracy, mean margin and calibration of P(chosen) = sigmoid(r_c - r_r).

    For calibration each pair is shown in a random order (otherwise every outcome would be 1).
    """
    diff = chosen - rejected
    rng = np.random.default_rng(seed)
    flip = rng.random(len(diff)) < 0.5
    d = np.where(flip, -diff, diff)
    probs = 1.0 / (1.0 + np.exp(-d))
    outcomes = (~flip).astype(float)
    rel = reliability_bins(probs, outcomes)
    return {
        "accuracy": float((diff > 0).mean() + 0.5 * (diff == 0).mean()),
        "n": int(len(diff)),
        "mean_margin": float(diff.mean()),
        "ece": rel["ece"],
        "reliability": rel,
    }


def train(cfg: RMConfig) -> Path:
    run = setup_run(cfg)
    device = run.device
    tok = load_tokenizer(cfg.model.tokenizer_path or cfg.model.path)
    rm = build_reward_model(cfg, device)
    max_len = cfg.data.max_prompt_tokens + cfg.data.max_response_tokens
    load_kw = dict(adapter=cfg.data.adapter, template=cfg.data.template, on_error=cfg.data.on_error,
                   data_root=cfg.data_root)
    pairs, rep = load_preferences(cfg.data.train_path, tokenizer=tok, max_prompt_tokens=cfg.data.max_prompt_tokens,
                                  max_response_tokens=cfg.data.max_response_tokens, **load_kw)
    log.info("RM data: %s", rep.summary())
    if cfg.data.eval_path:
        val_pairs, _ = load_preferences(cfg.data.eval_path, **load_kw)
    else:  # hold out a fraction of the training file
        rng = np.random.default_rng(cfg.seed)
        perm = rng.permutation(len(pairs))
        n_val = max(1, int(round(cfg.data.validation_fraction * len(pairs))))
        val_pairs = [pairs[i] for i in perm[:n_val]]
        pairs = [pairs[i] for i in perm[n_val:]]
    if cfg.data.max_examples:
        pairs = pairs[: cfg.data.max_examples]
    items = tokenize_preference(pairs, tok, max_len)
    val_items = tokenize_preference(val_pairs, tok, max_len)

    def loss_fn(mb, n_in_step):
        c, r = pair_scores(rm, mb)  # [b, k] each: every head gets its own BT loss
        loss, stats = bradley_terry_loss(c.reshape(-1), r.reshape(-1))
        return loss * c.shape[0] / n_in_step, {k: float(v) for k, v in stats.items()}

    def evaluate():
        c, r = score_pairs(rm, val_items, tok.pad_token_id, device)
        rm.train()
        return {"val/accuracy": float((c > r).mean())}

    rm.train()
    steps = train_loop(
        run, params=[p for p in rm.parameters() if p.requires_grad], items=items,
        collate=lambda b: collate_preference(b, tok.pad_token_id), loss_fn=loss_fn,
        max_steps=cfg.trainer.max_steps, epochs=cfg.rm.epochs, eval_fn=evaluate,
        tokens_fn=lambda b: int(b["chosen_attention_mask"].sum() + b["rejected_attention_mask"].sum()),
    )
    rm.eval()

    # ---- normalization: samples of the starting policy score mean 0, std 1
    norm = _fit_normalization(cfg, rm, tok, pairs, device)
    rm.gain.fill_(norm["gain"])
    rm.bias.fill_(norm["bias"])

    # ---- held-out evaluation (labels, and any extra files such as gold relabels)
    results: dict = {"normalization": norm, "train_pairs": len(items), "steps": steps}
    c, r = score_pairs(rm, val_items, tok.pad_token_id, device)
    m = preference_metrics(c, r, cfg.seed)
    results["heldout_accuracy"] = m["accuracy"]
    results["heldout"] = m
    plot_reliability(m["reliability"], run.run_dir / "calibration.png", "RM calibration (held-out labels)")
    for name, path in cfg.rm.extra_eval.items():
        ex, _ = load_preferences(path, **load_kw)
        ci, ri = score_pairs(rm, tokenize_preference(ex, tok, max_len), tok.pad_token_id, device)
        mi = preference_metrics(ci, ri, cfg.seed)
        results[f"heldout_accuracy_{name}"] = mi["accuracy"]
        results[f"heldout_{name}"] = mi
        plot_reliability(mi["reliability"], run.run_dir / f"calibration_{name}.png", f"RM calibration ({name})")
    log.info("RM held-out accuracy %.3f %s", results["heldout_accuracy"],
             {k: round(v, 3) for k, v in results.items() if k.startswith("heldout_accuracy_")})
    with atomic_dir(run.run_dir / "model") as tmp:
        rm.save(tmp)
        tok.save_pretrained(tmp)
    atomic_write_json(run.run_dir / "rm_results.json", results)
    run.logger.close()
    if cfg.logging.plots:
        plot_metrics(run.run_dir / "metrics.jsonl", run.run_dir / "plots")
    write_stage_done(run.run_dir, {"stage": "rm", "steps": steps, "cost": run.cost.summary()})
    return run.run_dir


@torch.no_grad()
def _fit_normalization(cfg: RMConfig, rm: RewardModel, tok, pairs, device: str) -> dict:
    prompts = [p.prompt for p in pairs][: cfg.rm.normalize_samples]
    if not cfg.rm.normalize or not prompts:
        return {"gain": 1.0, "bias": 0.0, "source": "none"}
    if cfg.rm.backbone == "causal_lm":
        policy = load_causal_lm(cfg.model.path, dtype=cfg.model.dtype, trainable=False, device=device)
        texts, _, _ = sample_texts(policy, tok, prompts, max_new_tokens=cfg.rm.normalize_max_new_tokens,
                                   max_prompt_tokens=cfg.data.max_prompt_tokens, seed=cfg.seed, device=device)
        source = "samples of the starting policy"
    else:
        texts = [p.chosen for p in pairs][: cfg.rm.normalize_samples]
        source = "chosen responses of the training pairs"
    from rlhfstack.data.schemas import PreferenceExample

    fake = [PreferenceExample(prompt=p, chosen=t or ".", rejected=(t or ".") + " ") for p, t in zip(prompts, texts)]
    items = tokenize_preference(fake, tok, cfg.data.max_prompt_tokens + cfg.data.max_response_tokens)
    rm.gain.fill_(1.0)
    rm.bias.fill_(0.0)
    raw, _ = score_pairs(rm, items, tok.pad_token_id, device)
    mu, sd = float(raw.mean()), float(raw.std() + 1e-8)
    return {"gain": 1.0 / sd, "bias": -mu / sd, "raw_mean": mu, "raw_std": sd, "n": len(raw), "source": source}
