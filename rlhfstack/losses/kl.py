"""Per-token KL estimators and KL-penalty coefficient controllers.

Estimators follow J. Schulman, "Approximating KL Divergence" (2020,
http://joschu.net/blog/kl-approx.html). For tokens sampled from the policy ``pi`` and a reference
``pi_ref``, let ``log r = log pi_ref(y) - log pi(y)``. Then ``KL(pi || pi_ref) = E_pi[-log r]`` and

* ``k1 = -log r``                 unbiased, high variance, can be negative per token;
* ``k2 = 0.5 * (log r)^2``        biased, low variance, always >= 0;
* ``k3 = (r - 1) - log r``        unbiased, low variance, always >= 0.

Controllers follow Ziegler et al. 2019, "Fine-Tuning Language Models from Human Preferences",
eq. 2 (adaptive) and the constant-beta variant.

Shape legend: B = batch, T = tokens. All estimators are elementwise (any shape, e.g. (B, T)).
"""

from __future__ import annotations

import math
from typing import Any

import torch

__all__ = [
    "kl_k1",
    "kl_k2",
    "kl_k3",
    "kl_estimate",
    "kl_full_from_logits",
    "KL_ESTIMATORS",
    "AdaptiveKLController",
    "FixedKLController",
]


def kl_k1(logprobs: torch.Tensor, ref_logprobs: torch.Tensor) -> torch.Tensor:
    """Schulman (2020) k1 estimator, per token: ``-log r = logp - ref_logp``.

    Args:
        logprobs: (B, T) log pi(y_t) of the sampled tokens under the policy.
        ref_logprobs: (B, T) log pi_ref(y_t) under the reference model.

    Returns:
        (B, T) per-token estimate (may be negative).
    """
    return logprobs - ref_logprobs  # k1 = -log r = log pi - log pi_ref


def kl_k2(logprobs: torch.Tensor, ref_logprobs: torch.Tensor) -> torch.Tensor:
    """Schulman (2020) k2 estimator, per token: ``0.5 * (log r)^2``.

    Args:
        logprobs: (B, T) policy log-probs of the sampled tokens.
        ref_logprobs: (B, T) reference log-probs.

    Returns:
        (B, T) per-token estimate, >= 0.
    """
    log_r = ref_logprobs - logprobs
    return 0.5 * log_r.square()  # k2 = 1/2 (log r)^2


def kl_k3(
    logprobs: torch.Tensor, ref_logprobs: torch.Tensor, max_log_ratio: float | None = None
) -> torch.Tensor:
    """Schulman (2020) k3 estimator, per token: ``(r - 1) - log r`` with ``r = pi_ref / pi``.

    Computed as ``expm1(log r) - log r`` for accuracy near ``r = 1``.

    Args:
        logprobs: (B, T) policy log-probs of the sampled tokens.
        ref_logprobs: (B, T) reference log-probs.
        max_log_ratio: optionally clamp ``log r`` to ``[-max, max]`` before exponentiating, to
            avoid overflow for extreme ratios. ``None`` (default) is exact.

    Returns:
        (B, T) per-token estimate, >= 0 (``e^x - 1 - x >= 0`` for all x).
    """
    log_r = ref_logprobs - logprobs
    if max_log_ratio is not None:
        log_r = log_r.clamp(-max_log_ratio, max_log_ratio)
    return torch.expm1(log_r) - log_r  # k3 = (r - 1) - log r


KL_ESTIMATORS = {"k1": kl_k1, "k2": kl_k2, "k3": kl_k3}


def kl_full_from_logits(
    logits_BTV: torch.Tensor, ref_logprobs_BTV: torch.Tensor, temperature: float = 1.0
) -> torch.Tensor:
    """Exact per-position ``KL(pi || pi_ref) = sum_v pi_v (log pi_v - log pi_ref_v)`` (nats).

    Unlike k1-k3, which see only the sampled token, this sums over the whole vocabulary, so its
    gradient moves every token's probability toward the reference (a guard against collapsing
    onto a few high-reward tokens). Needs the reference's full log-softmax: ``B*T*V`` floats.

    Args:
        logits_BTV: (B, T, V) policy logits; ``pi = softmax(logits / temperature)``.
        ref_logprobs_BTV: (B, T, V) ``log_softmax(ref_logits / temperature)``.
        temperature: tau > 0 (the same in both).

    Returns:
        (B, T) float32 KL per position (>= 0; 0 where pi == pi_ref).
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    logp_BTV = torch.log_softmax(logits_BTV.float() / temperature, dim=-1)
    return (logp_BTV.exp() * (logp_BTV - ref_logprobs_BTV.float())).sum(-1)


def kl_estimate(
    logprobs: torch.Tensor, ref_logprobs: torch.Tensor, estimator: str = "k1"
) -> torch.Tensor:
    """Dispatch to :func:`kl_k1`, :func:`kl_k2` or :func:`kl_k3` by name.

    Args:
        logprobs: (B, T) policy log-probs of the sampled tokens.
        ref_logprobs: (B, T) reference log-probs.
        estimator: ``"k1"``, ``"k2"`` or ``"k3"``.

    Returns:
        (B, T) per-token KL estimate (unmasked).
    """
    try:
        fn = KL_ESTIMATORS[estimator]
    except KeyError:
        raise ValueError(
            f"unknown KL estimator {estimator!r}; expected one of {sorted(KL_ESTIMATORS)}"
        ) from None
    return fn(logprobs, ref_logprobs)


class AdaptiveKLController:
    """Adaptive KL coefficient, Ziegler et al. 2019 eq. 2.

    ``e_t = clip(KL_t / KL_target - 1, -0.2, 0.2)``;  ``beta_{t+1} = beta_t (1 + K_beta e_t)`` with
    ``K_beta = n_steps / horizon`` (the proportional gain scaled by how many samples the update
    covers).

    Args:
        init_kl_coef: initial beta.
        target: target KL (nats per sequence, or whatever unit ``current_kl`` is reported in).
        horizon: number of samples over which beta can change by a factor of about e^0.2.
    """

    def __init__(self, init_kl_coef: float, target: float, horizon: int) -> None:
        if target <= 0:
            raise ValueError(f"target KL must be > 0, got {target}")
        if horizon <= 0:
            raise ValueError(f"horizon must be > 0, got {horizon}")
        self.value = float(init_kl_coef)
        self.target = float(target)
        self.horizon = int(horizon)

    def update(self, current_kl: float, n_steps: int) -> float:
        """Update beta from the observed KL over ``n_steps`` samples; returns the new beta.
        A NaN or infinite KL is refused (ValueError): beta, and the state saved from it, stay
        finite."""
        current_kl = float(current_kl)
        if not math.isfinite(current_kl):
            raise ValueError(f"KL controller: non-finite KL {current_kl} (beta stays {self.value})")
        error = min(max(current_kl / self.target - 1.0, -0.2), 0.2)  # e = clip(KL/target-1, ±0.2)
        self.value *= 1.0 + error * n_steps / self.horizon  # beta <- beta (1 + e n / horizon)
        return self.value

    def state_dict(self) -> dict[str, Any]:
        return {"value": self.value, "target": self.target, "horizon": self.horizon}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.value = float(state["value"])
        self.target = float(state.get("target", self.target))
        self.horizon = int(state.get("horizon", self.horizon))

    def __repr__(self) -> str:
        return (
            f"AdaptiveKLController(value={self.value}, target={self.target}, "
            f"horizon={self.horizon})"
        )


class FixedKLController:
    """Constant KL coefficient with the same interface as :class:`AdaptiveKLController`."""

    def __init__(self, kl_coef: float) -> None:
        self.value = float(kl_coef)

    def update(self, current_kl: float, n_steps: int) -> float:
        """No-op; returns the (unchanged) beta."""
        return self.value

    def state_dict(self) -> dict[str, Any]:
        return {"value": self.value}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.value = float(state["value"])

    def __repr__(self) -> str:
        return f"FixedKLController(value={self.value})"
