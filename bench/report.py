"""Print the Performance tables of docs/performance.md (markdown) from a ``bench.json``:

.venv/bin/python bench/report.py runs/bench/bench.json
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

ALGOS = ("ppo", "dpo", "rm", "grpo")


def _f(x: float | None, nd: int = 2) -> str:
    return "—" if x is None else f"{x:.{nd}f}"


def _met(value: float | None, target: float, higher_is_better: bool = False) -> str:
    if value is None:
        return "not measured"
    ok = value >= target if higher_is_better else value <= target
    return "met" if ok else "**missed**"


def render(bench: dict) -> str:
    targets = bench["meta"]["targets"]
    sizes = [s for s in ("5m", "35m") if any(s in bench.get(a, {}) for a in ALGOS)]
    lines = []
    for size in sizes:
        params = bench["meta"]["models"][size]["params"] / 1e6
        lines += [
            f"**{size}** ({params:.1f}M parameters):",
            "",
            "| algorithm | ours s/step | TRL s/step | ratio | target | peak RSS MB ours / TRL |",
            "|---|---|---|---|---|---|",
        ]
        for algo in ALGOS:
            r = bench.get(algo, {}).get(size)
            if r is None:
                continue
            t = targets[algo]
            target = f"≤ {t}: {_met(r['ratio'], t)}"
            if algo == "ppo":
                target += (
                    f"; RSS ≤ {targets['ppo_rss']}: {_met(r['rss_ratio'], targets['ppo_rss'])}"
                )
                target += f" ({_f(r['rss_ratio'])})"
            rss = f"{_f(r['ours_peak_rss_mb'], 0)} / {_f(r['trl_peak_rss_mb'], 0)}"
            lines.append(
                f"| {algo} | {_f(r['ours_s_per_step'])} | {_f(r['trl_s_per_step'])} | "
                f"{_f(r['ratio'])} | {target} | {rss} |"
            )
        g = bench.get("generation", {}).get(size)
        if g is not None:
            t = targets["generation"]
            lines.append(
                f"| rollout tokens/s | {_f(g['ours_tok_s'], 0)} | HF generate {_f(g['hf_tok_s'], 0)} "
                f"| {_f(g['speedup'])}x | ≥ {t}x: {_met(g['speedup'], t, True)} | |"
            )
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    path = Path(argv[0] if argv else "runs/bench/bench.json")
    bench = json.loads(path.read_text())
    m = bench["meta"]
    print(
        f"Measured with `{m['command']}` at {m['when']} (1-minute load {m['load']['load1_at_start']:.2f} at start):\n"
    )
    print(render(bench))


if __name__ == "__main__":
    main()
