"""The fast decoding loop behind :func:`rlhfstack.rollout.generate.generate`.

Same math as the plain loop (one forward per new token, ancestral sampling from
``softmax(logits / T)`` with the same generator calls), less work per token:

* the prompt pass runs the trunk and sends only the last position through the LM head (the
  plain loop in ``generate.py`` computes ``[B, P, V]`` logits and keeps one column);
* keys and values go into buffers allocated once for ``P + max_new_tokens`` positions
  (:class:`PreallocatedCache`); each step writes one column in place and attends over a view of
  the filled part, instead of ``torch.cat``-ing every layer's cache every step;
* the attention mask is allocated once: the prompt's mask, then ones. A row that has ended keeps
  attending to its own (PAD) tokens; its outputs are discarded, and rows never attend across
  the batch, so the tokens of the rows still running are unchanged. With unpadded prompts the
  mask is all ones and the attention kernel runs without one;
* for Llama-family trunks each one-token step runs as plain tensor code (:class:`LeanDecoder`:
  the same parameters and math without the HF module machinery; single-query attention as two
  small matmuls instead of the fused CPU kernel); other trunks step through their HF modules;
* on CPU in float32, the one-token steps' projections and the LM head multiply by copies of the
  weights packed once per rollout into oneDNN's blocked layout (:class:`PackedLinears`): the
  default float32 ``F.linear`` on CPU calls MKL's sgemm, which can be several times slower at 8
  rows (docs/performance.md). Same products, another summation order: logits agree to float
  rounding (about 1e-6);
* tokens are drawn by inverse-CDF sampling (:func:`sample_categorical`; both loops use it);
* optionally, the sampled tokens' log-probs (``log softmax(logits / T)``) and the hidden states
  that produced them come back with the tokens, so PPO/GRPO can skip the policy's scoring pass
  (TRL does the same for log-probs). They equal the training pass's values up to float
  rounding (about 1e-6): the KV-cache pass sums in a different order.

Only HF causal LMs (also behind a peft wrapper) take this path; anything else falls back to the
plain loop in ``generate.py``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers.cache_utils import Cache, DynamicLayer

from rlhfstack.distributed import is_sharded

__all__ = [
    "FastDecodeResult",
    "PackedLinears",
    "PreallocatedCache",
    "fast_decode",
    "sample_categorical",
    "supports_fast_decode",
]


def sample_categorical(
    probs_BV: torch.Tensor, generator: torch.Generator | None = None
) -> torch.Tensor:
    """One draw per row from the categorical ``probs_BV`` (rows need not sum to 1): ``[B]``.

    Inverse-CDF sampling: ``u ~ U(0, sum p)`` per row, the first index whose cumulative sum
    (float64, so the rounding of a 32k-term sum stays far below any token's probability)
    exceeds ``u``. Zero-probability entries are never drawn. It consumes B uniforms from
    ``generator`` where ``torch.multinomial`` draws one exponential per vocabulary entry, which
    on CPU costs about 8 ms per step at B=8, V=32000 (the same distribution, 20x cheaper).
    The uniforms are drawn on ``generator``'s own device and moved to the probabilities' (a CPU
    generator, as PPO's checkpointed one, then drives a CUDA rollout with the draws it makes on
    CPU; ``torch.rand`` refuses a generator of another device).
    """
    cdf_BV = probs_BV.to(torch.float64).cumsum(-1)
    draw_on = generator.device if generator is not None else probs_BV.device
    u_B1 = torch.rand(
        probs_BV.shape[0], 1, generator=generator, dtype=torch.float64, device=draw_on
    ).to(probs_BV.device)
    idx_B1 = torch.searchsorted(cdf_BV, u_B1 * cdf_BV[:, -1:], right=True)
    return idx_B1.squeeze(1).clamp_(max=probs_BV.shape[1] - 1)


def _cache_classes():

    class PreallocatedLayer(DynamicLayer):
        """A DynamicLayer whose keys/values live in buffers sized for the whole rollout.

        ``self.keys`` / ``self.values`` are views ``[B, H, L, D]`` of the filled part, so every
        method of :class:`DynamicLayer` (sequence length, mask sizes, crop) keeps working.
        """

        def __init__(self, capacity: int) -> None:
            super().__init__()
            self.capacity = capacity
            self._k = self._v = None
            self._len = 0

        def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
            self.dtype, self.device = key_states.dtype, key_states.device
            B, H, _, D = key_states.shape
            self._k = key_states.new_empty(B, H, self.capacity, D)
            self._v = value_states.new_empty(B, H, self.capacity, value_states.shape[-1])
            self._len = 0
            self.keys = self._k[:, :, :0]
            self.values = self._v[:, :, :0]
            self.is_initialized = True

        def update(self, key_states, value_states, *args, **kwargs):
            if not self.is_initialized:
                self.lazy_initialization(key_states, value_states)
            n = key_states.shape[-2]
            end = self._len + n
            if end > self.capacity:
                raise RuntimeError(f"PreallocatedCache: {end} positions > capacity {self.capacity}")
            self._k[:, :, self._len : end] = key_states
            self._v[:, :, self._len : end] = value_states
            self._len = end
            self.keys = self._k[:, :, :end]
            self.values = self._v[:, :, :end]
            return self.keys, self.values

        def append_one(self, k_BKD: torch.Tensor, v_BKD: torch.Tensor) -> None:
            """Write one position's keys / values ``[B, KV, Dh]`` (the lean decode step)."""
            if self._len >= self.capacity:
                raise RuntimeError(f"PreallocatedCache: full ({self.capacity} positions)")
            self._k[:, :, self._len] = k_BKD
            self._v[:, :, self._len] = v_BKD
            self._len += 1
            self.keys = self._k[:, :, : self._len]
            self.values = self._v[:, :, : self._len]

        def get_seq_length(self) -> int:
            return self._len if self.is_initialized else 0

        def batch_repeat_interleave(self, repeats: int) -> None:
            if self.is_initialized:
                self._k = self._k.repeat_interleave(repeats, dim=0)
                self._v = self._v.repeat_interleave(repeats, dim=0)
                self.keys = self._k[:, :, : self._len]
                self.values = self._v[:, :, : self._len]

    class _PreallocatedCache(Cache):
        """A KV cache with one :class:`PreallocatedLayer` per decoder layer."""

        def __init__(self, num_layers: int, capacity: int) -> None:
            super().__init__(layers=[PreallocatedLayer(capacity) for _ in range(num_layers)])

    return _PreallocatedCache


_CACHE_CLS = None


def PreallocatedCache(num_layers: int, capacity: int):  # noqa: N802 (a class factory)
    """A KV cache for ``num_layers`` full-attention layers and ``capacity`` positions."""
    global _CACHE_CLS
    if _CACHE_CLS is None:
        _CACHE_CLS = _cache_classes()
    return _CACHE_CLS(num_layers, capacity)


def _parts(model: nn.Module) -> tuple[nn.Module, nn.Module] | None:
    """(trunk, lm_head) of an HF causal LM (through peft), or None for anything else."""
    lm = model.get_base_model() if hasattr(model, "get_base_model") else model
    prefix = getattr(lm, "base_model_prefix", None)
    if not prefix or not hasattr(lm, "get_output_embeddings"):
        return None
    trunk = getattr(lm, prefix, None)
    head = lm.get_output_embeddings()
    if trunk is None or head is None:
        return None
    return trunk, head


def _num_full_attention_layers(trunk: nn.Module) -> int | None:
    cfg = getattr(trunk, "config", None)
    if cfg is None:
        return None
    if hasattr(cfg, "get_text_config"):
        cfg = cfg.get_text_config(decoder=True)
    types = getattr(cfg, "layer_types", None)
    if types is not None and any(t != "full_attention" for t in types):
        return None  # sliding-window / linear-attention layers: use the model's own cache
    if getattr(cfg, "sliding_window", None) and getattr(cfg, "use_sliding_window", True):
        return None
    return getattr(cfg, "num_hidden_layers", None)


def supports_fast_decode(model: nn.Module) -> bool:
    """True for plain (unsharded) HF causal LMs whose layers all use full attention. A
    tensor-parallel module takes the plain loop: its cache holds this rank's heads only, and its
    products all-reduce over the group."""
    parts = _parts(model)
    return (
        parts is not None
        and _num_full_attention_layers(parts[0]) is not None
        and not is_sharded(model)
    )


class PackedLinears:
    """oneDNN-packed copies of some ``nn.Linear`` weights, for ``rows`` input rows at a time.

    ``PackedLinears.build(modules, rows)`` returns None where packing does not apply (not CPU,
    not float32, PyTorch built without oneDNN); ``linear(x, module)`` is ``module(x)`` by the
    packed copy. The copies are taken when built and never follow later updates of the weights:
    build one per rollout and drop it afterwards (a model's worth of memory while it lives).
    """

    def __init__(self, packed: dict[int, torch.Tensor]) -> None:
        self._packed = packed

    @staticmethod
    def available() -> bool:
        return bool(torch.backends.mkldnn.is_available()) and hasattr(
            torch.ops.mkldnn, "_reorder_linear_weight"
        )

    @classmethod
    def build(cls, modules: list[nn.Module], rows: int) -> PackedLinears | None:
        if not modules or not cls.available():
            return None
        ws = [m.weight for m in modules]
        if any(w.device.type != "cpu" or w.dtype != torch.float32 for w in ws):
            return None
        with torch.no_grad():
            packed = {
                id(m): torch.ops.mkldnn._reorder_linear_weight(m.weight.detach(), rows)
                for m in modules
            }
        return cls(packed)

    def linear(self, x: torch.Tensor, module: nn.Module) -> torch.Tensor:
        """``F.linear(x, module.weight, module.bias)`` for ``x`` ``[N, in]`` (N ~ ``rows``)."""
        return torch.ops.mkldnn._linear_pointwise(
            x.contiguous(), self._packed[id(module)], module.bias, "none", [], ""
        )


#: model types whose decoder layers :class:`LeanDecoder` reproduces (pre-norm RMSNorm, rotary
#: attention with grouped KV heads, SwiGLU MLP; optional q/k/v biases as in Qwen2)
_LEAN_MODEL_TYPES = ("llama", "mistral", "qwen2")


class LeanDecoder:
    """One-token decode steps of an HF Llama-family trunk as plain tensor code.

    The same math as the HF layers, written without their per-module machinery: the same
    parameters (read in place, nothing copied), the HF rotary module's own cos/sin (one table for
    all positions, so every rope scaling without a length-dependent update is exact), RMSNorm in
    float32 as in ``LlamaRMSNorm``, attention in float32 over the filled part of the
    :class:`PreallocatedCache` buffers with a ``-inf`` bias on left padding. For a tiny model the
    HF module calls cost more than the arithmetic; for a 35M one the single-query attention is
    several times cheaper than the fused CPU attention kernel.

    ``LeanDecoder.build(trunk)`` returns None where the trunk is anything else (LoRA-wrapped
    projections, other norms or activations, dynamic rope); the caller then steps through the
    HF modules.
    """

    def __init__(self, trunk: nn.Module) -> None:
        cfg = trunk.config
        self.trunk = trunk
        self.n_heads = cfg.num_attention_heads
        self.n_kv = getattr(cfg, "num_key_value_heads", None) or self.n_heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // self.n_heads
        self.layers = list(trunk.layers)
        self.scaling = float(self.layers[0].self_attn.scaling)
        self.packed: PackedLinears | None = None

    def pack(self, rows: int, lm_head: nn.Module | None = None) -> bool:
        """Use oneDNN-packed copies of every projection (and ``lm_head``, for :meth:`head`) for
        steps of ``rows`` rows, taken now (see :class:`PackedLinears`); False where that does
        not apply, and the steps keep ``F.linear``."""
        mods: list[nn.Module] = []
        for layer in self.layers:
            a, m = layer.self_attn, layer.mlp
            mods += [a.q_proj, a.k_proj, a.v_proj, a.o_proj, m.gate_proj, m.up_proj, m.down_proj]
        if lm_head is not None and type(lm_head) is nn.Linear:
            mods.append(lm_head)
        self.packed = PackedLinears.build(mods, rows)
        return self.packed is not None

    def _lin(self, x: torch.Tensor, module: nn.Module) -> torch.Tensor:
        if self.packed is not None:
            return self.packed.linear(x, module)
        return F.linear(x, module.weight, module.bias)

    def head(self, h_BD: torch.Tensor, lm_head: nn.Module) -> torch.Tensor:
        """``lm_head(h_BD)``, by the packed copy where :meth:`pack` took one."""
        if self.packed is not None and id(lm_head) in self.packed._packed:
            return self.packed.linear(h_BD, lm_head)
        return lm_head(h_BD)

    @classmethod
    def build(cls, trunk: nn.Module) -> LeanDecoder | None:
        cfg = getattr(trunk, "config", None)
        if cfg is None or getattr(cfg, "model_type", None) not in _LEAN_MODEL_TYPES:
            return None
        if getattr(cfg, "hidden_act", None) != "silu" or not hasattr(trunk, "rotary_emb"):
            return None
        rope = getattr(trunk.rotary_emb, "rope_type", "default")
        if "dynamic" in str(rope) or rope == "longrope":  # inv_freq depends on the length
            return None
        if type(trunk.embed_tokens) is not nn.Embedding:
            return None
        for layer in getattr(trunk, "layers", []):
            attn, mlp = layer.self_attn, layer.mlp
            projs = [attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj]
            projs += [mlp.gate_proj, mlp.up_proj, mlp.down_proj]
            if any(type(m) is not nn.Linear for m in projs):  # e.g. peft LoRA layers
                return None
            if hasattr(attn, "q_norm") or getattr(attn, "sliding_window", None):
                return None
            norms = (layer.input_layernorm, layer.post_attention_layernorm, trunk.norm)
            if any(not type(n).__name__.endswith("RMSNorm") for n in norms):
                return None
        return cls(trunk)

    @staticmethod
    def _rms(x: torch.Tensor, norm: nn.Module) -> torch.Tensor:
        h = x.to(torch.float32)
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + norm.variance_epsilon)
        return norm.weight * h.to(x.dtype)

    def rope_tables(
        self, n_positions: int, like: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """cos / sin ``[n_positions, head_dim]`` from the model's rotary module."""
        pos = torch.arange(n_positions, device=like.device).unsqueeze(0)
        cos, sin = self.trunk.rotary_emb(like, pos)
        return cos[0], sin[0]

    def prefill(
        self,
        ids_BP: torch.Tensor,
        mask_BP: torch.Tensor,
        pos_BP: torch.Tensor,
        cache,
        cos_LD: torch.Tensor,
        sin_LD: torch.Tensor,
    ) -> torch.Tensor:
        """The prompt pass: fills ``cache`` with every layer's keys / values ``[B, KV, P, Dh]``
        and returns the final-norm hidden state at the last position ``[B, D]``.

        Left padding (``mask_BP == 0``) is never attended by a real token; a padding query
        attends to itself only (so no row of the attention is empty), and its output is unused.
        """
        B, P = ids_BP.shape
        H, KV, Dh = self.n_heads, self.n_kv, self.head_dim
        half = Dh // 2
        x = self.trunk.embed_tokens(ids_BP).reshape(B * P, -1)  # [B*P, D]
        cos = cos_LD[pos_BP].unsqueeze(1)  # [B, 1, P, Dh]
        sin = sin_LD[pos_BP].unsqueeze(1)
        ar = torch.arange(P, device=ids_BP.device)
        causal_PP = ar.unsqueeze(1) >= ar.unsqueeze(0)  # query i sees keys j <= i
        allowed_B1PP = (causal_PP & mask_BP.bool()[:, None, :]) | torch.eye(
            P, dtype=torch.bool, device=ids_BP.device
        )
        allowed_B1PP = allowed_B1PP.unsqueeze(1)

        def rope(t):  # [B, n, P, Dh]
            return t * cos + torch.cat((-t[..., half:], t[..., :half]), -1) * sin

        for i, layer in enumerate(self.layers):
            attn, mlp = layer.self_attn, layer.mlp
            h = self._rms(x, layer.input_layernorm)
            q = rope(self._lin(h, attn.q_proj).view(B, P, H, Dh).transpose(1, 2))
            k = rope(self._lin(h, attn.k_proj).view(B, P, KV, Dh).transpose(1, 2))
            v = self._lin(h, attn.v_proj).view(B, P, KV, Dh).transpose(1, 2)
            cache.layers[i].update(k, v)
            a = F.scaled_dot_product_attention(
                q, k, v, attn_mask=allowed_B1PP, scale=self.scaling, enable_gqa=KV != H
            )  # [B, H, P, Dh]
            x = x + self._lin(a.transpose(1, 2).reshape(B * P, H * Dh), attn.o_proj)
            h = self._rms(x, layer.post_attention_layernorm)
            g = self._lin(h, mlp.gate_proj)
            u = self._lin(h, mlp.up_proj)
            x = x + self._lin(F.silu(g) * u, mlp.down_proj)
        return self._rms(x.view(B, P, -1)[:, -1], self.trunk.norm)

    def step(
        self,
        tok_B: torch.Tensor,
        pos_B: torch.Tensor,
        cache,
        bias_BL: torch.Tensor,
        cos_LD: torch.Tensor,
        sin_LD: torch.Tensor,
    ) -> torch.Tensor:
        """Append one token per row at the cache's next slot; the final-norm hidden ``[B, D]``.

        ``bias_BL``: 0 where a key position may be attended, ``-inf`` on padding, over the
        positions filled after this step.
        """

        def write(i: int, k: torch.Tensor, v: torch.Tensor):
            cl = cache.layers[i]
            cl.append_one(k, v)
            return cl.keys, cl.values  # [B, KV, n, Dh]: the filled part

        return self._layers(tok_B, pos_B, bias_BL, cos_LD, sin_LD, write)

    def step_static(
        self,
        tok_B: torch.Tensor,
        pos_B: torch.Tensor,
        slot_1: torch.Tensor,
        keys: list[torch.Tensor],
        values: list[torch.Tensor],
        bias_BC: torch.Tensor,
        cos_LD: torch.Tensor,
        sin_LD: torch.Tensor,
    ) -> torch.Tensor:
        """:meth:`step` with every shape fixed for the whole rollout, for ``torch.compile``.

        ``keys`` / ``values``: each layer's whole cache buffer ``[B, KV, C, Dh]``; the new
        token's keys / values go to position ``slot_1`` (a 1-element tensor, so the slot is data,
        not a shape); attention runs over all ``C`` positions with ``bias_BC`` = ``-inf`` on
        padding and on the positions not filled yet (their weights are exactly 0, so the result
        is :meth:`step`'s up to float rounding).
        """

        def write(i: int, k: torch.Tensor, v: torch.Tensor):
            keys[i].index_copy_(2, slot_1, k.unsqueeze(2))
            values[i].index_copy_(2, slot_1, v.unsqueeze(2))
            return keys[i], values[i]  # [B, KV, C, Dh]: the whole buffer

        return self._layers(tok_B, pos_B, bias_BC, cos_LD, sin_LD, write)

    def _layers(self, tok_B, pos_B, bias_BL, cos_LD, sin_LD, write) -> torch.Tensor:
        """The decoder layers for one token per row; ``write(i, k, v)`` stores layer ``i``'s new
        keys / values ``[B, KV, Dh]`` and returns the keys / values to attend over."""
        B = tok_B.shape[0]
        H, KV, Dh = self.n_heads, self.n_kv, self.head_dim
        G = H // KV
        x = self.trunk.embed_tokens(tok_B)  # [B, D]
        cos = cos_LD[pos_B].unsqueeze(1)  # [B, 1, Dh], broadcast over heads
        sin = sin_LD[pos_B].unsqueeze(1)
        half = Dh // 2
        bias_B11L = bias_BL[:, None, None, :]
        for i, layer in enumerate(self.layers):
            attn, mlp = layer.self_attn, layer.mlp
            h = self._rms(x, layer.input_layernorm)
            q = self._lin(h, attn.q_proj).view(B, H, Dh)
            k = self._lin(h, attn.k_proj).view(B, KV, Dh)
            v = self._lin(h, attn.v_proj).view(B, KV, Dh)
            q = q * cos + torch.cat((-q[..., half:], q[..., :half]), -1) * sin  # rotate_half
            k = k * cos + torch.cat((-k[..., half:], k[..., :half]), -1) * sin
            K, V = write(i, k, v)
            qg = q.view(B, KV, G, Dh)
            w = torch.matmul(qg, K.transpose(-1, -2)) * self.scaling + bias_B11L  # [B,KV,G,L]
            w = torch.softmax(w, dim=-1, dtype=torch.float32).to(q.dtype)
            a = torch.matmul(w, V).reshape(B, H * Dh)
            x = x + self._lin(a, attn.o_proj)
            h = self._rms(x, layer.post_attention_layernorm)
            g = self._lin(h, mlp.gate_proj)
            u = self._lin(h, mlp.up_proj)
            x = x + self._lin(F.silu(g) * u, mlp.down_proj)
        return self._rms(x, self.trunk.norm)


#: one LeanDecoder and one compiled static step per trunk, so that a compiled graph (guarded on
#: the decoder and its parameters, which the optimizer updates in place) is reused by every
#: rollout of a run instead of recompiled. An entry keeps its trunk alive for the life of the
#: process (a run compiles one policy).
_COMPILED_STEPS: dict[nn.Module, tuple[LeanDecoder, Any]] = {}
_STATIC_BUCKET = 64


def compiled_static_step(trunk: nn.Module):
    """``torch.compile``-d :meth:`LeanDecoder.step_static` of ``trunk`` (None if not lean)."""
    hit = _COMPILED_STEPS.get(trunk)
    if hit is None:
        lean = LeanDecoder.build(trunk)
        if lean is None:
            return None
        hit = (lean, torch.compile(lean.step_static, dynamic=False))
        _COMPILED_STEPS[trunk] = hit
    return hit[1]


@dataclass
class FastDecodeResult:
    """Raw output of :func:`fast_decode` (before the response mask is built).

    tokens_BN: sampled tokens, PAD after a row has ended, ``N <= max_new_tokens``.
    logprobs_BN / hidden_BND: per-token ``log softmax(logits / T)[token]`` (over the whole
    vocabulary, suppressed ids included, as the training pass computes it) and the trunk's
    last hidden state that produced the token (None unless requested).
    """

    tokens_BN: torch.Tensor
    logprobs_BN: torch.Tensor | None
    hidden_BND: torch.Tensor | None


@torch.no_grad()
def fast_decode(
    model: nn.Module,
    prompt_ids_BP: torch.Tensor,
    prompt_mask_BP: torch.Tensor,
    position_ids_BP: torch.Tensor,
    *,
    max_new_tokens: int,
    pad_id: int,
    temperature: float,
    greedy: bool,
    generator: torch.Generator | None,
    suppress: list[int],
    stops_S: torch.Tensor,
    return_logprobs: bool = False,
    return_hidden: bool = False,
    prompt_group_size: int = 1,
    lean_steps: bool = True,
    compile_steps: bool = False,
    packed_weights: bool = True,
) -> FastDecodeResult:
    """The decode loop (see the module docstring). ``model`` must pass :func:`supports_fast_decode`.

    ``prompt_group_size=G``: rows come in contiguous groups of ``G`` identical prompts (GRPO's
    samples per prompt); the prompt pass runs on one row per group and its cache is repeated.
    ``lean_steps=False`` steps through the HF modules even where :class:`LeanDecoder` applies.
    ``compile_steps=True`` (lean trunks only) runs :meth:`LeanDecoder.step_static` compiled by
    ``torch.compile``: every shape is fixed for the rollout, so one graph per (batch, length)
    serves every step and every later rollout of that shape; the first costs the compilation.
    ``packed_weights=True`` (lean trunks, eager steps, CPU float32) runs the steps' projections
    and the LM head on oneDNN-packed copies of the weights taken at the start of the call
    (:class:`PackedLinears`), freed when it returns.
    """
    parts = _parts(model)
    assert parts is not None
    trunk, lm_head = parts
    n_layers = _num_full_attention_layers(trunk)
    B, P = prompt_ids_BP.shape
    device = prompt_ids_BP.device
    lean = LeanDecoder.build(trunk) if lean_steps else None
    static_step = compiled_static_step(trunk) if lean is not None and compile_steps else None
    head = lm_head
    if lean is not None and static_step is None and packed_weights and lean.pack(B, lm_head):

        def head(h_BD: torch.Tensor) -> torch.Tensor:
            return lean.head(h_BD, lm_head)

    # compiled steps: the cache length rounded up to a multiple of 64, so that prompts of
    # different lengths share a graph (the extra positions stay masked)
    C = P + max_new_tokens
    if static_step is not None:
        C = -(-C // _STATIC_BUCKET) * _STATIC_BUCKET
    cache = PreallocatedCache(n_layers, C)
    attn_BT = torch.ones(B, P + max_new_tokens, dtype=torch.long, device=device)
    attn_BT[:, :P] = prompt_mask_BP
    tokens_BN = torch.full((B, max_new_tokens), pad_id, dtype=torch.long, device=device)
    logprobs_BN = (
        torch.zeros(B, max_new_tokens, dtype=torch.float32, device=device)
        if return_logprobs
        else None
    )
    hidden = [] if return_hidden else None
    ended_B = torch.zeros(B, dtype=torch.bool, device=device)
    pad_B = torch.full((B,), pad_id, dtype=torch.long, device=device)
    suppress_t = torch.tensor(suppress, dtype=torch.long, device=device) if suppress else None
    G = prompt_group_size
    next_pos_B1 = position_ids_BP[:, -1:] + 1
    if lean is not None:
        like = trunk.embed_tokens.weight
        cos_LD, sin_LD = lean.rope_tables(int(next_pos_B1.max()) + max_new_tokens, like)
        h = lean.prefill(
            prompt_ids_BP[::G], attn_BT[::G, :P], position_ids_BP[::G], cache, cos_LD, sin_LD
        )
    else:
        h = trunk(
            input_ids=prompt_ids_BP[::G],
            attention_mask=attn_BT[::G, :P],
            position_ids=position_ids_BP[::G],
            past_key_values=cache,
            use_cache=True,
        ).last_hidden_state[:, -1]
    if G > 1:
        cache.batch_repeat_interleave(G)
        h = h.repeat_interleave(G, 0)
    if lean is not None:
        bias_BT = torch.zeros(attn_BT.shape, dtype=h.dtype, device=device)
        bias_BT.masked_fill_(attn_BT == 0, float("-inf"))
    if static_step is not None:
        # the whole buffers; positions not written yet are masked until their step fills them
        keys = [cl._k for cl in cache.layers]
        values = [cl._v for cl in cache.layers]
        for buf in keys + values:  # never-written memory may hold NaN: 0 * NaN is NaN
            buf[:, :, P:].zero_()
        bias_BC = torch.full((B, C), float("-inf"), dtype=h.dtype, device=device)
        bias_BC[:, :P] = bias_BT[:, :P]
        cos_CD, sin_CD = lean.rope_tables(C, h)  # positions < P + max_new_tokens <= C
    n = 0
    for t in range(max_new_tokens):
        if hidden is not None:
            hidden.append(h)
        logits_BV = head(h).float()
        if logprobs_BN is not None:
            # log-probs of the unrestricted policy, log softmax(logits / T) over the whole
            # vocabulary: the function the training pass evaluates (suppressed ids are only kept
            # from being drawn), so PPO's first ratio is 1 up to float rounding
            z_BV = logits_BV / temperature
            lse_B = torch.logsumexp(z_BV, -1)
        if suppress_t is not None:
            logits_BV.index_fill_(1, suppress_t, float("-inf"))
        if greedy:
            tok_B = logits_BV.argmax(-1)
        else:
            probs_BV = torch.softmax(logits_BV / temperature, dim=-1)
            tok_B = sample_categorical(probs_BV, generator)
        if logprobs_BN is not None:
            logprobs_BN[:, t] = z_BV.gather(1, tok_B.unsqueeze(1)).squeeze(1) - lse_B
        tok_B = torch.where(ended_B, pad_B, tok_B)
        tokens_BN[:, t] = tok_B
        n = t + 1
        ended_B = ended_B | torch.isin(tok_B, stops_S)
        if t + 1 == max_new_tokens or bool(ended_B.all()):
            break
        if static_step is not None:
            bias_BC[:, P + t] = 0.0  # the slot this step fills
            slot_1 = torch.tensor([P + t], device=device)
            h = static_step(tok_B, next_pos_B1[:, 0], slot_1, keys, values, bias_BC, cos_CD, sin_CD)
        elif lean is not None:
            h = lean.step(tok_B, next_pos_B1[:, 0], cache, bias_BT[:, : P + t + 1], cos_LD, sin_LD)
        else:
            h = trunk(
                input_ids=tok_B.unsqueeze(1),
                attention_mask=attn_BT[:, : P + t + 1],
                position_ids=next_pos_B1,
                past_key_values=cache,
                use_cache=True,
            ).last_hidden_state[:, -1]
        next_pos_B1 = next_pos_B1 + 1
    return FastDecodeResult(
        tokens_BN=tokens_BN[:, :n],
        logprobs_BN=logprobs_BN[:, :n] if logprobs_BN is not None else None,
        hidden_BND=torch.stack(hidden, dim=1) if hidden is not None else None,
    )
