"""`make gpu-check`: the checks to run the day a GPU is available, in one script.

Four parts, each in its own child process with a wall-clock budget (a part that hangs or runs
out of memory is recorded and the next one runs; the budgets add up to 8 minutes):

* ``mfu``      a training step (forward, loss, backward, AdamW) of a random-initialized Llama of
               the Llama-3.2-1B shape (1.24B parameters; hidden 2048, 16 layers, 32 query / 8 KV
               heads, SwiGLU 8192, vocabulary 128,256, tied embeddings) under bf16 autocast with
               fp32 weights (the one-process path of ``parallel.mixed_precision=bf16``). Model
               FLOPs per step by formula (PaLM, Chowdhery et al. 2022, appendix B; torchtitan
               counts the same): ``6 N D + 12 n_layers d_model S D`` for ``D`` tokens of sequence
               length ``S`` (``N`` = parameters, the tied embedding once: it is the LM head's
               matmul), printed beside the GPU's peak dense bf16 FLOP/s (:data:`PEAK_BF16_FLOPS`).
* ``rollout``  tokens/s of the project's engine (:func:`rlhfstack.rollout.generate.generate`,
               the fast KV-cache loop) against HF ``generate`` on the same model (the 1B shape
               in bf16), batch, prompt length and response length (EOS suppressed on both sides,
               so every row runs to the length budget), alternating rounds, medians.
* ``ppo``      two PPO iterations (:func:`rlhfstack.stages.ppo.train`) in bf16 with LoRA on the
               stories260K model (converted from ``$RLHF_DATA_ROOT/models/stories260K``), against
               a reward model made of the same trunk and a random head, the trainer recomputing
               the old log-probs so that the rollout engine vs trainer gap (``mismatch/*``) is
               measured in bf16.
* ``qlora``    loading a base in bitsandbytes NF4 with LoRA adapters (``model.lora.quantize_4bit``,
               the 1B shape) and one forward / backward; skipped with the reason printed where
               there is no CUDA device or bitsandbytes is not installed.

Results go to ``runs/gpu_check/gpu_check.json`` (the command, the device, every part's numbers
or its error) and a table is printed for ``docs/performance.md``.

``--dry-run`` runs the same parts through the same code at tiny sizes on whatever device there
is (CPU here): bf16 where the CPU runs a bf16 forward and backward, float32 otherwise (the JSON
and the table say which), and it writes ``runs/gpu_check/gpu_check_dry_run.json`` so that it
never overwrites a GPU result. ``tests/test_gpu_check.py`` runs it.

Usage: ``python bench/gpu_check.py [--dry-run] [--parts mfu,rollout,ppo,qlora] [--out PATH]``.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
#: $RLHF_DATA_ROOT, else ../shared/data (the Makefile's default), else ./shared/data
DATA_ROOT = Path(
    os.environ.get("RLHF_DATA_ROOT")
    or next(
        (d for d in (REPO.parent / "shared" / "data", REPO / "shared" / "data") if d.is_dir()),
        REPO.parent / "shared" / "data",
    )
)
STORIES = DATA_ROOT / "models" / "stories260K"

PARTS = ("mfu", "rollout", "ppo", "qlora")
#: wall-clock budget of each part's child process, seconds (8 minutes in all)
BUDGET_S = {"mfu": 120, "rollout": 120, "ppo": 150, "qlora": 90}

#: Llama shapes: ``1b`` is Llama-3.2-1B's; ``tiny`` the dry run's
SHAPES: dict[str, dict[str, int]] = {
    "1b": dict(
        vocab_size=128256,
        hidden_size=2048,
        intermediate_size=8192,
        num_hidden_layers=16,
        num_attention_heads=32,
        num_key_value_heads=8,
    ),
    "tiny": dict(
        vocab_size=512,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
    ),
}
PAD_ID, BOS_ID, EOS_ID = 0, 1, 2

#: sizes of each part: (GPU, dry run)
SIZES = {
    "mfu": {"gpu": dict(batch=4, seq=2048, steps=10), "dry": dict(batch=2, seq=32, steps=2)},
    "rollout": {
        "gpu": dict(batch=32, prompt=128, new=128, rounds=3),
        "dry": dict(batch=2, prompt=8, new=8, rounds=1),
    },
    "ppo": {
        "gpu": dict(batch=64, micro=32, new=64, prompts=256),
        "dry": dict(batch=4, micro=4, new=4, prompts=8),
    },
}

#: peak dense (no sparsity) bf16 tensor-core FLOP/s by device name, first match wins (NVIDIA
#: data sheets); anything else prints n/a
PEAK_BF16_FLOPS: tuple[tuple[str, float], ...] = (
    ("H100 PCIe", 756e12),
    ("H100 NVL", 835e12),
    ("H100", 989e12),  # SXM ("NVIDIA H100 80GB HBM3")
    ("H200", 989e12),
    ("A100", 312e12),
)


def peak_bf16_flops(device_name: str) -> float | None:
    """The peak dense bf16 FLOP/s of a device named ``device_name``, or None if unknown."""
    for key, flops in PEAK_BF16_FLOPS:
        if key in device_name:
            return flops
    return None


def model_flops_per_step(
    n_params: int, n_layers: int, d_model: int, seq: int, tokens: int
) -> float:
    """Training FLOPs of one step over ``tokens`` tokens of length-``seq`` sequences: ``6 N``
    per token for the matmuls with the weights (forward 2N, backward 4N) plus ``12 n_layers
    d_model seq`` for the attention scores and their weighted sums (forward and backward, the
    full S x S matrix as PaLM counts it)."""
    return 6.0 * n_params * tokens + 12.0 * n_layers * d_model * seq * tokens


# ----------------------------------------------------------------------------- helpers


def _device():
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def _device_name(device: str) -> str:
    import torch

    if device == "cuda":
        return torch.cuda.get_device_name()
    return f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"


def _bf16_works(device: str) -> bool:
    """True where a bf16 linear layer runs forward and backward on ``device``."""
    import torch

    try:
        lin = torch.nn.Linear(8, 8).to(device=device, dtype=torch.bfloat16)
        lin(torch.randn(2, 8, device=device, dtype=torch.bfloat16)).sum().backward()
        return lin.weight.grad is not None and lin.weight.grad.dtype == torch.bfloat16
    except (RuntimeError, TypeError):
        return False


def _sync(device: str) -> None:
    import torch

    if device == "cuda":
        torch.cuda.synchronize()


def _peak_mem_gb(device: str) -> float | None:
    import torch

    return torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else None


def _random_llama(shape: str, device: str, dtype, max_positions: int):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(
        **SHAPES[shape],
        max_position_embeddings=max_positions,
        tie_word_embeddings=True,
        bos_token_id=BOS_ID,
        eos_token_id=EOS_ID,
        pad_token_id=PAD_ID,
    )
    with torch.device(device):  # initialized where it runs (a 1B init on CPU takes a while)
        return LlamaForCausalLM(cfg).to(dtype=dtype)


def _n_params(model) -> int:
    return sum(p.numel() for p in model.parameters())  # parameters() lists a tied weight once


# ----------------------------------------------------------------------------- parts


def part_mfu(dry: bool, device: str, deadline: float) -> dict[str, Any]:
    """:func:`_mfu` at the part's batch, halved on each out-of-memory error."""
    import torch

    size = dict(SIZES["mfu"]["dry" if dry else "gpu"])
    while True:
        try:
            return _mfu(dry, device, deadline, size)
        except torch.cuda.OutOfMemoryError:
            if size["batch"] == 1:
                raise
        # outside the handler: the failed attempt's frames (and tensors) are released by now
        size["batch"] //= 2
        torch.cuda.empty_cache()


def _mfu(dry: bool, device: str, deadline: float, size: dict[str, int]) -> dict[str, Any]:
    import torch

    shape = "tiny" if dry else "1b"
    bf16 = _bf16_works(device)
    model = _random_llama(shape, device, torch.float32, size["seq"])
    model.train()
    n = _n_params(model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=device == "cuda")
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, SHAPES[shape]["vocab_size"], (size["batch"], size["seq"]), generator=g)
    ids = ids.to(device)

    def step() -> float:
        with torch.autocast(device_type=device, dtype=torch.bfloat16, enabled=bf16):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return float(loss.detach())

    loss = step()  # warm-up: allocations, kernels' autotuning
    _sync(device)
    times = []
    while len(times) < size["steps"] and (not times or time.monotonic() + times[-1] < deadline):
        t0 = time.perf_counter()
        loss = step()
        _sync(device)
        times.append(time.perf_counter() - t0)
    cfg = model.config
    tokens = size["batch"] * size["seq"]
    flops = model_flops_per_step(n, cfg.num_hidden_layers, cfg.hidden_size, size["seq"], tokens)
    step_s = statistics.median(times)
    achieved = flops / step_s
    peak = peak_bf16_flops(_device_name(device)) if device == "cuda" else None
    return {
        "shape": shape,
        "params": n,
        "precision": "bf16 autocast, fp32 weights" if bf16 else "float32 (no bf16 on this device)",
        "batch": size["batch"],
        "seq": size["seq"],
        "steps_timed": len(times),
        "step_s_median": step_s,
        "model_flops_per_step": flops,
        "achieved_tflops": achieved / 1e12,
        "peak_bf16_tflops": peak / 1e12 if peak else None,
        "mfu": achieved / peak if peak else None,
        "last_loss": loss,
        "peak_memory_gb": _peak_mem_gb(device),
    }


def part_rollout(dry: bool, device: str, deadline: float) -> dict[str, Any]:
    import torch

    from rlhfstack.rollout.generate import generate

    size = SIZES["rollout"]["dry" if dry else "gpu"]
    shape = "tiny" if dry else "1b"
    bf16 = _bf16_works(device)
    dtype = torch.bfloat16 if bf16 else torch.float32
    B, P, N = size["batch"], size["prompt"], size["new"]
    model = _random_llama(shape, device, dtype, P + N)
    model.eval()
    g = torch.Generator().manual_seed(0)
    prompts = torch.randint(3, SHAPES[shape]["vocab_size"], (B, P), generator=g).to(device)
    mask = torch.ones_like(prompts)
    sampler = torch.Generator().manual_seed(0)  # a CPU generator, as PPO's

    def ours() -> int:
        gen = generate(
            model,
            prompts,
            mask,
            max_new_tokens=N,
            eos_id=EOS_ID,
            pad_id=PAD_ID,
            generator=sampler,
            stop_ids=(),
            suppress_ids=(PAD_ID, EOS_ID),
        )
        return int(gen.response_ids_BR.numel())

    def hf() -> int:
        with torch.no_grad():
            out = model.generate(
                prompts,
                attention_mask=mask,
                do_sample=True,
                top_k=0,
                top_p=1.0,
                temperature=1.0,
                max_new_tokens=N,
                min_new_tokens=N,
                pad_token_id=PAD_ID,
            )
        return int(out[:, P:].numel())

    def timed(fn) -> tuple[float, int]:
        _sync(device)
        t0 = time.perf_counter()
        n = fn()
        _sync(device)
        return time.perf_counter() - t0, n

    timed(ours), timed(hf)  # warm-up
    rounds: list[dict[str, float]] = []
    while len(rounds) < size["rounds"]:
        (t_ours, n_ours), (t_hf, n_hf) = timed(ours), timed(hf)
        rounds.append({"ours_tok_s": n_ours / t_ours, "hf_tok_s": n_hf / t_hf})
        if time.monotonic() + 2 * (t_ours + t_hf) > deadline:
            break
    ours_med = statistics.median(r["ours_tok_s"] for r in rounds)
    hf_med = statistics.median(r["hf_tok_s"] for r in rounds)
    return {
        "shape": shape,
        "precision": "bf16" if bf16 else "float32 (no bf16 on this device)",
        "batch": B,
        "prompt_tokens": P,
        "new_tokens": N,
        "rounds": rounds,
        "ours_tok_s": ours_med,
        "hf_generate_tok_s": hf_med,
        "speedup": ours_med / hf_med,
        "peak_memory_gb": _peak_mem_gb(device),
    }


def _stories_prompts(n: int) -> list[dict[str, str]]:
    names = ["Tom", "Lily", "Ben", "Sue", "Max", "Mia", "Sam", "Anna"]
    things = ["a red ball", "a big dog", "a small cat", "a cake", "a tree", "a boat"]
    return [
        {"prompt": f"Once upon a time, {names[i % 8]} saw {things[(i * 5) % 6]}. Then"}
        for i in range(n)
    ]


def part_ppo(dry: bool, device: str, deadline: float) -> dict[str, Any]:
    from rlhfstack.configs import load_config, to_object
    from rlhfstack.models.core import RewardModel, load_causal_lm, load_tokenizer
    from rlhfstack.models.llama2c import convert
    from rlhfstack.runtime import read_jsonl
    from rlhfstack.stages.ppo import train

    if not (STORIES / "stories260K.bin").exists():
        return {"status": "skipped", "reason": f"{STORIES}/stories260K.bin not found"}
    size = SIZES["ppo"]["dry" if dry else "gpu"]
    bf16 = _bf16_works(device)
    work = Path(tempfile.mkdtemp(prefix="gpu_check_ppo_"))
    policy = convert(STORIES / "stories260K.bin", STORIES / "tok512.bin", work / "stories_hf")
    rm = RewardModel(load_causal_lm(str(policy)), kind="causal_lm")  # a random scalar head
    rm.save(work / "rm")
    load_tokenizer(str(policy)).save_pretrained(work / "rm")
    prompts = work / "prompts.jsonl"
    prompts.write_text("".join(json.dumps(r) + "\n" for r in _stories_prompts(size["prompts"])))
    overrides = [
        f"artifacts_dir={work}",
        f"run_dir={work / 'ppo'}",
        f"model.path={policy}",
        f"reward_model_path={work / 'rm'}",
        f"data.train_path={prompts}",
        f"data.eval_path={prompts}",
        f"model.dtype={'bfloat16' if bf16 else 'float32'}",
        "model.lora.enabled=true",
        "model.lora.r=8",
        f"cluster.device={device}",
        "trainer.max_steps=2",
        f"trainer.batch_size={size['batch']}",
        f"trainer.micro_batch_size={size['micro']}",
        "ppo.num_minibatches=2",
        "ppo.epochs=1",
        f"rollout.max_new_tokens={size['new']}",
        "gold_eval_every=0",
        "ppo.logprobs_from_rollout=false",  # the trainer recomputes: mismatch/* is measured
    ]
    cfg = to_object(load_config("ppo", overrides))
    t0 = time.perf_counter()
    run_dir = train(cfg)
    wall = time.perf_counter() - t0
    rows = read_jsonl(run_dir / "metrics.jsonl")
    keep = ("loss", "first_minibatch_ratio", "first_minibatch_approx_kl", "reward/rm_score")
    keep += ("kl/seq_k1", "tokens", "time/step_s")
    last = {k: v for k, v in rows[-1].items() if k in keep or k.startswith("mismatch/")}
    return {
        "precision": "bf16 weights, LoRA r=8" if bf16 else "float32 (no bf16), LoRA r=8",
        "batch": size["batch"],
        "new_tokens": size["new"],
        "iterations": len(rows),
        "wall_s": wall,
        "last_metrics": last,
        "peak_memory_gb": _peak_mem_gb(device),
    }


def part_qlora(dry: bool, device: str, deadline: float) -> dict[str, Any]:
    import importlib.util

    import torch

    from rlhfstack.configs import LoraConfig
    from rlhfstack.models.core import load_causal_lm

    if device != "cuda":
        return {"status": "skipped", "reason": "QLoRA (bitsandbytes NF4) needs a CUDA device"}
    if importlib.util.find_spec("bitsandbytes") is None:
        return {"status": "skipped", "reason": "bitsandbytes is not installed"}
    shape = "tiny" if dry else "1b"
    work = Path(tempfile.mkdtemp(prefix="gpu_check_qlora_"))
    base = _random_llama(shape, device, torch.bfloat16, 512)  # initialized on the GPU: faster
    base.save_pretrained(work / "base")
    del base
    gc.collect()
    torch.cuda.empty_cache()
    lora = LoraConfig(enabled=True, quantize_4bit=True, r=16, alpha=32.0)  # all 7 projections
    torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    model = load_causal_lm(str(work / "base"), dtype="bfloat16", lora=lora, device=device)
    load_s = time.perf_counter() - t0
    loaded_gb = torch.cuda.memory_allocated() / 2**30
    ids = torch.randint(3, SHAPES[shape]["vocab_size"], (2, 128), device=device)
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    grads = [p.grad for n, p in model.named_parameters() if "lora_" in n and p.requires_grad]
    n_4bit = sum(1 for m in model.modules() if type(m).__name__ == "Linear4bit")
    return {
        "shape": shape,
        "load_s": load_s,
        "memory_after_load_gb": loaded_gb,
        "linear4bit_modules": n_4bit,
        "loss": float(loss.detach()),
        "lora_grads_finite": bool(grads)
        and all(bool(torch.isfinite(g).all()) for g in grads if g is not None),
        "peak_memory_gb": _peak_mem_gb(device),
    }


PART_FNS = {"mfu": part_mfu, "rollout": part_rollout, "ppo": part_ppo, "qlora": part_qlora}


# ----------------------------------------------------------------------------- driver


def _child(part: str, dry: bool, out: Path) -> int:
    """Run one part in this process and write its result to ``out``."""
    device = _device()
    deadline = time.monotonic() + 0.8 * BUDGET_S[part]  # leave room to write the result
    t0 = time.perf_counter()
    res = PART_FNS[part](dry, device, deadline)
    res.setdefault("status", "ok")
    res["seconds"] = time.perf_counter() - t0
    out.write_text(json.dumps(res, indent=1))
    return 0


def run_part(part: str, dry: bool, budget_s: float) -> dict[str, Any]:
    """One part in a child process under a wall-clock budget."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / f"{part}.json"
        cmd = [
            sys.executable,
            str(Path(__file__).resolve()),
            "--child",
            part,
            "--child-out",
            str(out),
        ]
        cmd += ["--dry-run"] if dry else []
        t0 = time.perf_counter()
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=budget_s)
        except subprocess.TimeoutExpired:
            return {"status": "timeout", "reason": f"stopped after its budget of {budget_s:.0f} s"}
        if proc.returncode != 0 or not out.exists():
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-15:]
            return {
                "status": "error",
                "returncode": proc.returncode,
                "seconds": time.perf_counter() - t0,
                "stderr_tail": tail,
            }
        return json.loads(out.read_text())


def _fmt(v: Any, spec: str = ".3g") -> str:
    return "n/a" if v is None else format(v, spec)


def table(result: dict[str, Any]) -> str:
    """The Markdown table of a result (for docs/performance.md)."""
    p = result["parts"]
    lines = [
        f"device: {result['device']} (torch {result['torch']}, dry run: {result['dry_run']})",
        "",
        "| part | result | precision | seconds |",
        "|---|---|---|---|",
    ]

    def row(name: str, text: str) -> None:
        r = p.get(name)
        if r is None:
            return
        if r.get("status") != "ok":
            text = (
                f"{r.get('status')}: {r.get('reason') or ' / '.join(r.get('stderr_tail', [])[-2:])}"
            )
        lines.append(
            f"| {name} | {text} | {r.get('precision', '')} | {_fmt(r.get('seconds'), '.0f')} |"
        )

    m = p.get("mfu", {})
    row(
        "mfu",
        f"{m.get('shape')} ({_fmt(m.get('params'), '.3g')} params), batch {m.get('batch')} x "
        f"{m.get('seq')}: {_fmt(m.get('step_s_median'))} s/step, "
        f"{_fmt(m.get('achieved_tflops'))} TFLOP/s of peak {_fmt(m.get('peak_bf16_tflops'))}, "
        f"MFU {_fmt(m.get('mfu'), '.1%') if m.get('mfu') is not None else 'n/a'}",
    )
    r = p.get("rollout", {})
    row(
        "rollout",
        f"batch {r.get('batch')}, {r.get('prompt_tokens')} + {r.get('new_tokens')} tokens: ours "
        f"{_fmt(r.get('ours_tok_s'), '.0f')} tok/s, HF generate {_fmt(r.get('hf_generate_tok_s'), '.0f')} "
        f"tok/s ({_fmt(r.get('speedup'), '.2f')}x)",
    )
    q = p.get("ppo", {})
    lm = q.get("last_metrics", {})
    row(
        "ppo",
        f"{q.get('iterations')} iterations of batch {q.get('batch')} in {_fmt(q.get('wall_s'), '.1f')} s; "
        f"first ratio {_fmt(lm.get('first_minibatch_ratio'), '.6f')}, mismatch/logp_gap_mean "
        f"{_fmt(lm.get('mismatch/logp_gap_mean'))}, max {_fmt(lm.get('mismatch/logp_gap_max'))}",
    )
    k = p.get("qlora", {})
    row(
        "qlora",
        f"{k.get('shape')}: loaded in {_fmt(k.get('load_s'), '.1f')} s, "
        f"{_fmt(k.get('memory_after_load_gb'), '.2f')} GB, {k.get('linear4bit_modules')} Linear4bit, "
        f"LoRA grads finite {k.get('lora_grads_finite')}",
    )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any] | int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dry-run", action="store_true", help="tiny sizes on any device (CPU: CI)")
    ap.add_argument(
        "--parts", default=",".join(PARTS), help="comma-separated subset of " + ",".join(PARTS)
    )
    ap.add_argument(
        "--out", default=None, help="result JSON (default runs/gpu_check/gpu_check[_dry_run].json)"
    )
    ap.add_argument("--child", choices=PARTS, help=argparse.SUPPRESS)
    ap.add_argument("--child-out", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.child:
        return _child(a.child, a.dry_run, Path(a.child_out))
    import torch

    device = _device()
    if device != "cuda" and not a.dry_run:
        print(
            "gpu_check: no CUDA device; run with --dry-run for the tiny CPU version",
            file=sys.stderr,
        )
        return 2
    parts = [p for p in a.parts.split(",") if p]
    unknown = set(parts) - set(PARTS)
    if unknown:
        ap.error(f"unknown parts {sorted(unknown)} (choose from {', '.join(PARTS)})")
    out = Path(
        a.out
        or REPO
        / "runs"
        / "gpu_check"
        / ("gpu_check_dry_run.json" if a.dry_run else "gpu_check.json")
    )
    result: dict[str, Any] = {
        "command": " ".join([Path(sys.executable).name, *sys.argv])
        if argv is None
        else f"gpu_check.py {' '.join(argv)}",
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "device": _device_name(device),
        "torch": torch.__version__,
        "dry_run": a.dry_run,
        "budget_s": {p: BUDGET_S[p] for p in parts},
        "parts": {},
    }
    t0 = time.perf_counter()
    for part in parts:
        print(f"gpu_check: {part} (budget {BUDGET_S[part]} s) ...", flush=True)
        result["parts"][part] = run_part(part, a.dry_run, BUDGET_S[part])
        print(f"gpu_check: {part}: {result['parts'][part].get('status')}", flush=True)
    result["total_s"] = time.perf_counter() - t0
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    print(table(result))
    print(f"gpu_check: wrote {out}")
    return result


if __name__ == "__main__":
    res = main()
    sys.exit(res if isinstance(res, int) else 0)
