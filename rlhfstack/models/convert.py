"""Checkpoint converters: HF Llama <-> Megatron-core shards, training checkpoints -> HF, LoRA export.

Megatron-core's ``GPTModel`` stores a Llama-style decoder with fused projections. Per layer
(HF name on the left, ``H`` query heads, ``G`` key/value groups, ``d`` head dim, ``D`` hidden,
``F`` FFN width)::

    self_attn.{q,k,v}_proj.weight  [H*d|G*d|G*d, D] -> self_attention.linear_qkv.weight [(H+2G)*d, D]
        rows in grouped-query order: for each group g: the H/G query heads of g, then k_g, then v_g
    self_attn.o_proj.weight        [D, H*d]         -> self_attention.linear_proj.weight
    mlp.{gate,up}_proj.weight      [F, D] each      -> mlp.linear_fc1.weight [2F, D] = cat(gate, up)
    mlp.down_proj.weight           [D, F]           -> mlp.linear_fc2.weight
    input_layernorm.weight                          -> input_layernorm.weight (local spec) or
                                                       self_attention.linear_qkv.layer_norm_weight (TE)
    post_attention_layernorm.weight                 -> pre_mlp_layernorm.weight (local spec) or
                                                       mlp.linear_fc1.layer_norm_weight (TE)

and ``model.embed_tokens`` -> ``embedding.word_embeddings``, ``model.norm`` ->
``decoder.final_layernorm``, ``lm_head`` -> ``output_layer``. Qwen2's q/k/v biases go to
``linear_qkv.bias`` in the same grouped order.

Tensor parallelism (``tp`` ranks): column-parallel ``linear_qkv`` is cut on dim 0 into ``tp``
contiguous blocks (each holds ``G/tp`` whole groups); ``linear_fc1`` cuts gate and up separately and
concatenates rank ``r``'s pieces; row-parallel ``linear_proj``/``linear_fc2`` are cut on dim 1;
the vocab-parallel embedding and output layer on dim 0 after padding the vocabulary to a multiple
of ``make_vocab_size_divisible_by * tp`` (as Megatron-LM does). Pipeline parallelism (``pp``
stages): layers are split into equal contiguous blocks and renumbered from 0 on each stage; the
embedding lives on the first stage, the final norm and output layer on the last.

On disk (Megatron-LM's layout)::

    OUT/latest_checkpointed_iteration.txt          "release"
    OUT/release/mp_rank_{tp:02d}[_{pp:03d}]/model_optim_rng.pt
        {"model": state_dict, "checkpoint_version": 3.0, "iteration": 0, "args": Namespace(...)}

The ``_{pp:03d}`` suffix is present only when ``pp > 1``. ``args.hf_config`` keeps the HF config so
the reverse conversion is exact.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from omegaconf import OmegaConf
from safetensors.torch import load_file
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from rlhfstack.distributed import CKPT_EXTRA, latest_checkpoint, read_checkpoint_tensors
from rlhfstack.models.card import write_card
from rlhfstack.models.core import DTYPES
from rlhfstack.runtime import atomic_dir, require

Tensor = torch.Tensor
ShardKey = tuple[int, int]  # (tp_rank, pp_rank)

TRACKER_FILE = "latest_checkpointed_iteration.txt"
CHECKPOINT_FILE = "model_optim_rng.pt"
CHECKPOINT_VERSION = 3.0

# Names of the two per-layer norms under each Megatron-core layer spec.
LAYER_SPEC_NORMS: dict[str, tuple[str, str]] = {
    # get_gpt_layer_local_spec(): separate RMSNorm modules
    "local": ("input_layernorm.weight", "pre_mlp_layernorm.weight"),
    # get_gpt_layer_with_transformer_engine_spec(): norms fused into TE's LayerNormLinear
    "te": ("self_attention.linear_qkv.layer_norm_weight", "mlp.linear_fc1.layer_norm_weight"),
}


# ----------------------------------------------------------------------------- architecture


@dataclass(frozen=True)
class DecoderShape:
    """The numbers of a Llama-style decoder that the layout depends on."""

    num_layers: int
    hidden_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    ffn_hidden_size: int
    vocab_size: int
    tied_embeddings: bool = False
    qkv_bias: bool = False

    @property
    def heads_per_group(self) -> int:
        return self.num_heads // self.num_kv_heads

    @classmethod
    def from_hf_config(cls, config: Any) -> DecoderShape:
        """Read the shape from an HF ``LlamaConfig``/``Qwen2Config`` (object or dict)."""
        c = config if isinstance(config, dict) else config.to_dict()
        if c.get("model_type") not in ("llama", "qwen2", "mistral"):
            raise ValueError(
                f"unsupported model_type {c.get('model_type')!r}: Llama-style decoders only "
                "(llama, mistral, qwen2)"
            )
        heads = int(c["num_attention_heads"])
        kv = int(c.get("num_key_value_heads") or heads)
        head_dim = c.get("head_dim") or c["hidden_size"] // heads
        if c.get("mlp_bias"):
            raise ValueError(
                "mlp_bias=True is not supported (Megatron layout has no fc biases here)"
            )
        qkv_bias = bool(c.get("attention_bias")) or c.get("model_type") == "qwen2"
        return cls(
            num_layers=int(c["num_hidden_layers"]),
            hidden_size=int(c["hidden_size"]),
            num_heads=heads,
            num_kv_heads=kv,
            head_dim=int(head_dim),
            ffn_hidden_size=int(c["intermediate_size"]),
            vocab_size=int(c["vocab_size"]),
            tied_embeddings=bool(c.get("tie_word_embeddings", False)),
            qkv_bias=qkv_bias,
        )

    def check_parallel(self, tp: int, pp: int) -> None:
        """Raise if the model cannot be split ``tp`` x ``pp`` ways."""
        if tp < 1 or pp < 1:
            raise ValueError(f"tp and pp must be >= 1 (got tp={tp}, pp={pp})")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"num_heads {self.num_heads} not divisible by kv heads {self.num_kv_heads}"
            )
        if self.num_kv_heads % tp:
            raise ValueError(f"num_key_value_heads {self.num_kv_heads} not divisible by tp={tp}")
        if self.ffn_hidden_size % tp:
            raise ValueError(f"intermediate_size {self.ffn_hidden_size} not divisible by tp={tp}")
        if self.num_layers % pp:
            raise ValueError(f"num_layers {self.num_layers} not divisible by pp={pp}")


def padded_vocab_size(vocab_size: int, tp: int, divisible_by: int = 128) -> int:
    """Megatron-LM's vocabulary padding: up to a multiple of ``divisible_by * tp``."""
    multiple = divisible_by * tp
    return int(math.ceil(vocab_size / multiple) * multiple)


# ----------------------------------------------------------------------------- fused tensors


def fuse_qkv(q: Tensor, k: Tensor, v: Tensor, shape: DecoderShape) -> Tensor:
    """HF ``q [H*d, ...]``, ``k``/``v [G*d, ...]`` -> Megatron ``[(H+2G)*d, ...]`` in grouped order.

    Works for weights (``[., D]``) and biases (``[.]``).
    """
    G, d, hpg = shape.num_kv_heads, shape.head_dim, shape.heads_per_group
    rest = q.shape[1:]
    q_g = q.reshape(G, hpg * d, *rest)
    k_g = k.reshape(G, d, *rest)
    v_g = v.reshape(G, d, *rest)
    return torch.cat([q_g, k_g, v_g], dim=1).reshape(G * (hpg + 2) * d, *rest)


def split_qkv(qkv: Tensor, shape: DecoderShape) -> tuple[Tensor, Tensor, Tensor]:
    """Inverse of :func:`fuse_qkv`: ``[(H+2G)*d, ...]`` -> ``(q [H*d, ...], k [G*d, ...], v)``."""
    G, d, hpg = shape.num_kv_heads, shape.head_dim, shape.heads_per_group
    rest = qkv.shape[1:]
    grouped = qkv.reshape(G, (hpg + 2) * d, *rest)
    q = grouped[:, : hpg * d].reshape(G * hpg * d, *rest)
    k = grouped[:, hpg * d : (hpg + 1) * d].reshape(G * d, *rest)
    v = grouped[:, (hpg + 1) * d :].reshape(G * d, *rest)
    return q.contiguous(), k.contiguous(), v.contiguous()


def _pad_vocab(w_VD: Tensor, padded: int) -> Tensor:
    """Pad rows to ``padded`` by repeating the last row (Megatron-LM's checkpoint saver does this)."""
    extra = padded - w_VD.shape[0]
    if extra < 0:
        raise ValueError(f"vocab {w_VD.shape[0]} larger than padded size {padded}")
    if extra == 0:
        return w_VD
    return torch.cat([w_VD, w_VD[-1:].expand(extra, -1)], dim=0)


# ----------------------------------------------------------------------------- HF -> Megatron


def _layer_tensors_hf_to_mcore(
    hf: dict[str, Tensor], i: int, shape: DecoderShape, layer_spec: str
) -> dict[str, Tensor]:
    """Full (unsharded) Megatron tensors of HF layer ``i``, keyed by name inside the layer."""
    p = f"model.layers.{i}."
    in_norm, mlp_norm = LAYER_SPEC_NORMS[layer_spec]
    out = {
        in_norm: hf[p + "input_layernorm.weight"],
        mlp_norm: hf[p + "post_attention_layernorm.weight"],
        "self_attention.linear_qkv.weight": fuse_qkv(
            hf[p + "self_attn.q_proj.weight"],
            hf[p + "self_attn.k_proj.weight"],
            hf[p + "self_attn.v_proj.weight"],
            shape,
        ),
        "self_attention.linear_proj.weight": hf[p + "self_attn.o_proj.weight"],
        # fc1 stays as (gate, up) until sharding: each TP rank gets cat(gate_r, up_r)
        "mlp.linear_fc1.weight": torch.stack(
            [hf[p + "mlp.gate_proj.weight"], hf[p + "mlp.up_proj.weight"]]
        ),
        "mlp.linear_fc2.weight": hf[p + "mlp.down_proj.weight"],
    }
    if shape.qkv_bias:
        out["self_attention.linear_qkv.bias"] = fuse_qkv(
            hf[p + "self_attn.q_proj.bias"],
            hf[p + "self_attn.k_proj.bias"],
            hf[p + "self_attn.v_proj.bias"],
            shape,
        )
    return out


def _shard(name: str, t: Tensor, tp: int, rank: int) -> Tensor:
    """Rank ``rank``'s piece of a full Megatron tensor (fc1 arrives stacked as ``[2, F, D]``)."""
    if tp == 1:
        return t.reshape(-1, *t.shape[2:]) if name.endswith("linear_fc1.weight") else t
    if name.endswith("linear_fc1.weight"):
        gate, up = t[0].chunk(tp, dim=0)[rank], t[1].chunk(tp, dim=0)[rank]
        return torch.cat([gate, up], dim=0).clone()
    if name.endswith(("linear_qkv.weight", "linear_qkv.bias")) or name in (
        "embedding.word_embeddings.weight",
        "output_layer.weight",
    ):
        return t.chunk(tp, dim=0)[rank].clone()
    if name.endswith(("linear_proj.weight", "linear_fc2.weight")):
        return t.chunk(tp, dim=1)[rank].clone()
    return t  # norms: replicated


def hf_to_megatron_state(
    hf_state: dict[str, Tensor],
    shape: DecoderShape,
    tp: int = 1,
    pp: int = 1,
    layer_spec: str = "local",
    make_vocab_size_divisible_by: int = 128,
) -> dict[ShardKey, dict[str, Tensor]]:
    """Split an HF Llama state dict into Megatron-core shards ``{(tp_rank, pp_rank): state_dict}``."""
    if layer_spec not in LAYER_SPEC_NORMS:
        raise ValueError(
            f"layer_spec must be one of {sorted(LAYER_SPEC_NORMS)}, got {layer_spec!r}"
        )
    shape.check_parallel(tp, pp)
    padded = padded_vocab_size(shape.vocab_size, tp, make_vocab_size_divisible_by)
    per_stage = shape.num_layers // pp
    embed = _pad_vocab(hf_state["model.embed_tokens.weight"], padded)
    if shape.tied_embeddings:
        output = embed
    else:
        output = _pad_vocab(hf_state["lm_head.weight"], padded)

    shards: dict[ShardKey, dict[str, Tensor]] = {}
    for s in range(pp):
        full: dict[str, Tensor] = {}
        if s == 0:
            full["embedding.word_embeddings.weight"] = embed
        for local in range(per_stage):
            layer = _layer_tensors_hf_to_mcore(hf_state, s * per_stage + local, shape, layer_spec)
            for k, v in layer.items():
                full[f"decoder.layers.{local}.{k}"] = v
        if s == pp - 1:
            full["decoder.final_layernorm.weight"] = hf_state["model.norm.weight"]
            # Tied embeddings: with pp == 1 the output layer reuses the embedding (no weight of its
            # own); with pp > 1 Megatron keeps a copy on the last stage.
            if not shape.tied_embeddings or pp > 1:
                full["output_layer.weight"] = output
        for r in range(tp):
            shards[(r, s)] = {k: _shard(k, v, tp, r) for k, v in full.items()}
    return shards


# ----------------------------------------------------------------------------- Megatron -> HF


def _unshard(name: str, pieces: list[Tensor]) -> Tensor:
    """Full tensor from the TP pieces of one Megatron tensor (fc1 returned as cat(gate, up))."""
    if len(pieces) == 1:
        return pieces[0]
    if name.endswith("linear_fc1.weight"):
        halves = [p.chunk(2, dim=0) for p in pieces]
        return torch.cat([h[0] for h in halves] + [h[1] for h in halves], dim=0)
    if name.endswith(("linear_qkv.weight", "linear_qkv.bias")) or name in (
        "embedding.word_embeddings.weight",
        "output_layer.weight",
    ):
        return torch.cat(pieces, dim=0)
    if name.endswith(("linear_proj.weight", "linear_fc2.weight")):
        return torch.cat(pieces, dim=1)
    for p in pieces[1:]:
        if not torch.equal(p, pieces[0]):
            raise ValueError(f"replicated tensor {name} differs across TP ranks")
    return pieces[0]


def detect_layer_spec(state: dict[str, Any]) -> str:
    """``te`` when the norms are fused into the linear layers, else ``local``."""
    return "te" if any(k.endswith("linear_qkv.layer_norm_weight") for k in state) else "local"


def megatron_to_hf_state(
    shards: dict[ShardKey, dict[str, Tensor]], shape: DecoderShape
) -> dict[str, Tensor]:
    """Merge Megatron-core shards back into one HF Llama state dict (vocab padding removed)."""
    tp = 1 + max(r for r, _ in shards)
    pp = 1 + max(s for _, s in shards)
    shape.check_parallel(tp, pp)
    per_stage = shape.num_layers // pp
    spec = detect_layer_spec(shards[(0, 0)])
    in_norm, mlp_norm = LAYER_SPEC_NORMS[spec]
    layer_re = re.compile(r"^decoder\.layers\.(\d+)\.(.+)$")
    hf: dict[str, Tensor] = {}
    V = shape.vocab_size
    for s in range(pp):
        names = [k for k in shards[(0, s)] if not k.endswith("_extra_state")]
        full = {k: _unshard(k, [shards[(r, s)][k] for r in range(tp)]) for k in names}
        for k, t in full.items():
            m = layer_re.match(k)
            if m is None:
                continue
            i, sub = s * per_stage + int(m.group(1)), m.group(2)
            p = f"model.layers.{i}."
            if sub == in_norm:
                hf[p + "input_layernorm.weight"] = t
            elif sub == mlp_norm:
                hf[p + "post_attention_layernorm.weight"] = t
            elif sub == "self_attention.linear_qkv.weight":
                q, k_, v = split_qkv(t, shape)
                hf[p + "self_attn.q_proj.weight"] = q
                hf[p + "self_attn.k_proj.weight"] = k_
                hf[p + "self_attn.v_proj.weight"] = v
            elif sub == "self_attention.linear_qkv.bias":
                q, k_, v = split_qkv(t, shape)
                hf[p + "self_attn.q_proj.bias"] = q
                hf[p + "self_attn.k_proj.bias"] = k_
                hf[p + "self_attn.v_proj.bias"] = v
            elif sub == "self_attention.linear_proj.weight":
                hf[p + "self_attn.o_proj.weight"] = t
            elif sub == "mlp.linear_fc1.weight":
                gate, up = t.chunk(2, dim=0)
                hf[p + "mlp.gate_proj.weight"] = gate.contiguous()
                hf[p + "mlp.up_proj.weight"] = up.contiguous()
            elif sub == "mlp.linear_fc2.weight":
                hf[p + "mlp.down_proj.weight"] = t
            else:
                raise KeyError(f"unexpected Megatron tensor {k} on stage {s}")
        if s == 0:
            hf["model.embed_tokens.weight"] = full["embedding.word_embeddings.weight"][:V].clone()
        if s == pp - 1:
            hf["model.norm.weight"] = full["decoder.final_layernorm.weight"]
            if not shape.tied_embeddings:
                hf["lm_head.weight"] = full["output_layer.weight"][:V].clone()
    return hf


# ----------------------------------------------------------------------------- files


def shard_dirname(tp_rank: int, pp_rank: int, pp: int) -> str:
    """``mp_rank_{tp:02d}`` (pp == 1) or ``mp_rank_{tp:02d}_{pp:03d}``."""
    return f"mp_rank_{tp_rank:02d}" if pp == 1 else f"mp_rank_{tp_rank:02d}_{pp_rank:03d}"


def megatron_args(
    hf_config: dict[str, Any],
    shape: DecoderShape,
    tp: int,
    pp: int,
    layer_spec: str,
    dtype: torch.dtype,
    make_vocab_size_divisible_by: int = 128,
) -> argparse.Namespace:
    """The Megatron-LM ``args`` stored with each shard (its argument names), plus ``hf_config``."""
    rope = hf_config.get("rope_parameters") or {}
    rope_theta = rope.get("rope_theta", hf_config.get("rope_theta", 10000.0))
    return argparse.Namespace(
        num_layers=shape.num_layers,
        hidden_size=shape.hidden_size,
        ffn_hidden_size=shape.ffn_hidden_size,
        num_attention_heads=shape.num_heads,
        group_query_attention=shape.num_kv_heads != shape.num_heads,
        num_query_groups=shape.num_kv_heads,
        kv_channels=shape.head_dim,
        max_position_embeddings=int(hf_config.get("max_position_embeddings", 4096)),
        seq_length=int(hf_config.get("max_position_embeddings", 4096)),
        padded_vocab_size=padded_vocab_size(shape.vocab_size, tp, make_vocab_size_divisible_by),
        make_vocab_size_divisible_by=make_vocab_size_divisible_by,
        tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=pp,
        normalization="RMSNorm",
        norm_epsilon=float(hf_config.get("rms_norm_eps", 1e-6)),
        swiglu=True,
        add_bias_linear=False,
        add_qkv_bias=shape.qkv_bias,
        untie_embeddings_and_output_weights=not shape.tied_embeddings,
        position_embedding_type="rope",
        rotary_base=float(rope_theta),
        rotary_percent=1.0,
        params_dtype=dtype,
        bf16=dtype == torch.bfloat16,
        fp16=dtype == torch.float16,
        transformer_impl="local" if layer_spec == "local" else "transformer_engine",
        use_legacy_models=False,
        tokenizer_type="HuggingFaceTokenizer",
        iteration=0,
        consumed_train_samples=0,
        hf_config=hf_config,
    )


def save_megatron_checkpoint(
    shards: dict[ShardKey, dict[str, Tensor]], out_dir: str | os.PathLike, args: argparse.Namespace
) -> Path:
    """Write ``out_dir/release/mp_rank_*/model_optim_rng.pt`` and the iteration tracker (atomic)."""

    pp = 1 + max(s for _, s in shards)
    with atomic_dir(out_dir) as tmp:
        for (r, s), sd in sorted(shards.items()):
            d = tmp / "release" / shard_dirname(r, s, pp)
            d.mkdir(parents=True)
            torch.save(
                {
                    "model": sd,
                    "checkpoint_version": CHECKPOINT_VERSION,
                    "iteration": 0,
                    "args": args,
                },
                d / CHECKPOINT_FILE,
            )
        (tmp / TRACKER_FILE).write_text("release\n")
    return Path(out_dir)


def _iteration_dir(path: Path) -> Path:
    """The directory holding ``mp_rank_*`` (follows Megatron's tracker file when present)."""
    tracker = path / TRACKER_FILE
    if tracker.exists():
        it = tracker.read_text().strip()
        return path / ("release" if it == "release" else f"iter_{int(it):07d}")
    return path


def load_megatron_checkpoint(
    path: str | os.PathLike, trust_pickle: bool = False
) -> tuple[dict[ShardKey, dict[str, Tensor]], argparse.Namespace | None]:
    """Read every ``mp_rank_*`` shard under ``path`` -> ``({(tp, pp): state_dict}, args)``.

    ``path`` is a checkpoint root (with ``latest_checkpointed_iteration.txt``) or an iteration
    directory. Shards are read with ``weights_only=True`` (``argparse.Namespace`` allowed);
    ``trust_pickle=True`` falls back to full unpickling for checkpoints written by Megatron-LM,
    whose ``args`` hold arbitrary objects: only for files you trust.
    """
    root = _iteration_dir(Path(path))
    pat = re.compile(r"^mp_rank_(\d{2})(?:_(\d{3}))?$")
    found = {}
    for d in sorted(root.iterdir()) if root.is_dir() else []:
        m = pat.match(d.name)
        if m and (d / CHECKPOINT_FILE).exists():
            found[(int(m.group(1)), int(m.group(2) or 0))] = d / CHECKPOINT_FILE
    if not found:
        raise FileNotFoundError(f"{root}: no mp_rank_*/{CHECKPOINT_FILE} shards")
    tp = 1 + max(r for r, _ in found)
    pp = 1 + max(s for _, s in found)
    missing = [(r, s) for r in range(tp) for s in range(pp) if (r, s) not in found]
    if missing:
        raise FileNotFoundError(f"{root}: missing shards (tp_rank, pp_rank) {missing}")
    shards: dict[ShardKey, dict[str, Tensor]] = {}
    args = None
    for key, f in found.items():
        if trust_pickle:
            ckpt = torch.load(f, map_location="cpu", weights_only=False)
        else:
            with torch.serialization.safe_globals([argparse.Namespace]):
                try:
                    ckpt = torch.load(f, map_location="cpu", weights_only=True)
                except Exception as err:
                    raise RuntimeError(
                        f"{f}: cannot be read with weights_only=True ({err}); if you trust the "
                        "file, pass trust_pickle=True (--trust-pickle)"
                    ) from None
        shards[key] = ckpt["model"]
        args = ckpt.get("args", args)
    return shards, args


def shape_from_megatron_args(
    args: argparse.Namespace, vocab_size: int | None = None
) -> DecoderShape:
    """Decoder shape from Megatron-LM ``args`` (``vocab_size`` needed without ``args.hf_config``)."""
    hf = getattr(args, "hf_config", None)
    if hf is not None:
        return DecoderShape.from_hf_config(hf)
    heads = args.num_attention_heads
    groups = args.num_query_groups if getattr(args, "group_query_attention", False) else heads
    if vocab_size is None:
        raise ValueError("checkpoint args carry no hf_config: pass the true vocab_size")
    return DecoderShape(
        num_layers=args.num_layers,
        hidden_size=args.hidden_size,
        num_heads=heads,
        num_kv_heads=groups,
        head_dim=getattr(args, "kv_channels", None) or args.hidden_size // heads,
        ffn_hidden_size=args.ffn_hidden_size,
        vocab_size=vocab_size,
        tied_embeddings=not getattr(args, "untie_embeddings_and_output_weights", False),
        qkv_bias=bool(getattr(args, "add_qkv_bias", False)),
    )


def hf_config_from_megatron_args(args: argparse.Namespace, vocab_size: int) -> dict[str, Any]:
    """A LlamaConfig dict rebuilt from Megatron-LM ``args`` (for checkpoints we did not write)."""
    shape = shape_from_megatron_args(args, vocab_size)
    return {
        "model_type": "llama",
        "architectures": ["LlamaForCausalLM"],
        "vocab_size": vocab_size,
        "hidden_size": shape.hidden_size,
        "intermediate_size": shape.ffn_hidden_size,
        "num_hidden_layers": shape.num_layers,
        "num_attention_heads": shape.num_heads,
        "num_key_value_heads": shape.num_kv_heads,
        "head_dim": shape.head_dim,
        "max_position_embeddings": getattr(args, "max_position_embeddings", 4096),
        "rms_norm_eps": getattr(args, "norm_epsilon", 1e-5),
        "rope_parameters": {
            "rope_type": "default",
            "rope_theta": getattr(args, "rotary_base", 10000.0),
        },
        "tie_word_embeddings": shape.tied_embeddings,
        "attention_bias": shape.qkv_bias,
    }


# ----------------------------------------------------------------------------- HF dirs


def _read_hf_state(model_dir: Path) -> dict[str, Tensor]:
    """All tensors of an HF checkpoint directory (safetensors, sharded or not; or .bin)."""

    files = sorted(model_dir.glob("*.safetensors"))
    if files:
        state: dict[str, Tensor] = {}
        for f in files:
            state.update(load_file(str(f)))
        return state
    bins = sorted(model_dir.glob("pytorch_model*.bin"))
    if not bins:
        raise FileNotFoundError(f"{model_dir}: no *.safetensors or pytorch_model*.bin")
    state = {}
    for f in bins:
        state.update(torch.load(f, map_location="cpu", weights_only=True))
    return state


def _copy_tokenizer(src: Path, dst: Path) -> None:
    """Copy tokenizer/generation files (not weights or config) from ``src`` to ``dst``."""
    for f in src.iterdir():
        if f.is_file() and (
            f.name.startswith(
                ("tokenizer", "special_tokens_map", "generation_config", "added_tokens")
            )
            or f.suffix in (".model", ".tiktoken")
            or f.name in ("vocab.json", "merges.txt", "chat_template.jinja")
        ):
            shutil.copy2(f, dst / f.name)


def save_hf_state(
    state: dict[str, Tensor],
    hf_config: dict[str, Any],
    out_dir: str | os.PathLike,
    tokenizer_dir: str | os.PathLike | None = None,
) -> Path:
    """Write ``state`` as an HF model directory (config.json + safetensors [+ tokenizer]), atomically.

    The model is built on the meta device and the tensors assigned, so nothing is initialized.
    """

    cfg_dict = dict(hf_config)
    model_type = cfg_dict.pop("model_type")
    config = AutoConfig.for_model(model_type, **cfg_dict)
    dtype = next(iter(state.values())).dtype
    config.dtype = dtype
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    full = dict(state)
    if getattr(config, "tie_word_embeddings", False):
        full.setdefault("lm_head.weight", full["model.embed_tokens.weight"])
    model.load_state_dict(full, strict=True, assign=True)
    if getattr(config, "tie_word_embeddings", False):
        model.tie_weights()
    with atomic_dir(out_dir) as tmp:
        model.save_pretrained(tmp)
        if tokenizer_dir is not None:
            _copy_tokenizer(Path(tokenizer_dir), tmp)
    return Path(out_dir)


def hf_to_megatron(
    hf_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    tp: int = 1,
    pp: int = 1,
    layer_spec: str = "local",
    dtype: str | None = None,
    make_vocab_size_divisible_by: int = 128,
) -> Path:
    """Convert an HF Llama/Qwen2 directory to a Megatron-core checkpoint (``tp`` x ``pp`` shards)."""
    hf_dir = Path(hf_dir)
    hf_config = json.loads((hf_dir / "config.json").read_text())
    shape = DecoderShape.from_hf_config(hf_config)
    state = _read_hf_state(hf_dir)
    if dtype is not None:
        state = {k: v.to(DTYPES[dtype]) for k, v in state.items()}
    shards = hf_to_megatron_state(state, shape, tp, pp, layer_spec, make_vocab_size_divisible_by)
    tensor_dtype = next(iter(state.values())).dtype
    args = megatron_args(
        hf_config, shape, tp, pp, layer_spec, tensor_dtype, make_vocab_size_divisible_by
    )
    return save_megatron_checkpoint(shards, out_dir, args)


def megatron_to_hf(
    megatron_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    tokenizer_dir: str | os.PathLike | None = None,
    hf_config: dict[str, Any] | None = None,
    vocab_size: int | None = None,
    trust_pickle: bool = False,
) -> Path:
    """Merge a Megatron-core checkpoint into an HF directory.

    The HF config comes from ``args.hf_config`` (checkpoints written by :func:`hf_to_megatron`),
    else ``hf_config``, else it is rebuilt from Megatron's ``args`` with the true ``vocab_size``.
    """
    shards, args = load_megatron_checkpoint(megatron_dir, trust_pickle=trust_pickle)
    cfg = hf_config or (getattr(args, "hf_config", None) if args is not None else None)
    if cfg is None:
        if args is None or vocab_size is None:
            raise ValueError("no HF config in the checkpoint: pass hf_config or vocab_size")
        cfg = hf_config_from_megatron_args(args, vocab_size)
    shape = DecoderShape.from_hf_config(cfg)
    state = megatron_to_hf_state(shards, shape)
    return save_hf_state(state, cfg, out_dir, tokenizer_dir)


# ----------------------------------------------------------------------------- project checkpoints


def find_checkpoint(path: str | os.PathLike) -> Path:
    """``path`` itself when it is a complete checkpoint, else the newest ``ckpt-*`` under it."""

    path = Path(path)
    if (path / CKPT_EXTRA).exists() and (path / ".metadata").exists():
        return path
    found = latest_checkpoint(path)
    if found is None:
        raise FileNotFoundError(f"{path}: not a checkpoint and no complete ckpt-* under it")
    return found


def _lora_alpha_from_run(ckpt_dir: Path) -> float | None:
    """``model.lora.alpha`` from the run's resolved ``config.yaml`` (beside the ckpt dirs)."""
    cfg_file = ckpt_dir.parent / "config.yaml"
    if not cfg_file.exists():
        return None

    cfg = OmegaConf.load(cfg_file)
    return OmegaConf.select(cfg, "model.lora.alpha", default=None)


def ckpt_to_hf(
    ckpt: str | os.PathLike,
    base: str | os.PathLike,
    out_dir: str | os.PathLike,
    lora_alpha: float | None = None,
    dtype: str | None = None,
) -> Path:
    """Extract the policy of a training checkpoint (``ckpt-XXXXXX/``) into an HF directory.

    ``base`` is the HF directory the run started from (config + tokenizer). A LoRA policy (peft
    state dict) is merged into the base weights (peft ``merge_and_unload``); its rank is read from
    the tensors and ``alpha`` from the run's ``config.yaml`` unless ``lora_alpha`` is given.
    Every checkpoint tensor must match the base's architecture, or it fails loudly.
    """

    ckpt_dir = find_checkpoint(ckpt)
    # the trained module is {"policy": ..., "value": ...}; frozen weights (a LoRA base) are not
    # in the checkpoint and come from ``base``
    policy_sd: dict[str, Tensor] = read_checkpoint_tensors(ckpt_dir, "model.policy.")
    sd_dtype = next(iter(policy_sd.values())).dtype
    model = AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32)
    is_lora = any(".lora_A." in k for k in policy_sd)
    if is_lora:
        peft = require("peft", "a LoRA checkpoint")
        LoraConfig, get_peft_model = peft.LoraConfig, peft.get_peft_model

        a_keys = [k for k in policy_sd if ".lora_A." in k]
        r = int(policy_sd[a_keys[0]].shape[0])
        alpha = lora_alpha if lora_alpha is not None else _lora_alpha_from_run(ckpt_dir)
        if alpha is None:
            raise ValueError(
                f"{ckpt_dir}: LoRA checkpoint but no lora alpha (no run config.yaml): pass lora_alpha"
            )
        targets = sorted({k.split(".lora_A.")[0].rsplit(".", 1)[-1] for k in a_keys})
        model = get_peft_model(
            model,
            LoraConfig(r=r, lora_alpha=float(alpha), target_modules=targets, lora_dropout=0.0),
        )
    missing, unexpected = model.load_state_dict(
        {k: v.float() for k, v in policy_sd.items()}, strict=False
    )
    # strict where it matters: every checkpoint tensor must land; only frozen LoRA base
    # weights may be absent from it
    absent = [k for k in missing if not is_lora or ".lora_" in k]
    if unexpected or absent:
        raise KeyError(
            f"{ckpt_dir}: checkpoint does not fit {base}: unexpected {unexpected[:5]}, "
            f"missing {absent[:5]}"
        )
    if is_lora:
        model = model.merge_and_unload()
    out_dtype = DTYPES[dtype] if dtype is not None else sd_dtype
    model = model.to(out_dtype)
    model.config.dtype = out_dtype
    tok = AutoTokenizer.from_pretrained(str(base))
    with atomic_dir(out_dir) as tmp:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
    return Path(out_dir)


def export_hf(
    model_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    lora_adapter: str | os.PathLike | None = None,
    dtype: str = "bfloat16",
) -> Path:
    """Write one servable HF directory (safetensors + config + tokenizer) in ``dtype``.

    ``lora_adapter`` (a peft adapter directory) is merged into ``model_dir`` in float32 before the
    cast. When ``model_dir`` itself is an adapter directory (``adapter_config.json``), its base is
    ``base_model_name_or_path`` from that file.
    """

    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    model_dir = Path(model_dir)
    base_dir: Path | str = model_dir
    if lora_adapter is None and (model_dir / "adapter_config.json").exists():
        lora_adapter = model_dir
        base_dir = json.loads((model_dir / "adapter_config.json").read_text())[
            "base_model_name_or_path"
        ]
    model = AutoModelForCausalLM.from_pretrained(str(base_dir), dtype=torch.float32)
    if lora_adapter is not None:
        PeftModel = require("peft", "merging a LoRA adapter").PeftModel

        model = PeftModel.from_pretrained(model, str(lora_adapter)).merge_and_unload()
    model = model.to(DTYPES[dtype])
    model.config.dtype = DTYPES[dtype]
    tok_dir = base_dir
    if lora_adapter is not None and any(Path(lora_adapter).glob("tokenizer*")):
        tok_dir = lora_adapter
    tok = AutoTokenizer.from_pretrained(str(tok_dir))
    with atomic_dir(out_dir) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
        _export_card(tmp, model_dir, base_dir, lora_adapter, dtype)
    return Path(out_dir)


def _export_card(
    out: Path, model_dir: Path, base_dir: Path | str, lora_adapter: Any, dtype: str
) -> None:
    """``out/README.md``: the source's model card (its text after the metadata, when it has one)
    under fresh metadata, plus an "Export" section; local paths relative to the export's final
    place (``out`` is its sibling while being written)."""
    source_card = model_dir / "README.md"
    body = ""
    if source_card.exists():
        text = source_card.read_text(encoding="utf-8")
        body = text.split("\n---\n", 1)[1] if text.startswith("---\n") else text
    write_card(
        out,
        title=None if body else "Exported model",
        description="A causal LM exported by `tools/export_hf.py` (safetensors, one dtype).",
        body=body,
        base_model=str(base_dir),
        tags=["rlhf", "export"],
        pipeline_tag="text-generation",
        sections={
            "Export": {
                "source": str(model_dir.resolve()),
                "LoRA adapter merged": str(Path(lora_adapter).resolve())
                if lora_adapter
                else "none",
                "dtype": dtype,
                "written by": "tools/export_hf.py",
            }
        },
    )
