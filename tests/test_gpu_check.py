"""``bench/gpu_check.py`` (``make gpu-check``) at its dry-run sizes on CPU: the FLOP formula and
the peak table by hand, the parts in this process, and the whole command (slow)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "bench"


@pytest.fixture(scope="module")
def gc():
    sys.path.insert(0, str(BENCH))
    import gpu_check

    yield gpu_check
    sys.path.remove(str(BENCH))


def test_flops_formula_and_peak_table_by_hand(gc):
    # 6 N D + 12 n_layers d_model S D = 6*100*16 + 12*2*4*8*16 = 9600 + 12288
    assert gc.model_flops_per_step(100, 2, 4, 8, 16) == 21888.0
    assert gc.peak_bf16_flops("NVIDIA H100 80GB HBM3") == 989e12
    assert gc.peak_bf16_flops("NVIDIA H100 PCIe") == 756e12
    assert gc.peak_bf16_flops("NVIDIA H200") == 989e12
    assert gc.peak_bf16_flops("NVIDIA A100-SXM4-80GB") == 312e12
    assert gc.peak_bf16_flops("Tesla T4") is None
    # the 1B shape is Llama-3.2-1B's: 1,235,814,400 parameters with tied embeddings
    import torch

    with torch.device("meta"):
        from transformers import LlamaConfig, LlamaForCausalLM

        m = LlamaForCausalLM(LlamaConfig(**gc.SHAPES["1b"], tie_word_embeddings=True))
    assert gc._n_params(m) == 1_235_814_400


def test_mfu_and_rollout_parts_run_on_cpu(gc):
    import time

    deadline = time.monotonic() + 60
    m = gc.part_mfu(True, "cpu", deadline)
    assert m["steps_timed"] >= 1 and m["mfu"] is None and m["peak_bf16_tflops"] is None
    assert m["model_flops_per_step"] == gc.model_flops_per_step(
        m["params"], 2, 64, m["seq"], m["batch"] * m["seq"]
    )
    assert m["achieved_tflops"] == pytest.approx(
        m["model_flops_per_step"] / m["step_s_median"] / 1e12
    )
    r = gc.part_rollout(True, "cpu", deadline)
    assert r["ours_tok_s"] > 0 and r["hf_generate_tok_s"] > 0
    assert r["speedup"] == pytest.approx(r["ours_tok_s"] / r["hf_generate_tok_s"])
    q = gc.part_qlora(True, "cpu", deadline)
    assert q["status"] == "skipped" and "CUDA" in q["reason"]
    text = gc.table(
        {
            "device": "cpu",
            "torch": "x",
            "dry_run": True,
            "parts": {"mfu": {**m, "status": "ok"}, "qlora": q},
        }
    )
    assert "MFU n/a" in text and "skipped: QLoRA" in text


def test_without_a_gpu_it_asks_for_the_dry_run():
    import torch

    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present")
    proc = subprocess.run(
        [sys.executable, str(BENCH / "gpu_check.py")], capture_output=True, text=True
    )
    assert proc.returncode == 2 and "--dry-run" in proc.stderr


@pytest.mark.slow
def test_dry_run_command_writes_every_part(data_root, tmp_path):
    out = tmp_path / "gpu_check.json"
    proc = subprocess.run(
        [sys.executable, str(BENCH / "gpu_check.py"), "--dry-run", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads(out.read_text())
    assert res["dry_run"] is True and list(res["parts"]) == ["mfu", "rollout", "ppo", "qlora"]
    p = res["parts"]
    assert p["mfu"]["status"] == "ok" and p["rollout"]["status"] == "ok"
    assert p["ppo"]["status"] == "ok" and p["ppo"]["iterations"] == 2
    last = p["ppo"]["last_metrics"]
    assert last["first_minibatch_ratio"] == pytest.approx(1.0, abs=1e-3)
    assert "mismatch/logp_gap_mean" in last  # the trainer recomputed: the gap is measured
    assert p["qlora"]["status"] == "skipped"
    assert "| mfu |" in proc.stdout and "| ppo |" in proc.stdout
