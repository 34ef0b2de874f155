"""Export one servable HF directory (safetensors + config + tokenizer), LoRA merged, in one dtype.

Examples::

    python tools/export_hf.py --model runs/demo/sft/model --lora-adapter runs/x/adapter --out export --dtype bfloat16
    python tools/export_hf.py --model runs/demo/ppo/model --out export   # full model, cast to bf16

The output loads with transformers' AutoModelForCausalLM.from_pretrained and serves with vLLM
(containers/serve.Dockerfile).
"""

from __future__ import annotations

import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from rlhfstack.cli import export_main  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    """The same as ``rlhf export`` (flags: ``--help``)."""
    return export_main(argv)


if __name__ == "__main__":
    raise SystemExit(main())
