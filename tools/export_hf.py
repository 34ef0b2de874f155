"""Export one servable HF directory (safetensors + config + tokenizer), LoRA merged, in one dtype.

Examples::

    python tools/export_hf.py --model runs/demo/sft/model --lora-adapter runs/x/adapter --out export --dtype bfloat16
    python tools/export_hf.py --model runs/demo/ppo/model --out export   # full model, cast to bf16

The output loads with transformers' AutoModelForCausalLM.from_pretrained and serves with vLLM
(containers/serve.Dockerfile).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from rlhfstack.models.convert import export_hf  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument(
        "--model",
        type=Path,
        required=True,
        help="HF model directory (or a peft adapter directory: its base is read from it)",
    )
    ap.add_argument("--lora-adapter", type=Path, default=None, help="peft adapter to merge")
    ap.add_argument("--out", type=Path, required=True, help="output HF directory")
    ap.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="bfloat16")
    ap.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    args = ap.parse_args(argv)
    if args.out.exists() and not args.overwrite:
        ap.error(f"{args.out} exists; pass --overwrite to replace it")
    out = export_hf(args.model, args.out, lora_adapter=args.lora_adapter, dtype=args.dtype)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
