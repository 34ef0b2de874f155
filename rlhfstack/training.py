"""Pieces every training stage shares: run setup, optimizer, LR schedule, micro-batching.

Stages import this module; no stage imports another stage.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from rlhfstack.runtime import CostMeter, RunLogger, save_resolved_config, seed_everything

log = logging.getLogger("rlhfstack")


@dataclass
class Run:
    """What a stage needs about its run: where to write, how to log, what it cost."""

    cfg: Any
    run_dir: Path
    logger: RunLogger
    cost: CostMeter
    device: str


def setup_run(cfg: Any) -> Run:
    """Seed, set threads, create ``run_dir``, save the resolved config, open the metrics log."""
    from dataclasses import asdict

    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="[%(asctime)s][%(name)s] %(message)s")
    seed_everything(cfg.seed)
    if cfg.cluster.num_threads > 0:
        torch.set_num_threads(cfg.cluster.num_threads)
    device = cfg.cluster.device
    if device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("cluster.device=cuda but no CUDA device is visible")
    run_dir = Path(cfg.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    save_resolved_config(cfg, run_dir)
    logger = RunLogger(
        run_dir,
        tensorboard=cfg.logging.tensorboard,
        wandb=cfg.logging.wandb,
        wandb_mode=cfg.logging.wandb_mode,
        wandb_project=cfg.logging.wandb_project,
        config=asdict(cfg),
    )
    # a fresh (non-resumed) run starts a fresh metrics file
    if logger.path.exists():
        logger.path.unlink()
    return Run(cfg=cfg, run_dir=run_dir, logger=logger, cost=CostMeter(), device=device)


def build_optimizer(params: Iterable[nn.Parameter], tcfg: Any) -> torch.optim.Optimizer:
    """AdamW with the trainer's lr, betas, eps and weight decay."""
    return torch.optim.AdamW(
        [p for p in params if p.requires_grad],
        lr=tcfg.lr,
        betas=tuple(tcfg.adam_betas),
        eps=tcfg.adam_eps,
        weight_decay=tcfg.weight_decay,
    )


def build_scheduler(opt: torch.optim.Optimizer, tcfg: Any, total_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up, then linear (to 0), cosine (to 10%) or constant."""
    warm = max(0, int(tcfg.warmup_steps))
    total = max(1, int(total_steps))
    kind = tcfg.lr_schedule
    if kind not in ("linear", "cosine", "constant"):
        raise ValueError(f"trainer.lr_schedule: unknown schedule {kind!r} (linear | cosine | constant)")

    def factor(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        frac = min(1.0, (step - warm) / max(1, total - warm))
        if kind == "linear":
            return max(0.0, 1.0 - frac)
        if kind == "cosine":
            return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac))
        return 1.0

    return torch.optim.lr_scheduler.LambdaLR(opt, factor)


def micro_batches(batch: dict[str, torch.Tensor], micro: int) -> Iterator[dict[str, torch.Tensor]]:
    """Split a dict of equally-sized tensors along dim 0."""
    n = next(iter(batch.values())).shape[0]
    for i in range(0, n, micro):
        yield {k: v[i : i + micro] for k, v in batch.items()}


def clip_grad(params: Iterable[nn.Parameter], max_norm: float) -> float:
    """Clip the global gradient norm (0 disables); returns the pre-clip norm."""
    params = [p for p in params if p.grad is not None]
    if not params:
        return 0.0
    if max_norm and max_norm > 0:
        return float(torch.nn.utils.clip_grad_norm_(params, max_norm))
    return float(torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in params])))


def epoch_batches(n: int, batch_size: int, generator: torch.Generator) -> Iterator[list[int]]:
    """Shuffled index batches over ``n`` examples, repeating epochs forever (last partial batch dropped
    unless it is the only one)."""
    while True:
        perm = torch.randperm(n, generator=generator).tolist()
        full = n // batch_size
        if full == 0:
            yield perm
            continue
        for i in range(full):
            yield perm[i * batch_size : (i + 1) * batch_size]


def to_device(batch: dict[str, torch.Tensor], device: str) -> dict[str, torch.Tensor]:
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def train_loop(
    run: Run,
    *,
    params: list[nn.Parameter],
    items: list[Any],
    collate: Any,
    loss_fn: Any,
    max_steps: int,
    epochs: int = 1,
    eval_fn: Any | None = None,
    tokens_fn: Any | None = None,
) -> int:
    """The supervised loop shared by SFT, RM and DPO.

    ``collate(list_of_items) -> batch dict``; ``loss_fn(micro_batch, n_in_step) -> (loss, stats)``
    where the loss is already divided by the number of sequences in the whole step (so micro-batch
    gradients add up to the step's mean). ``max_steps == 0`` means ``epochs`` passes over ``items``.
    Returns the number of optimizer steps taken.
    """
    cfg = run.cfg
    tcfg = cfg.trainer
    bs = min(tcfg.batch_size, len(items))
    steps = max_steps if max_steps > 0 else max(1, epochs * (len(items) // bs))
    opt = build_optimizer(params, tcfg)
    sched = build_scheduler(opt, tcfg, steps)
    gen = torch.Generator().manual_seed(cfg.seed)
    batches = epoch_batches(len(items), bs, gen)
    micro = max(1, min(tcfg.micro_batch_size, bs))
    for step in range(1, steps + 1):
        idx = next(batches)
        batch = to_device(collate([items[i] for i in idx]), run.device)
        opt.zero_grad(set_to_none=True)
        agg: dict[str, float] = {}
        for mb in micro_batches(batch, micro):
            loss, stats = loss_fn(mb, len(idx))
            loss.backward()
            n_mb = next(iter(mb.values())).shape[0]
            agg["loss"] = agg.get("loss", 0.0) + float(loss.detach())
            for k, v in stats.items():
                agg[k] = agg.get(k, 0.0) + float(v) * n_mb / len(idx)
        if tokens_fn is not None:
            run.cost.add_tokens(tokens_fn(batch))
        agg["grad_norm"] = clip_grad(params, tcfg.grad_clip)
        opt.step()
        sched.step()
        agg["lr"] = sched.get_last_lr()[0]
        if eval_fn is not None and tcfg.eval_every and step % tcfg.eval_every == 0 and step < steps:
            agg.update(eval_fn())
        if step == steps and eval_fn is not None:
            agg.update(eval_fn())
        if step % tcfg.log_every == 0 or step == steps:
            run.logger.log(step, agg)
        if step % 20 == 0 or step == steps:
            log.info("step %d/%d loss %.4f", step, steps, agg["loss"])
    return steps
