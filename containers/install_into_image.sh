#!/usr/bin/env bash
# Install rlhfstack into an image that already ships torch (NVIDIA's NGC PyTorch container),
# WITHOUT replacing NVIDIA's torch build (or its CUDA/NCCL-matched companions).
#
#   bash containers/install_into_image.sh      # from the repository root, inside the image
#
# pyproject.toml pins torch==2.13.0 for laptops/CI; NGC ships its own build (e.g.
# 2.x.0a0+<sha>.nv26.04). So: (1) record the torch stack as pip constraints, (2) install the
# project's other dependencies under those constraints (and NGC's own /etc/pip/constraint.txt,
# which pip reads through $PIP_CONSTRAINT), (3) install the project itself editable with
# --no-deps, (4) fail the build if torch changed.
set -euo pipefail
cd "${RLHF_REPO_DIR:-$(dirname "$0")/..}"
PY="${PYTHON:-python}"

before="$("$PY" -c 'import torch; print(torch.__version__)')"
echo "install_into_image: keeping torch $before"

"$PY" - <<'PYEOF'
import re
import tomllib
from importlib import metadata

# (1) the torch stack as installed: any attempt to change it makes pip fail instead
stack = re.compile(r"^(torch|torchvision|torchaudio|triton|pytorch-triton|transformer[-_]engine.*|"
                   r"apex|flash[-_]attn|nvidia-.*)$", re.I)
pins = sorted({f"{d.metadata['Name']}=={d.version}" for d in metadata.distributions()
               if d.metadata["Name"] and stack.match(d.metadata["Name"])})
open("/tmp/rlhfstack-torch-stack.txt", "w").write("\n".join(pins) + "\n")
# (2) the project's dependencies without torch
deps = tomllib.load(open("pyproject.toml", "rb"))["project"]["dependencies"]
keep = [d for d in deps if not re.match(r"^\s*torch\b", d)]
open("/tmp/rlhfstack-requirements.txt", "w").write("\n".join(keep) + "\n")
print("install_into_image: torch stack pinned:", ", ".join(pins))
print("install_into_image: installing", ", ".join(keep))
PYEOF

"$PY" -m pip install -c /tmp/rlhfstack-torch-stack.txt -r /tmp/rlhfstack-requirements.txt
# --ignore-requires-python: NGC 25.01+ images run Python 3.12 (the pyproject targets 3.11).
"$PY" -m pip install --no-deps --ignore-requires-python -e .

after="$("$PY" -c 'import torch; print(torch.__version__)')"
if [ "$before" != "$after" ]; then
  echo "install_into_image: torch changed ($before -> $after): refusing to build" >&2
  exit 1
fi
"$PY" -c 'import rlhfstack, transformers, peft; print("install_into_image: ok", transformers.__version__, peft.__version__)'
