"""Convert between a Hugging Face Llama/Qwen2 directory and Megatron-core GPTModel shards.

Examples::

    # HF -> Megatron (tp=2, pp=2), local layer spec names (get_gpt_layer_local_spec)
    python tools/convert_hf_megatron.py to-megatron --hf runs/demo/sft/model --out ckpt_mcore --tp 2 --pp 2

    # Megatron -> HF (tp/pp read from the mp_rank_* directories; tokenizer copied from --tokenizer)
    python tools/convert_hf_megatron.py to-hf --megatron ckpt_mcore --out hf_model --tokenizer runs/demo/sft/model

Layout written: OUT/latest_checkpointed_iteration.txt ("release") and
OUT/release/mp_rank_{tp:02d}[_{pp:03d}]/model_optim_rng.pt. See rlhfstack/models/convert.py.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from rlhfstack.models.convert import hf_to_megatron, megatron_to_hf  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    sub = ap.add_subparsers(dest="direction", required=True)
    to_m = sub.add_parser("to-megatron", help="HF directory -> Megatron-core shards")
    to_m.add_argument("--hf", type=Path, required=True, help="HF model directory")
    to_m.add_argument("--out", type=Path, required=True, help="Megatron checkpoint root")
    to_m.add_argument("--tp", type=int, default=1, help="tensor-parallel size")
    to_m.add_argument("--pp", type=int, default=1, help="pipeline-parallel size")
    to_m.add_argument(
        "--layer-spec",
        choices=["local", "te"],
        default="local",
        help="norm names: local (input_layernorm/pre_mlp_layernorm) or te (fused layer_norm_weight)",
    )
    to_m.add_argument(
        "--dtype",
        choices=["float32", "bfloat16", "float16"],
        default=None,
        help="cast the weights (default: keep the checkpoint's dtype)",
    )
    to_m.add_argument(
        "--make-vocab-size-divisible-by",
        type=int,
        default=128,
        help="Megatron pads the vocabulary to a multiple of this times tp",
    )
    to_h = sub.add_parser("to-hf", help="Megatron-core shards -> HF directory")
    to_h.add_argument(
        "--megatron",
        type=Path,
        required=True,
        help="checkpoint root (with latest_checkpointed_iteration.txt) or iteration dir",
    )
    to_h.add_argument("--out", type=Path, required=True, help="HF output directory")
    to_h.add_argument("--tokenizer", type=Path, default=None, help="copy tokenizer files from here")
    to_h.add_argument(
        "--hf-config",
        type=Path,
        default=None,
        help="config.json to use when the checkpoint has no args.hf_config",
    )
    to_h.add_argument(
        "--vocab-size",
        type=int,
        default=None,
        help="true (unpadded) vocabulary size when rebuilding the config from args",
    )
    to_h.add_argument(
        "--trust-pickle",
        action="store_true",
        help="unpickle Megatron-LM args fully (only for checkpoints you trust)",
    )
    for p in (to_m, to_h):
        p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    args = ap.parse_args(argv)
    if args.out.exists() and not args.overwrite:
        ap.error(f"{args.out} exists; pass --overwrite to replace it")
    if args.direction == "to-megatron":
        out = hf_to_megatron(
            args.hf,
            args.out,
            tp=args.tp,
            pp=args.pp,
            layer_spec=args.layer_spec,
            dtype=args.dtype,
            make_vocab_size_divisible_by=args.make_vocab_size_divisible_by,
        )
    else:
        hf_config = json.loads(args.hf_config.read_text()) if args.hf_config else None
        out = megatron_to_hf(
            args.megatron,
            args.out,
            tokenizer_dir=args.tokenizer,
            hf_config=hf_config,
            vocab_size=args.vocab_size,
            trust_pickle=args.trust_pickle,
        )
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
