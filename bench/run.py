"""Benchmark rlhfstack against TRL on identical models, data and settings; write bench.json.

    .venv/bin/python bench/run.py                      # what `make bench` runs
    .venv/bin/python bench/run.py --sizes tiny --warmup 1 --steps 2 --no-wait   # a smoke run

For each size and algorithm the children run one at a time, alternating ours / TRL, each in its
own process (``bench/ours.py`` in this interpreter, ``bench/trl_side.py`` in the TRL venvs)
under a timeout, with ``--threads`` intra-op threads on both sides. Each child reports the
median seconds per optimizer step after its warm-up steps and its peak RSS
(``getrusage(RUSAGE_SELF).ru_maxrss``). Before measuring, the script waits (up to
``--max-wait`` seconds, polling every 30 s) until the 1-minute load average is below
``--max-load``; the load seen around every child is recorded.

Output: ``runs/bench/bench.json`` with, for each of ``ppo``, ``dpo``, ``rm``, ``grpo`` and each
size, ``ours_s_per_step``, ``trl_s_per_step``, ``ratio`` (ours / TRL), ``ours_peak_rss_mb``,
``trl_peak_rss_mb``; ``generation`` (``ours_tok_s``, ``hf_tok_s``); ``variants`` (ours with the
changes recommended for the stages, same math); raw child results and the environment.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common as C  # noqa: E402

BENCH = Path(__file__).resolve().parent
TRL_PY = {"ppo": C.REPO / ".venv-bench-trl112" / "bin" / "python"}
TRL_PY_DEFAULT = C.REPO / ".venv-bench-trl" / "bin" / "python"
ALGOS = ("rm", "dpo", "grpo", "ppo")

#: ours with other choices of the same math (see rlhfstack/rollout/fast.py)
VARIANTS = {
    "ppo": {
        "separate_scoring_pass": ["--no-logprobs-from-rollout"],
        "separate_value_model": ["--value-model", "separate"],
        "compiled_rollout": ["--compile"],
    },
    "dpo": {"response_only_head": ["--masked-head"], "plain_pass": ["--plain"]},
    "rm": {"plain_pass": ["--plain"]},
    "grpo": {"shared_prompt": ["--shared-prompt"]},
}

#: targets from the issue (ratios ours / TRL; generation: ours / HF at least 2x)
TARGETS = {"ppo": 0.5, "ppo_rss": 0.6, "dpo": 0.6, "rm": 0.9, "grpo": 0.7, "generation": 2.0}


def wait_for_quiet(max_load: float, max_wait: float, poll: float = 30.0) -> dict:
    """Poll the 1-minute load average until it is below ``max_load`` or ``max_wait`` passes."""
    t0 = time.time()
    while True:
        load1 = os.getloadavg()[0]
        waited = time.time() - t0
        if load1 < max_load:
            return {"load1_at_start": load1, "waited_s": round(waited), "quiet": True}
        if waited >= max_wait:
            print(
                f"[bench] load {load1:.2f} still >= {max_load} after {waited:.0f} s: measuring anyway",
                flush=True,
            )
            return {"load1_at_start": load1, "waited_s": round(waited), "quiet": False}
        print(
            f"[bench] load {load1:.2f} >= {max_load}; waiting ({waited:.0f} s so far)", flush=True
        )
        time.sleep(poll)


def run_child(cmd: list[str], out: Path, timeout: int) -> dict:
    """Run one child under a timeout; returns its JSON result (or an error record)."""
    load_before = os.getloadavg()[0]
    t0 = time.time()
    env = {
        **os.environ,
        "TOKENIZERS_PARALLELISM": "false",
        "HF_HUB_OFFLINE": "1",
        "PYTHONHASHSEED": "0",
    }
    env.pop("OMP_NUM_THREADS", None)
    log = out.with_suffix(".log")
    try:
        with open(log, "w") as fh:
            rc = subprocess.run(
                cmd, stdout=fh, stderr=subprocess.STDOUT, timeout=timeout, env=env
            ).returncode
    except subprocess.TimeoutExpired:
        rc = "timeout"
    meta = {
        "cmd": " ".join(cmd[1:]),
        "wall_s": round(time.time() - t0, 1),
        "load1_before": round(load_before, 2),
        "load1_after": round(os.getloadavg()[0], 2),
    }
    if rc != 0 or not out.exists():
        tail = log.read_text()[-1500:] if log.exists() else ""
        print(f"[bench] FAILED ({rc}): {meta['cmd']}\n{tail}", flush=True)
        return {"error": str(rc), "log_tail": tail, **meta}
    res = json.loads(out.read_text())
    res.update(meta)
    print(
        f"[bench] {meta['cmd']}: {res['s_per_step']:.3f} s/step, peak RSS {res['peak_rss_mb']:.0f} MB "
        f"(load {meta['load1_before']} -> {meta['load1_after']})",
        flush=True,
    )
    return res


def _ratio(a: float | None, b: float | None) -> float | None:
    return round(a / b, 3) if a is not None and b else None


def _command(args: list[str]) -> str:
    """The command line that produced the results (``make bench`` passes no options)."""
    cmd = " ".join([".venv/bin/python bench/run.py", *args])
    return f"make bench  (= {cmd})" if not args else cmd


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", default="5m,35m")
    ap.add_argument("--algos", default=",".join(ALGOS))
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--steps", type=int, default=6, help="timed steps after warm-up (>= 5)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--timeout", type=int, default=1200, help="seconds per child")
    ap.add_argument("--max-load", type=float, default=2.5)
    ap.add_argument("--max-wait", type=float, default=1200.0)
    ap.add_argument("--no-wait", action="store_true")
    ap.add_argument("--no-trl", action="store_true", help="ours only (no TRL venvs needed)")
    ap.add_argument("--no-variants", action="store_true")
    ap.add_argument(
        "--gen-rounds",
        type=int,
        default=3,
        help="generation: alternate ours / HF generate this many times (medians over rounds)",
    )
    ap.add_argument(
        "--compiled-rollout",
        action="store_true",
        help="also time ours with rollout.compile=true (generation: ours_compiled_tok_s)",
    )
    ap.add_argument(
        "--trl-no-gc",
        action="store_true",
        help="also time TRL with its default gradient checkpointing turned off",
    )
    ap.add_argument("--out", default=str(C.REPO / "runs" / "bench" / "bench.json"))
    a = ap.parse_args(argv)
    out = Path(a.out)
    work = out.parent / "children"
    work.mkdir(parents=True, exist_ok=True)
    sizes = [s for s in a.sizes.split(",") if s]
    algos = [x for x in a.algos.split(",") if x]
    models = {s: C.build_model_dir(s, C.REPO / "runs" / "bench" / "models" / s) for s in sizes}
    quiet = (
        {"load1_at_start": os.getloadavg()[0], "waited_s": 0, "quiet": None}
        if a.no_wait
        else wait_for_quiet(a.max_load, a.max_wait)
    )
    common = ["--warmup", str(a.warmup), "--steps", str(a.steps), "--threads", str(a.threads)]
    raw: dict = {}
    result: dict = {}

    def child(
        side: str, algo: str, size: str, extra: list[str] | None = None, tag: str = ""
    ) -> dict:
        name = f"{side}-{algo}-{size}{tag}"
        path = work / f"{name}.json"
        path.unlink(missing_ok=True)
        if side == "trl":
            py = TRL_PY.get(algo, TRL_PY_DEFAULT)
            if not py.exists():
                return {"error": f"{py} missing (make bench creates the TRL venvs)"}
            cmd = [str(py), str(BENCH / "trl_side.py")]
        else:
            cmd = [sys.executable, str(BENCH / "ours.py")]
        cmd += [
            "--algo",
            algo,
            "--model-dir",
            str(models[size]),
            *common,
            *(extra or []),
            "--out",
            str(path),
        ]
        raw[name] = run_child(cmd, path, a.timeout)
        return raw[name]

    for size in sizes:
        for algo in algos:
            ours = child("ours", algo, size)
            trl = {} if a.no_trl else child("trl", algo, size)
            trl_nogc = (
                {}
                if a.no_trl or not a.trl_no_gc
                else child("trl", algo, size, ["--no-gradient-checkpointing"], "-nogc")
            )
            o, t = ours.get("s_per_step"), trl.get("s_per_step")
            result.setdefault(algo, {})[size] = {
                "ours_s_per_step": o,
                "trl_s_per_step": t,
                "ratio": _ratio(o, t),
                "ours_peak_rss_mb": ours.get("peak_rss_mb"),
                "trl_peak_rss_mb": trl.get("peak_rss_mb"),
                "rss_ratio": _ratio(ours.get("peak_rss_mb"), trl.get("peak_rss_mb")),
            }
            if trl_nogc:
                result[algo][size]["trl_no_gradient_checkpointing"] = {
                    "trl_s_per_step": trl_nogc.get("s_per_step"),
                    "trl_peak_rss_mb": trl_nogc.get("peak_rss_mb"),
                    "ratio": _ratio(o, trl_nogc.get("s_per_step")),
                    "rss_ratio": _ratio(ours.get("peak_rss_mb"), trl_nogc.get("peak_rss_mb")),
                }
        # generation: ours and HF generate alternate for --gen-rounds rounds (each child its own
        # process, a median over its timed rollouts); the table takes each side's median over
        # the rounds, and every round is kept (speedup_rounds), since a machine's speed can
        # drift by 20-30% within minutes
        rounds_o, rounds_h = [], []
        for r in range(a.gen_rounds):
            tag = f"-r{r}" if a.gen_rounds > 1 else ""
            rounds_o.append(child("ours", "gen", size, None, tag).get("tok_s"))
            rounds_h.append(child("ours", "gen", size, ["--hf"], "-hf" + tag).get("tok_s"))
        ok_o = [x for x in rounds_o if x is not None]
        ok_h = [x for x in rounds_h if x is not None]
        gen_o = {"tok_s": statistics.median(ok_o)} if ok_o else {}
        gen_h = {"tok_s": statistics.median(ok_h)} if ok_h else {}
        result.setdefault("generation", {})[size] = {
            "ours_tok_s": round(gen_o["tok_s"], 1) if "tok_s" in gen_o else None,
            "hf_tok_s": round(gen_h["tok_s"], 1) if "tok_s" in gen_h else None,
            "speedup": _ratio(gen_o.get("tok_s"), gen_h.get("tok_s")),
            "rounds": a.gen_rounds,
            "ours_tok_s_rounds": [None if x is None else round(x, 1) for x in rounds_o],
            "hf_tok_s_rounds": [None if x is None else round(x, 1) for x in rounds_h],
            "speedup_rounds": [_ratio(o, h) for o, h in zip(rounds_o, rounds_h)],
            "batch": C.BATCH,
            "prompt_tokens": C.PROMPT_LEN,
            "new_tokens": C.COMPLETION_LEN,
        }
        if a.compiled_rollout:  # rollout.compile=true (torch.compile of the decode step)
            gen_c = child("ours", "gen", size, ["--compile"], "-compiled")
            result["generation"][size].update(
                ours_compiled_tok_s=round(gen_c["tok_s"], 1) if "tok_s" in gen_c else None,
                compiled_speedup=_ratio(gen_c.get("tok_s"), gen_h.get("tok_s")),
            )
        if not a.no_variants:
            for algo in algos:
                trl_res = result[algo][size]
                for tag, extra in VARIANTS.get(algo, {}).items():
                    r = child("ours", algo, size, extra, "-" + tag)
                    result.setdefault("variants", {}).setdefault(algo, {}).setdefault(size, {})[
                        tag
                    ] = {
                        "ours_s_per_step": r.get("s_per_step"),
                        "ratio": _ratio(r.get("s_per_step"), trl_res["trl_s_per_step"]),
                        "ours_peak_rss_mb": r.get("peak_rss_mb"),
                        "rss_ratio": _ratio(r.get("peak_rss_mb"), trl_res["trl_peak_rss_mb"]),
                    }
    import torch
    import transformers

    result["meta"] = {
        "command": _command(argv or sys.argv[1:]),
        "when": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "machine": {
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            "processor": platform.processor(),
        },
        "threads": a.threads,
        "warmup_steps": a.warmup,
        "timed_steps": a.steps,
        "shape": {
            "batch": C.BATCH,
            "prompt_tokens": C.PROMPT_LEN,
            "completion_tokens": C.COMPLETION_LEN,
            "grpo": f"{C.GRPO_PROMPTS} prompts x {C.GRPO_GENERATIONS} samples",
            "dtype": "float32",
        },
        "models": {
            s: {
                **C.SIZES[s],
                "vocab": C.VOCAB,
                "tied_embeddings": True,
                "params": C.n_params(models[s]),
            }
            for s in sizes
        },
        "versions": {
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "trl": "1.16.0 (rm, dpo, grpo), 1.12.0 (ppo)",
        },
        "load": {**quiet, "load1_at_end": os.getloadavg()[0]},
        "targets": TARGETS,
    }
    result["children"] = raw
    out.write_text(json.dumps(result, indent=2))
    print(f"[bench] wrote {out}", flush=True)
    return result


if __name__ == "__main__":
    main()
