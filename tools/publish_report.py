"""Copy a pipeline run's EVAL_REPORT.md to the repository root, with its plots under docs/.

python tools/publish_report.py --artifacts runs/demo --out EVAL_REPORT.md
"""

import argparse
from pathlib import Path

from rlhfstack.evaluation.report import publish_report


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--artifacts", default="runs/demo")
    ap.add_argument("--out", default="EVAL_REPORT.md")
    ap.add_argument("--assets", default="docs/eval_report")
    ap.add_argument(
        "--rlaif",
        default="runs/demo_rlaif/results.json",
        help="results of +experiment=demo_rlaif: adds the RLHF vs RLAIF section when it exists",
    )
    a = ap.parse_args()
    publish_report(Path(a.artifacts), Path(a.out), Path(a.assets), Path(a.rlaif))
    print(f"wrote {a.out} (plots in {a.assets})")


if __name__ == "__main__":
    main()
