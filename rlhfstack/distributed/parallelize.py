"""Parallelizing a model: finding its trunk and decoder layers, the Megatron tensor-parallel plan
(DTensor), FSDP2 sharding, the global gradient norm, and gathering full state dicts."""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor
from torch.distributed.tensor.parallel import (
    ColwiseParallel,
    RowwiseParallel,
    parallelize_module,
)

from rlhfstack.distributed.launch import MIXED_PRECISION, all_reduce_sum, comm_device

log = logging.getLogger("rlhfstack.distributed")

# ----------------------------------------------------------------------------- model structure


def find_trunk(model: nn.Module) -> nn.Module:
    """The decoder stack of a Llama-style model: the module with ``embed_tokens``, ``layers``, ``norm``."""
    for m in model.modules():
        if all(hasattr(m, a) for a in ("embed_tokens", "layers", "norm")) and isinstance(
            m.layers, nn.ModuleList
        ):
            return m
    raise ValueError(
        f"{type(model).__name__}: no Llama-style decoder stack (embed_tokens, layers, norm) found; "
        "tensor/pipeline parallelism supports Llama-family causal LMs"
    )


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The transformer blocks of ``model``: the Llama trunk's ``layers``, else the largest
    ``ModuleList`` of same-class blocks (e.g. a BERT encoder's ``layer``); ``[]`` if none."""
    try:
        return list(find_trunk(model).layers)
    except ValueError:
        pass
    best: list[nn.Module] = []
    for m in model.modules():
        if isinstance(m, nn.ModuleList) and len(m) > len(best):
            kids = list(m)
            if len({type(k) for k in kids}) == 1 and any(True for _ in kids[0].parameters()):
                best = kids
    return best


def _has_lora(model: nn.Module) -> bool:
    return any("lora_" in n for n, _ in model.named_parameters())


# ----------------------------------------------------------------------------- tensor parallel


def find_trunks(model: nn.Module) -> list[nn.Module]:
    """Every Llama-style decoder stack inside ``model`` (a policy and a separate critic held in
    one module each have one), in module order; ``[]`` if none."""
    return [
        m
        for m in model.modules()
        if all(hasattr(m, a) for a in ("embed_tokens", "layers", "norm"))
        and isinstance(m.layers, nn.ModuleList)
    ]


def apply_tp(model: nn.Module, tp_mesh: Any) -> None:
    """Megatron-style tensor parallelism on every decoder layer of every Llama-style trunk in
    ``model`` (a policy, and a separate critic beside it), in place.

    Attention: ``q_proj``/``k_proj``/``v_proj`` column-wise (each rank computes its own heads),
    ``o_proj`` row-wise (all-reduce of the partial outputs). MLP: ``gate_proj``/``up_proj``
    column-wise, ``down_proj`` row-wise. Embeddings, norms and heads stay replicated. The
    attention's ``view(..., -1, head_dim)`` picks up the local head count, and
    ``num_heads / num_kv_heads`` (the GQA group size) is the same on every rank.
    """

    tp = tp_mesh.size()
    if _has_lora(model):
        raise NotImplementedError(
            "parallel.tp > 1 with LoRA adapters is not supported; use dp_shard"
        )
    trunks = find_trunks(model)
    if not trunks:
        find_trunk(model)  # raises, naming what tensor parallelism supports
    plan = {
        "self_attn.q_proj": ColwiseParallel(),
        "self_attn.k_proj": ColwiseParallel(),
        "self_attn.v_proj": ColwiseParallel(),
        "self_attn.o_proj": RowwiseParallel(),
        "mlp.gate_proj": ColwiseParallel(),
        "mlp.up_proj": ColwiseParallel(),
        "mlp.down_proj": RowwiseParallel(),
    }
    for trunk in trunks:
        cfg = trunk.config
        n_heads = int(cfg.num_attention_heads)
        n_kv = int(getattr(cfg, "num_key_value_heads", None) or n_heads)
        inter = int(cfg.intermediate_size)
        for name, n in (
            ("num_attention_heads", n_heads),
            ("num_key_value_heads", n_kv),
            ("intermediate_size", inter),
        ):
            if n % tp:
                raise ValueError(f"parallel.tp={tp} does not divide the model's {name}={n}")
        for layer in trunk.layers:
            if hasattr(layer, "self_attn"):  # (pipeline stages hold stand-ins for foreign layers)
                parallelize_module(layer, tp_mesh, plan)


def is_sharded(model: nn.Module) -> bool:
    """Whether any parameter of ``model`` is a DTensor (tensor parallel / FSDP2): such a module
    runs only with its whole group, and its local weights are pieces of the full ones."""
    return any(isinstance(p, DTensor) for p in model.parameters())


# ----------------------------------------------------------------------------- FSDP2


class _Closure(nn.Module):
    """Root of the FSDP tree: owns the model, and its forward runs any function of it.

    ``root(fn, *args)`` returns ``fn(*args)`` after FSDP's root pre-forward has gathered the
    root-level parameters (embeddings, final norm, heads); the layers gather their own.
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        return fn(*args, **kwargs)


def fully_shard_tree(
    blocks: list[nn.Module],
    root: nn.Module,
    dp_mesh: Any,
    mixed_precision: str,
    reshard_after_forward: bool = True,
) -> nn.Module:
    """``fully_shard`` each block, then ``root`` (which owns the rest); sum-reduced gradients."""

    if mixed_precision not in MIXED_PRECISION:
        raise ValueError(
            f"parallel.mixed_precision: {mixed_precision!r} (choose from {MIXED_PRECISION})"
        )
    mp = MixedPrecisionPolicy()
    mp_root = MixedPrecisionPolicy()
    if mixed_precision == "bf16":
        mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
        # the root's inputs are whole micro-batches (e.g. fp32 reference log-probs): leave them
        mp_root = MixedPrecisionPolicy(
            param_dtype=torch.bfloat16, reduce_dtype=torch.float32, cast_forward_inputs=False
        )
    for block in blocks:
        fully_shard(block, mesh=dp_mesh, mp_policy=mp, reshard_after_forward=reshard_after_forward)
    fully_shard(root, mesh=dp_mesh, mp_policy=mp_root)
    for m in root.modules():
        if isinstance(m, FSDPModule):
            m.set_gradient_divide_factor(1.0)
            m.set_force_sum_reduction_for_comms(True)
    return root


def apply_fsdp2(
    model: nn.Module,
    dp_mesh: Any,
    mixed_precision: str = "none",
    reshard_after_forward: bool = True,
) -> nn.Module:
    """FSDP2 on every decoder layer and on a root wrapper around ``model``; returns the root.

    Gradients are summed (not averaged) over ``dp_mesh``: losses are normalized by the global
    count. ``mixed_precision="bf16"``: bf16 compute/all-gather, fp32 sharded master weights
    and fp32 gradient reduction.
    """
    return fully_shard_tree(
        decoder_layers(model), _Closure(model), dp_mesh, mixed_precision, reshard_after_forward
    )


# ----------------------------------------------------------------------------- grad norm


def _sq_norm(grads: list[torch.Tensor]) -> torch.Tensor:
    """Sum of squares of ``grads`` (DTensors reduced over their meshes), fp32 on the grads' device."""

    total = None
    groups: dict[Any, list[torch.Tensor]] = {}
    for g in grads:
        key = (id(g.device_mesh), g.placements) if isinstance(g, DTensor) else ("plain", g.device)
        groups.setdefault(key, []).append(g)
    for gs in groups.values():
        n = torch.nn.utils.get_total_norm(gs, 2.0)
        if isinstance(n, DTensor):
            n = n.full_tensor()
        sq = n.float() ** 2
        total = sq if total is None else total + sq.to(total.device)
    return total if total is not None else torch.zeros(())


def clip_grad_norm(
    params: list[nn.Parameter],
    max_norm: float,
    norm_params: list[nn.Parameter] | None = None,
    group: Any = None,
) -> float:
    """Clip the global gradient norm of sharded / replicated / pipelined parameters.

    ``norm_params``: the parameters whose gradients count in the norm on this rank (default
    ``params``); ``group``: a process group whose per-rank sums of squares add up (pipeline
    stages). Returns the pre-clip norm, identical on every rank.
    """
    grads = [p.grad for p in (params if norm_params is None else norm_params) if p.grad is not None]
    sq = _sq_norm(grads).to(comm_device())
    if group is not None:
        all_reduce_sum(sq, group)
    norm = float(sq.sqrt())
    if max_norm and max_norm > 0:
        coef = max_norm / (norm + 1e-6)
        if coef < 1.0:
            for p in params:
                if p.grad is not None:
                    p.grad.mul_(coef)
    return norm


# ----------------------------------------------------------------------------- state dicts


def meta_copy(model: nn.Module) -> nn.Module:
    """A structural copy of ``model`` with parameters on the meta device (tying kept, buffers copied)."""
    memo: dict[int, Any] = {}
    for p in model.parameters():
        memo[id(p)] = nn.Parameter(
            torch.empty_like(p, device="meta"), requires_grad=p.requires_grad
        )
    return copy.deepcopy(model, memo)


def restore_plain(
    model: nn.Module, shadow: nn.Module, state_dict: dict[str, torch.Tensor], device: str
) -> None:
    """Load ``state_dict`` into ``shadow`` (on ``device``) and make ``model`` that plain module, in place.

    The model object keeps its identity (the stage's references stay valid) but gets the
    shadow's modules, parameters, buffers and hooks: no FSDP/TP/pipeline state is left.
    Attributes set on ``model`` after ``meta_copy`` (other than weights) are not carried over.
    """
    new: dict[int, nn.Parameter] = {}
    for mod in shadow.modules():
        for name, p in list(mod._parameters.items()):
            if p is None:
                continue
            if id(p) not in new:
                new[id(p)] = nn.Parameter(
                    torch.empty_like(p, device=device), requires_grad=p.requires_grad
                )
            mod._parameters[name] = new[id(p)]
    shadow.to(device)
    missing, unexpected = shadow.load_state_dict(state_dict, strict=False)
    missing = [k for k in missing if k in dict(shadow.named_parameters(remove_duplicate=False))]
    if missing or unexpected:
        raise RuntimeError(
            f"restoring the trained model: missing {missing[:5]}, unexpected {unexpected[:5]}"
        )
    model.__dict__.clear()
    model.__dict__.update(shadow.__dict__)
    model.__class__ = shadow.__class__


def gather_full_state_dict(module: nn.Module) -> dict[str, torch.Tensor]:
    """Full (unsharded) state dict of an FSDP2 / TP module on rank 0, on CPU ({} elsewhere)."""

    opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return get_model_state_dict(module, options=opts)
