"""HF Llama <-> Megatron-core GPTModel layout: fused QKV/fc1, TP/PP sharding, exact round trips.

The megatron-core part builds the real ``GPTModel`` on CPU with the local layer spec, loads the
converted (tp=1, pp=1) shard with ``strict=True`` (``_extra_state`` keys ignored, as Megatron's own
loader does) and checks its logits against the HF model's.
"""

from __future__ import annotations

import contextlib
import json
import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from rlhfstack.models.convert import (
    CHECKPOINT_FILE,
    TRACKER_FILE,
    DecoderShape,
    fuse_qkv,
    hf_to_megatron,
    hf_to_megatron_state,
    load_megatron_checkpoint,
    megatron_to_hf,
    megatron_to_hf_state,
    padded_vocab_size,
    split_qkv,
)

VOCAB = 100  # not a multiple of 128: exercises Megatron's vocabulary padding


def tiny_config(model_type: str = "llama", tied: bool = False):
    from transformers import LlamaConfig, Qwen2Config

    cls = {"llama": LlamaConfig, "qwen2": Qwen2Config}[model_type]
    return cls(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,  # GQA: 2 query heads per group
        head_dim=8,
        max_position_embeddings=64,
        rms_norm_eps=1e-5,
        tie_word_embeddings=tied,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )


def tiny_model(model_type: str = "llama", tied: bool = False, seed: int = 0):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(model_type, tied), dtype=torch.float32)
    with torch.no_grad():  # norms default to ones: randomize so a swapped norm is caught
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.normal_(1.0 if "norm" in name else 0.0, 0.1)
    return model.eval()


def _saved(model, path: Path) -> Path:
    model.save_pretrained(path)
    return path


# ----------------------------------------------------------------------------- pure layout


def test_fuse_qkv_grouped_order_and_inverse():
    shape = DecoderShape.from_hf_config(tiny_config())
    d, D = shape.head_dim, shape.hidden_size
    # Fill each head's rows with a recognizable value: q heads 0..3, k groups 10.., v groups 20..
    q = torch.arange(4).repeat_interleave(d)[:, None].expand(-1, D).float()
    k = (10 + torch.arange(2)).repeat_interleave(d)[:, None].expand(-1, D).float()
    v = (20 + torch.arange(2)).repeat_interleave(d)[:, None].expand(-1, D).float()
    fused = fuse_qkv(q, k, v, shape)
    assert fused.shape == ((4 + 2 * 2) * d, D)
    heads_in_order = fused[::d, 0].tolist()
    # group 0: q0 q1 k0 v0, group 1: q2 q3 k1 v1
    assert heads_in_order == [0, 1, 10, 20, 2, 3, 11, 21]
    q2, k2, v2 = split_qkv(fused, shape)
    assert torch.equal(q2, q) and torch.equal(k2, k) and torch.equal(v2, v)
    bias = fuse_qkv(q[:, 0], k[:, 0], v[:, 0], shape)  # 1-D biases too
    assert bias[::d].tolist() == heads_in_order


def test_tp_pp_shards_layout():
    model = tiny_model()
    hf = model.state_dict()
    shape = DecoderShape.from_hf_config(model.config)
    shards = hf_to_megatron_state(hf, shape, tp=2, pp=2)
    assert sorted(shards) == [(0, 0), (0, 1), (1, 0), (1, 1)]
    padded = padded_vocab_size(VOCAB, tp=2)
    assert padded == 256
    # first stage: embedding + layers 0,1 (renumbered); last stage: layers 2,3 + norm + output
    s0, s1 = shards[(0, 0)], shards[(0, 1)]
    assert "embedding.word_embeddings.weight" in s0 and "output_layer.weight" not in s0
    assert "decoder.final_layernorm.weight" in s1 and "embedding.word_embeddings.weight" not in s1
    assert {k.split(".")[2] for k in s0 if k.startswith("decoder.layers.")} == {"0", "1"}
    assert s0["embedding.word_embeddings.weight"].shape == (padded // 2, 32)
    assert s1["output_layer.weight"].shape == (padded // 2, 32)
    # layer 2 of HF is layer 0 of stage 1; rank r holds kv group r (G/tp = 1 group per rank)
    for r in range(2):
        sd = shards[(r, 1)]
        d = shape.head_dim
        qkv = sd["decoder.layers.0.self_attention.linear_qkv.weight"]
        assert qkv.shape == ((2 + 2) * d, 32)
        p = "model.layers.2."
        assert torch.equal(
            qkv[: 2 * d], hf[p + "self_attn.q_proj.weight"][r * 2 * d : (r + 1) * 2 * d]
        )
        assert torch.equal(
            qkv[2 * d : 3 * d], hf[p + "self_attn.k_proj.weight"][r * d : (r + 1) * d]
        )
        assert torch.equal(qkv[3 * d :], hf[p + "self_attn.v_proj.weight"][r * d : (r + 1) * d])
        fc1 = sd["decoder.layers.0.mlp.linear_fc1.weight"]
        half = 48 // 2
        gate_r = hf[p + "mlp.gate_proj.weight"][r * half : (r + 1) * half]
        up_r = hf[p + "mlp.up_proj.weight"][r * half : (r + 1) * half]
        assert torch.equal(fc1, torch.cat([gate_r, up_r]))
        assert torch.equal(
            sd["decoder.layers.0.mlp.linear_fc2.weight"],
            hf[p + "mlp.down_proj.weight"][:, r * half : (r + 1) * half],
        )
        assert torch.equal(
            sd["decoder.layers.0.self_attention.linear_proj.weight"],
            hf[p + "self_attn.o_proj.weight"][:, r * 16 : (r + 1) * 16],
        )
        assert torch.equal(
            sd["decoder.layers.0.input_layernorm.weight"], hf[p + "input_layernorm.weight"]
        )
        assert torch.equal(
            sd["decoder.layers.0.pre_mlp_layernorm.weight"],
            hf[p + "post_attention_layernorm.weight"],
        )
    # vocab padding repeats the last row (Megatron-LM's saver) and is stripped on the way back
    full_out = torch.cat(
        [shards[(0, 1)]["output_layer.weight"], shards[(1, 1)]["output_layer.weight"]]
    )
    assert torch.equal(full_out[:VOCAB], hf["lm_head.weight"])
    assert torch.equal(full_out[VOCAB:], hf["lm_head.weight"][-1:].expand(padded - VOCAB, -1))


def test_parallel_sizes_checked():
    shape = DecoderShape.from_hf_config(tiny_config())
    with pytest.raises(ValueError, match="num_key_value_heads 2 not divisible by tp=4"):
        shape.check_parallel(4, 1)
    with pytest.raises(ValueError, match="num_layers 4 not divisible by pp=3"):
        shape.check_parallel(1, 3)


@pytest.mark.parametrize(
    "model_type,tied,layer_spec,tp,pp",
    [("llama", False, "te", 2, 1), ("llama", True, "local", 2, 2), ("qwen2", False, "local", 2, 4)],
)
def test_state_round_trip_variants(model_type, tied, layer_spec, tp, pp):
    model = tiny_model(model_type, tied)
    hf = {k: v for k, v in model.state_dict().items() if not (tied and k == "lm_head.weight")}
    shape = DecoderShape.from_hf_config(model.config)
    assert shape.qkv_bias == (model_type == "qwen2")
    shards = hf_to_megatron_state(hf, shape, tp=tp, pp=pp, layer_spec=layer_spec)
    if layer_spec == "te":
        assert "decoder.layers.0.self_attention.linear_qkv.layer_norm_weight" in shards[(0, 0)]
        assert "decoder.layers.0.mlp.linear_fc1.layer_norm_weight" in shards[(0, 0)]
    if model_type == "qwen2":
        assert shards[(0, 0)]["decoder.layers.0.self_attention.linear_qkv.bias"].shape == (32,)
    back = megatron_to_hf_state(shards, shape)
    assert sorted(back) == sorted(hf)
    for k in hf:
        assert torch.equal(back[k], hf[k]), k


def test_hf_megatron_hf_files_bit_exact(tmp_path):
    """HF -> Megatron (tp=2, pp=2) on disk -> HF equals the original bit for bit."""
    model = tiny_model()
    src = _saved(model, tmp_path / "hf")
    mdir = hf_to_megatron(src, tmp_path / "mcore", tp=2, pp=2)
    assert (mdir / TRACKER_FILE).read_text().strip() == "release"
    names = sorted(p.name for p in (mdir / "release").iterdir())
    assert names == ["mp_rank_00_000", "mp_rank_00_001", "mp_rank_01_000", "mp_rank_01_001"]
    ck = torch.load(mdir / "release" / "mp_rank_01_001" / CHECKPOINT_FILE, weights_only=False)
    assert ck["checkpoint_version"] == 3.0
    assert (
        ck["args"].tensor_model_parallel_size == 2 and ck["args"].pipeline_model_parallel_size == 2
    )
    assert ck["args"].num_query_groups == 2 and ck["args"].padded_vocab_size == 256
    shards, args = load_megatron_checkpoint(mdir)  # weights_only=True path
    assert len(shards) == 4 and args.hf_config["vocab_size"] == VOCAB

    out = megatron_to_hf(mdir, tmp_path / "back")
    orig = load_file(str(src / "model.safetensors"))
    again = load_file(str(out / "model.safetensors"))
    assert sorted(orig) == sorted(again)
    for k in orig:
        assert orig[k].dtype == again[k].dtype and torch.equal(orig[k], again[k]), k
    cfg_a = json.loads((src / "config.json").read_text())
    cfg_b = json.loads((out / "config.json").read_text())
    for key in ("vocab_size", "hidden_size", "num_key_value_heads", "head_dim", "rms_norm_eps"):
        assert cfg_a[key] == cfg_b[key]


def test_cli_round_trip(tmp_path):
    import importlib.util

    def load_tool(name):
        path = Path(__file__).resolve().parents[1] / "tools" / f"{name}.py"
        spec = importlib.util.spec_from_file_location(name, path)
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        return mod

    tool = load_tool("convert_hf_megatron")
    src = _saved(tiny_model(seed=1), tmp_path / "hf")
    assert (
        tool.main(["to-megatron", "--hf", str(src), "--out", str(tmp_path / "m"), "--tp", "2"]) == 0
    )
    assert (tmp_path / "m" / "release" / "mp_rank_01" / CHECKPOINT_FILE).exists()
    assert (
        tool.main(["to-hf", "--megatron", str(tmp_path / "m"), "--out", str(tmp_path / "h")]) == 0
    )
    a, b = (
        load_file(str(src / "model.safetensors")),
        load_file(str(tmp_path / "h/model.safetensors")),
    )
    assert all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(SystemExit):  # refuses to overwrite
        tool.main(["to-hf", "--megatron", str(tmp_path / "m"), "--out", str(tmp_path / "h")])


# ----------------------------------------------------------------------------- megatron-core


@pytest.fixture()
def megatron_core(tmp_path, monkeypatch):
    """megatron.core with a 1-process gloo group and model parallel (1, 1); torn down after."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            from megatron.core import parallel_state
        except Exception as err:  # not installed, or cannot import on CPU
            pytest.skip(
                f"megatron-core not importable on this machine ({err!r}); "
                "install the `megatron` extra: pip install 'megatron-core==0.16.*'"
            )
    import torch.distributed as dist

    created = False
    if not dist.is_initialized():
        dist.init_process_group(
            "gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1
        )
        created = True
    parallel_state.initialize_model_parallel(1, 1)
    # Megatron's forward assumes CUDA in two CPU-safe places: the RoPE cache moves inv_freq to
    # torch.cuda.current_device(), and attention dropout forks the CUDA RNG tracker (p = 0 here).
    import megatron.core.tensor_parallel as mtp

    class _NoRngTracker:
        def fork(self, *args, **kwargs):
            return contextlib.nullcontext()

    monkeypatch.setattr(torch.cuda, "current_device", lambda: "cpu")
    monkeypatch.setattr(mtp, "get_cuda_rng_tracker", lambda *a, **k: _NoRngTracker())
    try:
        yield parallel_state
    finally:
        parallel_state.destroy_model_parallel()
        if created:
            dist.destroy_process_group()


def _gpt_model(hf_config, padded_vocab: int):
    import torch.nn.functional as F
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer.transformer_config import TransformerConfig

    cfg = TransformerConfig(
        num_layers=hf_config.num_hidden_layers,
        hidden_size=hf_config.hidden_size,
        ffn_hidden_size=hf_config.intermediate_size,
        num_attention_heads=hf_config.num_attention_heads,
        num_query_groups=hf_config.num_key_value_heads,
        kv_channels=hf_config.head_dim,
        normalization="RMSNorm",
        layernorm_epsilon=hf_config.rms_norm_eps,
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=False,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        use_cpu_initialization=True,
        params_dtype=torch.float32,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return GPTModel(
            config=cfg,
            transformer_layer_spec=get_gpt_layer_local_spec(normalization="RMSNorm"),
            vocab_size=padded_vocab,
            max_sequence_length=hf_config.max_position_embeddings,
            position_embedding_type="rope",
            rotary_base=int(hf_config.rope_parameters["rope_theta"]),
            share_embeddings_and_output_weights=False,
        )


@pytest.mark.filterwarnings("ignore::UserWarning", "ignore::DeprecationWarning")
def test_megatron_core_gptmodel_loads_and_matches_hf(megatron_core, tmp_path):
    model = tiny_model(seed=2)
    src = _saved(model, tmp_path / "hf")
    mdir = hf_to_megatron(src, tmp_path / "mcore", tp=1, pp=1)
    shards, args = load_megatron_checkpoint(mdir)
    assert list(shards) == [(0, 0)]
    gpt = _gpt_model(model.config, args.padded_vocab_size)
    result = gpt.load_state_dict(shards[(0, 0)], strict=False)
    assert result.unexpected_keys == []
    assert [k for k in result.missing_keys if not k.endswith("._extra_state")] == []
    # strict=True once the _extra_state entries (None for local modules) are supplied
    extra = {k: v for k, v in gpt.state_dict().items() if k.endswith("._extra_state")}
    gpt.load_state_dict({**shards[(0, 0)], **extra}, strict=True)
    gpt.eval()

    torch.manual_seed(0)
    B, S = 2, 9
    ids = torch.randint(0, VOCAB, (B, S))
    pos = torch.arange(S).expand(B, -1)
    causal = torch.triu(torch.ones(S, S, dtype=torch.bool), diagonal=1)[None, None]
    with torch.no_grad():
        mc_logits = gpt(input_ids=ids, position_ids=pos, attention_mask=causal)[..., :VOCAB]
        hf_logits = model(input_ids=ids).logits
    assert mc_logits.shape == hf_logits.shape == (B, S, VOCAB)
    torch.testing.assert_close(mc_logits, hf_logits, atol=2e-5, rtol=1e-4)
