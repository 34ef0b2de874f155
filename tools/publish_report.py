"""Copy a pipeline run's EVAL_REPORT.md to the repository root, with its plots under docs/; the
offline-vs-online DPO section is appended when ``--online-dpo``'s results.json exists.

python tools/publish_report.py --artifacts runs/demo --out EVAL_REPORT.md
"""

import argparse
import json
from pathlib import Path

from rlhfstack.evaluation.report import publish_report, render_online_dpo_section


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--artifacts", default="runs/demo")
    ap.add_argument("--out", default="EVAL_REPORT.md")
    ap.add_argument("--assets", default="docs/eval_report")
    ap.add_argument("--online-dpo", default="runs/demo_online_dpo")
    a = ap.parse_args()
    publish_report(Path(a.artifacts), Path(a.out), Path(a.assets))
    online = Path(a.online_dpo) / "results.json"
    if online.is_file():
        section = render_online_dpo_section(json.loads(online.read_text()))
        with open(a.out, "a", encoding="utf-8") as f:
            f.write("\n" + section)
    print(f"wrote {a.out} (plots in {a.assets})")


if __name__ == "__main__":
    main()
