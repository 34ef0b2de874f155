"""Masked reductions and token-level log-prob / entropy helpers.

Every RLHF loss reduces over *valid* tokens only (response tokens, not prompt or padding).
All helpers here treat ``mask`` as a validity mask (bool, or 0/1 of any dtype): entries where
``mask`` is false/0 are never read arithmetically -- they are replaced with 0 through
``torch.where`` rather than multiplied by 0, so NaN/inf garbage at padded positions cannot leak
into a result (``nan * 0 == nan``).

Shape legend: B = batch, T = tokens, V = vocabulary.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

__all__ = [
    "masked_sum",
    "masked_mean",
    "masked_var",
    "masked_whiten",
    "logprobs_from_logits",
    "entropy_from_logits",
]

# Upper bound on the number of logits (rows * V) upcast to float32 at once in the chunked
# log-prob / entropy helpers, forward and backward: 2**22 floats = 16 MiB, so the [rows, V]
# temporaries (z - lse, exp, p * z, the gradient chunk) stay far below the size of the logits.
_DEFAULT_MAX_CHUNK_NUMEL = 2**22


def _valid(x: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Return ``(x with invalid entries set to 0, boolean mask broadcast to x)``."""
    mask_b = mask.bool()
    if mask_b.shape != x.shape:
        mask_b = mask_b.expand_as(x)
    return torch.where(mask_b, x, torch.zeros((), dtype=x.dtype, device=x.device)), mask_b


def masked_sum(
    x: torch.Tensor, mask: torch.Tensor, dim: int | tuple[int, ...] | None = None
) -> torch.Tensor:
    """Sum of ``x`` over entries where ``mask`` is set.

    Args:
        x: any shape, e.g. (B, T).
        mask: same shape as ``x`` (or broadcastable to it); bool or 0/1.
        dim: dimension(s) to reduce; ``None`` reduces everything to a 0-dim tensor.

    Returns:
        ``sum_i mask_i * x_i`` over ``dim`` (0-dim tensor when ``dim is None``, e.g. (B,) for
        ``dim=-1`` on (B, T) inputs).
    """
    x0, _ = _valid(x, mask)
    return x0.sum() if dim is None else x0.sum(dim=dim)


def masked_mean(
    x: torch.Tensor, mask: torch.Tensor, dim: int | tuple[int, ...] | None = None
) -> torch.Tensor:
    """Mean of ``x`` over entries where ``mask`` is set.

    Args:
        x: any shape, e.g. (B, T).
        mask: same shape as ``x`` (or broadcastable); bool or 0/1.
        dim: dimension(s) to reduce; ``None`` reduces everything to a 0-dim tensor.

    Returns:
        ``sum(mask * x) / sum(mask)`` over ``dim``. Slices with no valid entry give 0 (not NaN):
        the count is clamped to at least 1.
    """
    x0, mask_b = _valid(x, mask)
    if dim is None:
        total, count = x0.sum(), mask_b.sum()
    else:
        total, count = x0.sum(dim=dim), mask_b.sum(dim=dim)
    return total / count.clamp(min=1).to(total.dtype)  # mean = sum(m*x) / max(sum(m), 1)


def masked_var(x: torch.Tensor, mask: torch.Tensor, unbiased: bool = True) -> torch.Tensor:
    """Variance of ``x`` over all entries where ``mask`` is set (global, 0-dim result).

    ``var = sum(m * (x - mu)^2) / sum(m)``, times the Bessel factor ``n / (n - 1)`` when
    ``unbiased``. With fewer than two valid entries the Bessel factor is skipped (returns the
    biased estimate, i.e. 0 for a single entry) instead of dividing by zero.

    Args:
        x: any shape, e.g. (B, T).
        mask: same shape as ``x``; bool or 0/1.
        unbiased: apply Bessel's correction.

    Returns:
        0-dim tensor.
    """
    mean = masked_mean(x, mask)
    centered = x - mean
    var = masked_mean(centered * centered, mask)  # E_m[(x - mu)^2]
    if unbiased:
        n = mask.bool().expand_as(x).sum().to(var.dtype)
        bessel = torch.where(n > 1, n / (n - 1).clamp(min=1), torch.ones_like(n))  # n / (n-1)
        var = var * bessel
    return var


def masked_whiten(
    x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True, eps: float = 1e-8
) -> torch.Tensor:
    """Whiten ``x`` with mean / variance computed over valid entries only.

    ``y = (x - mu) / sqrt(var + eps)``; with ``shift_mean=False`` the mean is added back
    (``y + mu``), which is how PPO implementations whiten *rewards* without changing their sign
    (Ziegler et al. 2019 reference code). Statistics use the unbiased variance over all valid
    entries of the tensor (global, not per row).

    Args:
        x: any shape, e.g. advantages (B, T).
        mask: same shape; bool or 0/1.
        shift_mean: if False, keep the original mean.
        eps: numerical floor inside the square root.

    Returns:
        Tensor shaped like ``x``; entries where ``mask`` is unset are 0.
    """
    mean = masked_mean(x, mask)
    var = masked_var(x, mask, unbiased=True)
    whitened = (x - mean) * torch.rsqrt(var + eps)  # (x - mu) / sqrt(var + eps)
    if not shift_mean:
        whitened = whitened + mean
    return _valid(whitened, mask)[0]


def _rows_per_chunk(vocab: int, max_chunk_numel: int) -> int:
    return max(1, max_chunk_numel // max(vocab, 1))


def _scaled_chunks(
    flat_logits: torch.Tensor, rows: int, temperature: float, dtype: torch.dtype
) -> Iterator[tuple[slice, torch.Tensor]]:
    """``(rows slice, z / tau in dtype)`` for consecutive chunks of ``rows`` rows of ``[N, V]``."""
    for start in range(0, flat_logits.shape[0], rows):
        sl = slice(start, start + rows)
        z = flat_logits[sl].to(dtype)
        if temperature != 1.0:
            z = z / temperature  # never in place: the logits may be reused
        yield sl, z


def logprobs_from_logits(
    logits_BTV: torch.Tensor,
    labels_BT: torch.Tensor,
    temperature: float = 1.0,
    ignore_index: int | None = -100,
    max_chunk_numel: int = _DEFAULT_MAX_CHUNK_NUMEL,
) -> torch.Tensor:
    """Log-probability of each label token: ``log softmax(z / tau)[label]``.

    Computed as ``z[label] / tau - logsumexp(z / tau)`` without materialising the full
    log-softmax; rows (flattened B*T tokens) are processed in chunks of at most
    ``max_chunk_numel`` logits, each upcast to float32, which bounds peak memory for large V
    (e.g. during rollout scoring under ``torch.no_grad``). Differentiable; the backward pass
    (:class:`_LogProb`) also works chunk by chunk and keeps only the logits and ``lse [N]``.

    The ``temperature`` must match the one used for sampling, otherwise the behaviour-policy
    log-probs of PPO's importance ratio are wrong.

    Args:
        logits_BTV: (B, T, V) (any leading dims ``...`` work), any float dtype.
        labels_BT: (B, T) integer token ids aligned with ``logits_BTV`` (i.e. already shifted:
            ``logits[:, t]`` predicts ``labels[:, t]``).
        temperature: sampling temperature tau > 0.
        ignore_index: label value treated as "no token"; its log-prob is returned as 0.
            ``None`` disables the check.
        max_chunk_numel: max number of logits processed at once.

    Returns:
        (B, T) float32 log-probabilities (float64 if the logits are float64).
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if logits_BTV.shape[:-1] != labels_BT.shape:
        raise ValueError(
            f"logits {tuple(logits_BTV.shape)} and labels {tuple(labels_BT.shape)} do not align"
        )
    vocab = logits_BTV.shape[-1]
    flat_logits = logits_BTV.reshape(-1, vocab)
    flat_labels = labels_BT.reshape(-1).long()
    ignored = None
    if ignore_index is not None:
        ignored = flat_labels == ignore_index
        flat_labels = flat_labels.masked_fill(ignored, 0)
    out_dtype = torch.float64 if logits_BTV.dtype == torch.float64 else torch.float32
    rows = _rows_per_chunk(vocab, max_chunk_numel)
    if torch.is_grad_enabled() and flat_logits.requires_grad:
        logp = _LogProb.apply(flat_logits, flat_labels, float(temperature), out_dtype, rows)
    else:
        logp, _ = _logprob_rows(flat_logits, flat_labels, temperature, out_dtype, rows)
    if ignored is not None:
        logp = logp.masked_fill(ignored, 0.0)
    return logp.reshape(labels_BT.shape)


def _logprob_rows(
    flat_logits: torch.Tensor,
    flat_labels: torch.Tensor,
    temperature: float,
    out_dtype: torch.dtype,
    rows: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(log p(label) [N], lse [N])`` of ``softmax(z / tau)``, ``rows`` rows at a time."""
    pieces, lses = [], []
    for sl, z in _scaled_chunks(flat_logits, rows, temperature, out_dtype):
        lab = flat_labels[sl].unsqueeze(-1)
        lse = torch.logsumexp(z, dim=-1)
        pieces.append(torch.gather(z, -1, lab).squeeze(-1) - lse)  # log p(y) = z_y - lse(z)
        lses.append(lse)
    if not pieces:
        empty = flat_logits.new_zeros(0, dtype=out_dtype)
        return empty, empty
    return torch.cat(pieces), torch.cat(lses)


class _LogProb(torch.autograd.Function):
    """``log softmax(z / tau)[label]`` whose backward works chunk by chunk.

    Saved for backward: the logits (the caller's tensor, no copy), the labels and ``lse [N]``.
    Gradient per row (``z`` divided by tau): ``d log p_y / dz_v = 1[v = y] - p_v``, divided by
    tau for the logits. Plain autograd through ``logsumexp`` builds ``exp(z - lse)`` and its
    product with the upstream gradient over the whole ``[N, V]`` at once; here only a chunk of
    ``rows`` rows exists at a time besides the gradient itself.
    """

    @staticmethod
    def forward(ctx, flat_logits, flat_labels, temperature, out_dtype, rows):  # type: ignore[override]
        logp, lse = _logprob_rows(flat_logits, flat_labels, temperature, out_dtype, rows)
        ctx.save_for_backward(flat_logits, flat_labels, lse)
        ctx.temperature, ctx.out_dtype, ctx.rows = temperature, out_dtype, rows
        return logp

    @staticmethod
    def backward(ctx, grad_N):  # type: ignore[override]
        flat_logits, flat_labels, lse = ctx.saved_tensors
        tau, rows = ctx.temperature, ctx.rows
        grad = torch.empty_like(flat_logits)
        for sl, z in _scaled_chunks(flat_logits, rows, tau, ctx.out_dtype):
            g_r1 = grad_N[sl].unsqueeze(-1).to(ctx.out_dtype)
            g = torch.exp(z - lse[sl].unsqueeze(-1)).mul_(-g_r1)  # -g p_v
            g.scatter_add_(-1, flat_labels[sl].unsqueeze(-1), g_r1)  # + g 1[v = y]
            if tau != 1.0:
                g = g / tau
            grad[sl] = g.to(grad.dtype)
        return grad, None, None, None, None


def _entropy_rows(
    flat_logits: torch.Tensor, temperature: float, out_dtype: torch.dtype, rows: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(H [N], lse [N])`` of ``softmax(z / tau)`` row by row, ``rows`` rows at a time."""
    ents, lses = [], []
    for _, z in _scaled_chunks(flat_logits, rows, temperature, out_dtype):
        lse = torch.logsumexp(z, dim=-1)
        p = torch.exp(z - lse.unsqueeze(-1))  # softmax(z)
        pz = torch.where(p > 0, p * z, torch.zeros((), dtype=z.dtype))  # 0 * -inf := 0
        ents.append(lse - pz.sum(-1))  # H = logsumexp(z) - sum_v p_v z_v
        lses.append(lse)
    if not ents:
        empty = flat_logits.new_zeros(0, dtype=out_dtype)
        return empty, empty
    return torch.cat(ents), torch.cat(lses)


class _Entropy(torch.autograd.Function):
    """Entropy whose backward recomputes ``p`` from the logits instead of keeping it.

    Saved for backward: the logits (the caller's tensor, so no copy: the log-prob gather keeps
    them alive anyway) and two ``[N]`` vectors. Autograd through the plain formula would keep
    ``p`` and a mask, each as large as the logits. Gradient (per row, ``z`` already divided by
    tau): ``dH/dz_v = -p_v (log p_v + H) = -p_v (z_v - lse + H)``; ``d/dlogits = (dH/dz) / tau``.
    """

    @staticmethod
    def forward(ctx, flat_logits, temperature, out_dtype, rows):  # type: ignore[override]
        ent, lse = _entropy_rows(flat_logits, temperature, out_dtype, rows)
        ctx.save_for_backward(flat_logits, ent, lse)
        ctx.temperature, ctx.out_dtype, ctx.rows = temperature, out_dtype, rows
        return ent

    @staticmethod
    def backward(ctx, grad_N):  # type: ignore[override]
        flat_logits, ent, lse = ctx.saved_tensors
        tau, rows = ctx.temperature, ctx.rows
        grad = torch.empty_like(flat_logits)
        for sl, z in _scaled_chunks(flat_logits, rows, tau, ctx.out_dtype):
            logp = z - lse[sl].unsqueeze(-1)  # log p_v
            p = torch.exp(logp)
            # -p (log p + H), with 0 where p == 0 (log p = -inf there)
            g = torch.where(
                p > 0, -p * (logp + ent[sl].unsqueeze(-1)), torch.zeros((), dtype=z.dtype)
            )
            g = g * grad_N[sl].unsqueeze(-1)
            if tau != 1.0:
                g = g / tau
            grad[sl] = g.to(grad.dtype)
        return grad, None, None, None


def entropy_from_logits(
    logits_BTV: torch.Tensor,
    temperature: float = 1.0,
    max_chunk_numel: int = _DEFAULT_MAX_CHUNK_NUMEL,
) -> torch.Tensor:
    """Entropy of the categorical ``softmax(z / tau)`` at each position (nats).

    ``H = -sum_v p_v log p_v = logsumexp(z) - sum_v p_v z_v`` with ``p = softmax(z)``,
    computed in float32 chunks of at most ``max_chunk_numel`` logits. ``-inf`` logits (masked
    vocabulary entries) contribute 0. Differentiable; the backward pass recomputes ``p`` chunk by
    chunk (:class:`_Entropy`), so the graph keeps no ``[B, T, V]`` tensor of its own.

    Args:
        logits_BTV: (B, T, V) (any leading dims).
        temperature: tau > 0, applied as ``z / tau``.
        max_chunk_numel: max number of logits processed at once.

    Returns:
        (B, T) float32 entropies (float64 for float64 logits).
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    vocab = logits_BTV.shape[-1]
    flat_logits = logits_BTV.reshape(-1, vocab)
    out_dtype = torch.float64 if logits_BTV.dtype == torch.float64 else torch.float32
    rows = _rows_per_chunk(vocab, max_chunk_numel)
    if torch.is_grad_enabled() and flat_logits.requires_grad:
        ent = _Entropy.apply(flat_logits, float(temperature), out_dtype, rows)
    else:
        ent, _ = _entropy_rows(flat_logits, temperature, out_dtype, rows)
    return ent.reshape(logits_BTV.shape[:-1])
