"""Extract the policy of a training checkpoint (``run_dir/ckpt-XXXXXX/``) into an HF directory.

Example::

    python tools/ckpt_to_hf.py --ckpt runs/demo/ppo/ckpt-000040 --base runs/demo/sft/model --out policy_hf
    python tools/ckpt_to_hf.py --ckpt runs/demo/ppo --base runs/demo/sft/model --out policy_hf  # newest ckpt

--base is the HF directory the run started from (its config and tokenizer are reused). LoRA
policies are merged; their alpha is read from the run's config.yaml unless --lora-alpha is given.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from rlhfstack.models.convert import ckpt_to_hf  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--ckpt", type=Path, required=True, help="ckpt-XXXXXX directory or its run dir")
    ap.add_argument("--base", type=Path, required=True, help="HF directory the run started from")
    ap.add_argument("--out", type=Path, required=True, help="output HF directory")
    ap.add_argument(
        "--lora-alpha", type=float, default=None, help="LoRA alpha (default: run config)"
    )
    ap.add_argument(
        "--dtype",
        choices=["float32", "bfloat16", "float16"],
        default=None,
        help="output dtype (default: the checkpoint's)",
    )
    ap.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    args = ap.parse_args(argv)
    if args.out.exists() and not args.overwrite:
        ap.error(f"{args.out} exists; pass --overwrite to replace it")
    out = ckpt_to_hf(args.ckpt, args.base, args.out, lora_alpha=args.lora_alpha, dtype=args.dtype)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
