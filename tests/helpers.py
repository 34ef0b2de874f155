"""Small assertions and settings shared by the test modules (import as ``from helpers import
close``: pytest puts ``tests/`` on ``sys.path``)."""

from __future__ import annotations

from typing import Any

import torch


def close(a: Any, b: Any, tol: float = 1e-6) -> bool:
    """``a`` and ``b`` (tensors, lists or numbers) equal within absolute ``tol``, compared in float64."""
    return torch.allclose(
        torch.as_tensor(a, dtype=torch.float64),
        torch.as_tensor(b, dtype=torch.float64),
        atol=tol,
        rtol=0,
    )


PPO_SMALL = [
    "trainer.batch_size=8",
    "trainer.micro_batch_size=2",
    "ppo.num_minibatches=2",
    "ppo.epochs=2",
    "rollout.max_new_tokens=8",
    "gold_eval_every=0",
    "logging.tensorboard=false",
    "logging.plots=false",
    "cluster.num_threads=1",
]
"""A PPO run at the smallest useful sizes (8 prompts, 2 minibatches of 2 micro-batches, 8 new
tokens; no gold evaluation, plots or TensorBoard): the distributed PPO tests' base overrides."""
