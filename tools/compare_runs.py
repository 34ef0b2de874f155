"""Compare the ``metrics.jsonl`` of two runs iteration by iteration (timings aside).

    python tools/compare_runs.py runs/one runs/tp2 [--rel 1e-4 --abs 1e-5]

For every step both runs logged, prints ``equal`` (every number bit for bit) or the largest
absolute and relative differences and the keys they sit in; then whether the last lines match
to the tolerance. Exit status 0 when they do, 1 when they do not, 2 on unreadable input. This is
how a parallel layout is checked against one process (docs/scaling.md).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

TIMING = ("time", "wall_seconds")
"""Keys that measure the machine, not the run."""


def read_rows(run: Path) -> list[dict]:
    """The rows of ``run/metrics.jsonl`` (or of ``run`` itself when it is a file) that carry a step."""
    path = run / "metrics.jsonl" if run.is_dir() else run
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no metrics.jsonl")
    rows = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{n}: not JSON ({e.msg})") from None
        if isinstance(row, dict) and "step" in row:
            rows.append(row)
    return rows


def _pairs(a: dict, b: dict):
    """``(key, x, y)`` for the keys both rows hold, timings and the step aside."""
    for k in sorted(set(a) & set(b)):
        if k not in TIMING and k != "step":
            yield k, a[k], b[k]


def _gap(x: object, y: object) -> tuple[float, float]:
    """Absolute and relative difference of two logged values (non-numbers: 0 or infinite)."""
    num = (int, float)
    if isinstance(x, num) and isinstance(y, num) and not isinstance(x, bool):
        if x == y or (math.isnan(x) and math.isnan(y)):
            return 0.0, 0.0
        d = abs(float(x) - float(y))
        return d, d / max(abs(float(x)), abs(float(y)))
    return (0.0, 0.0) if x == y else (math.inf, math.inf)


def row_diff(a: dict, b: dict) -> dict:
    """Largest absolute / relative difference between two rows (with its key), and the keys that
    only one row holds."""
    worst_abs, worst_rel = (0.0, ""), (0.0, "")
    for k, x, y in _pairs(a, b):
        d, r = _gap(x, y)
        worst_abs, worst_rel = max(worst_abs, (d, k)), max(worst_rel, (r, k))
    only = sorted((set(a) ^ set(b)) - set(TIMING))
    return {"abs": worst_abs, "rel": worst_rel, "only": only}


def rows_match(a: dict, b: dict, rel: float, abs_: float) -> bool:
    """Every value within ``abs_ + rel * max(|x|, |y|)`` and the same keys (timings aside)."""
    if (set(a) ^ set(b)) - set(TIMING):
        return False
    for _, x, y in _pairs(a, b):
        d, _ = _gap(x, y)
        if d and not d <= abs_ + rel * max(abs(float(x)), abs(float(y))):
            return False
    return True


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("a", type=Path, help="a run directory (or its metrics.jsonl)")
    ap.add_argument("b", type=Path, help="the run to compare with it")
    ap.add_argument("--rel", type=float, default=0.0, help="relative tolerance (default: exact)")
    ap.add_argument("--abs", type=float, default=0.0, help="absolute tolerance (default: exact)")
    args = ap.parse_args(argv)
    try:
        ra, rb = read_rows(args.a), read_rows(args.b)
    except (OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    by_step = {r["step"]: r for r in rb}
    common = [r for r in ra if r["step"] in by_step]
    if not common:
        print(f"error: {args.a} and {args.b} share no logged step", file=sys.stderr)
        return 2
    for r in common:
        d = row_diff(r, by_step[r["step"]])
        if d["abs"][0] == 0.0 and not d["only"]:
            print(f"step {r['step']}: equal")
            continue
        extra = f", keys on one side only: {', '.join(d['only'])}" if d["only"] else ""
        print(
            f"step {r['step']}: max |diff| {d['abs'][0]:.3g} ({d['abs'][1]}), "
            f"max rel {d['rel'][0]:.3g} ({d['rel'][1]}){extra}"
        )
    last_a, last_b = ra[-1], rb[-1]
    if last_a["step"] != last_b["step"]:
        print(f"last lines: steps {last_a['step']} and {last_b['step']} differ")
        return 1
    ok = rows_match(last_a, last_b, args.rel, args.abs)
    tol = "exactly" if args.rel == args.abs == 0 else f"to rel {args.rel:g} / abs {args.abs:g}"
    print(f"last lines (step {last_a['step']}): {'match' if ok else 'do not match'} {tol}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
