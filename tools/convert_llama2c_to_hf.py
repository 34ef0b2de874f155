"""Convert a llama2.c checkpoint (legacy v0 .bin) + tokenizer .bin to a Hugging Face directory.

Example::

    python tools/convert_llama2c_to_hf.py \\
        --checkpoint $RLHF_DATA_ROOT/models/stories260K/stories260K.bin \\
        --tokenizer $RLHF_DATA_ROOT/models/stories260K/tok512.bin --out runs/models/stories260K-hf

Defaults point at stories260K under RLHF_DATA_ROOT (default: <repo>/../shared/data).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from rlhfstack.models.llama2c import convert  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    data_root = Path(os.environ.get("RLHF_DATA_ROOT", REPO_ROOT.parent / "shared" / "data"))
    model_dir = data_root / "models" / "stories260K"
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--checkpoint", type=Path, default=model_dir / "stories260K.bin")
    ap.add_argument("--tokenizer", type=Path, default=model_dir / "tok512.bin")
    ap.add_argument("--out", type=Path, required=True, help="output HF directory")
    ap.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    args = ap.parse_args(argv)
    if args.out.exists() and not args.overwrite:
        ap.error(f"{args.out} exists; pass --overwrite to replace it")
    out = convert(args.checkpoint, args.tokenizer, args.out, overwrite=args.overwrite)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
