"""Small assertions shared by the test modules (import as ``from helpers import close``: pytest puts
``tests/`` on ``sys.path``)."""

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
