"""tools/export_hf.py (LoRA merge + dtype cast) and tools/ckpt_to_hf.py (training ckpt -> HF)."""

from __future__ import annotations

import copy
import importlib.util
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from rlhfstack.models.convert import ckpt_to_hf, export_hf, find_checkpoint

pytestmark = pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing.*:FutureWarning")

REPO_ROOT = Path(__file__).resolve().parents[1]
VOCAB = 100
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _tool(name: str):
    spec = importlib.util.spec_from_file_location(name, REPO_ROOT / "tools" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _save_tokenizer(path: Path) -> None:
    """A word-level tokenizer over the tiny vocabulary (dedicated PAD, distinct from EOS)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3}
    vocab.update({f"w{i}": 4 + i for i in range(VOCAB - 4)})
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="<pad>",
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
    ).save_pretrained(path)


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
    path = tmp_path_factory.mktemp("base") / "model"
    LlamaForCausalLM(cfg).save_pretrained(path)
    _save_tokenizer(path)
    return path


def _lora_model(base: Path, seed: int = 1, r: int = 4, alpha: float = 8.0):
    """The base with a random (non-zero B) LoRA adapter, as after some training."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    cfg = LoraConfig(
        r=r, lora_alpha=alpha, target_modules=TARGETS, lora_dropout=0.0, init_lora_weights=False
    )
    return get_peft_model(model, cfg).eval()


def _ids() -> torch.Tensor:
    torch.manual_seed(3)
    return torch.randint(4, VOCAB, (2, 11))


def _logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits.float()


# ----------------------------------------------------------------------------- export_hf


def test_export_merges_lora_fp32_exact(base_dir, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    peft_model = _lora_model(base_dir)
    adapter = tmp_path / "adapter"
    peft_model.save_pretrained(adapter)
    out = export_hf(base_dir, tmp_path / "out", lora_adapter=adapter, dtype="float32")
    assert (out / "model.safetensors").exists() and (out / "config.json").exists()
    assert not (out / "adapter_config.json").exists()
    assert AutoTokenizer.from_pretrained(out).pad_token == "<pad>"
    merged = AutoModelForCausalLM.from_pretrained(out).eval()
    # weights: exactly peft's own merge
    reference = _lora_model(base_dir).merge_and_unload().state_dict()
    got = load_file(str(out / "model.safetensors"))
    for k, v in got.items():
        assert torch.equal(v, reference[k]), k
    ids = _ids()
    torch.testing.assert_close(_logits(merged, ids), _logits(peft_model, ids), atol=1e-5, rtol=1e-5)


def test_export_bf16_cli_and_adapter_dir(base_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    peft_model = _lora_model(base_dir, seed=5)
    adapter = tmp_path / "adapter"
    peft_model.save_pretrained(adapter)  # adapter_config.json records the base path
    tool = _tool("export_hf")
    # --model pointing at the adapter directory: its base is read from adapter_config.json
    assert tool.main(["--model", str(adapter), "--out", str(tmp_path / "bf16")]) == 0
    out = tmp_path / "bf16"
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    assert all(
        t.dtype == torch.bfloat16 for t in load_file(str(out / "model.safetensors")).values()
    )
    merged = AutoModelForCausalLM.from_pretrained(out).eval()
    assert merged.dtype == torch.bfloat16
    ids = _ids()
    ref = _logits(peft_model, ids)
    got = _logits(merged, ids)
    # bf16 has an 8-bit mantissa: relative error ~ 2^-8 per op
    torch.testing.assert_close(got, ref, atol=3e-2 * ref.abs().max().item(), rtol=3e-2)
    assert (got.argmax(-1) == ref.argmax(-1)).float().mean() > 0.9
    with pytest.raises(SystemExit):
        tool.main(["--model", str(adapter), "--out", str(out)])  # no silent overwrite


def test_export_without_adapter_casts(base_dir, tmp_path):
    out = export_hf(base_dir, tmp_path / "o", dtype="float16")
    sd = load_file(str(out / "model.safetensors"))
    base = load_file(str(base_dir / "model.safetensors"))
    assert all(sd[k].dtype == torch.float16 and torch.equal(sd[k], base[k].half()) for k in base)
    with pytest.raises(ValueError, match="dtype"):
        export_hf(base_dir, tmp_path / "bad", dtype="int8")


# ----------------------------------------------------------------------------- ckpt_to_hf


def _write_ckpt(run_dir: Path, step: int, policy: torch.nn.Module) -> Path:
    """A checkpoint as rlhfstack.stages.ppo writes it: {policy, value} through distributed.save_checkpoint."""
    from rlhfstack import distributed

    trained = torch.nn.ModuleDict({"policy": policy, "value": torch.nn.Linear(32, 1)})
    opt = torch.optim.AdamW([p for p in trained.parameters() if p.requires_grad], lr=1e-3)
    path = distributed.checkpoint_path(run_dir, step)
    distributed.save_checkpoint(path, trained, opt, {"step": step, "order": [0, 1]})
    return path


def test_ckpt_to_hf_full_policy(base_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(7)
    policy = AutoModelForCausalLM.from_pretrained(base_dir)
    with torch.no_grad():
        for p in policy.parameters():
            p.add_(0.01 * torch.randn_like(p))  # "trained"
    run = tmp_path / "ppo"
    zeroed = copy.deepcopy(policy)
    with torch.no_grad():
        for p in zeroed.parameters():
            p.zero_()
    _write_ckpt(run, 1, zeroed)
    _write_ckpt(run, 2, policy)
    assert find_checkpoint(run).name == "ckpt-000002"  # run dir -> newest checkpoint
    tool = _tool("ckpt_to_hf")
    out = tmp_path / "hf"
    assert tool.main(["--ckpt", str(run), "--base", str(base_dir), "--out", str(out)]) == 0
    got = load_file(str(out / "model.safetensors"))
    want = policy.state_dict()
    assert all(torch.equal(got[k], want[k]) for k in got)
    assert (out / "tokenizer.json").exists()
    ids = _ids()
    torch.testing.assert_close(
        _logits(AutoModelForCausalLM.from_pretrained(out), ids), _logits(policy.eval(), ids)
    )


def test_ckpt_to_hf_lora_policy(base_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    peft_model = _lora_model(base_dir, seed=9, r=4, alpha=12.0)
    run = tmp_path / "ppo_lora"
    ck = _write_ckpt(run, 3, peft_model)  # frozen base weights are not saved: LoRA only
    with pytest.raises(ValueError, match="alpha"):  # no config.yaml beside it yet
        ckpt_to_hf(ck, base_dir, tmp_path / "x")
    (run / "config.yaml").write_text(
        "model:\n  lora:\n    enabled: true\n    r: 4\n    alpha: 12.0\n"
    )
    out = ckpt_to_hf(ck, base_dir, tmp_path / "hf")
    merged = AutoModelForCausalLM.from_pretrained(out).eval()
    ids = _ids()
    torch.testing.assert_close(_logits(merged, ids), _logits(peft_model, ids), atol=1e-5, rtol=1e-5)
    # a wrong alpha gives a different model: the alpha is really used
    wrong = ckpt_to_hf(ck, base_dir, tmp_path / "hf2", lora_alpha=4.0)
    assert not torch.allclose(
        _logits(AutoModelForCausalLM.from_pretrained(wrong), ids), _logits(peft_model, ids)
    )


def test_ckpt_to_hf_rejects_mismatched_policy(base_dir, tmp_path):
    run = tmp_path / "bad"
    ck = _write_ckpt(run, 1, torch.nn.Linear(VOCAB, 32))
    with pytest.raises(KeyError, match="does not fit"):
        ckpt_to_hf(ck, base_dir, tmp_path / "o")
    with pytest.raises(FileNotFoundError):
        find_checkpoint(tmp_path / "nowhere")


def test_export_writes_a_card_with_relative_paths(base_dir, tmp_path):
    out = export_hf(base_dir, tmp_path / "exp" / "o", dtype="float32")
    card = (out / "README.md").read_text()
    assert card.startswith("---\n") and 'library_name: "transformers"' in card
    assert str(tmp_path) not in card and "## Export" in card
    assert "../../" in card  # the source, relative to the export
