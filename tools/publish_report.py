"""Copy a pipeline run's EVAL_REPORT.md to the repository root, with its plots under docs/; the
offline-vs-online DPO section is appended when ``--online-dpo``'s results.json exists.

python tools/publish_report.py --artifacts runs/demo --out EVAL_REPORT.md

Ends by printing the results table (win-rates with their CIs, each target met or missed, from
``<artifacts>/results.json``) and the report's path: the last lines of ``make demo``.
"""

import argparse
import json
from pathlib import Path

from rlhfstack.evaluation.report import publish_report, results_table


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--artifacts", default="runs/demo")
    ap.add_argument("--out", default="EVAL_REPORT.md")
    ap.add_argument("--assets", default="docs/eval_report")
    ap.add_argument(
        "--rlaif",
        default="runs/demo_rlaif/results.json",
        help="results of +experiment=demo_rlaif: adds the RLHF vs RLAIF section when it exists",
    )
    ap.add_argument(
        "--online-dpo",
        default="runs/demo_online_dpo/results.json",
        help="results of +experiment=demo_online_dpo: adds the online vs offline DPO section",
    )
    a = ap.parse_args(argv)
    publish_report(
        Path(a.artifacts), Path(a.out), Path(a.assets), Path(a.rlaif), Path(a.online_dpo)
    )
    results = Path(a.artifacts) / "results.json"
    if results.exists():
        print()
        print("\n".join(results_table(json.loads(results.read_text()))))
    print(f"Report: {Path(a.out).resolve()} (plots in {a.assets})")


if __name__ == "__main__":
    main()
