#!/usr/bin/env bash
# Serve an exported rlhfstack model (tools/export_hf.py output: config.json + safetensors +
# tokenizer) with vLLM's OpenAI-compatible server on 0.0.0.0:${PORT:-8000}.
# Extra arguments are passed to the server (e.g. --tensor-parallel-size 2 --max-model-len 4096).
set -euo pipefail
MODEL_DIR="${MODEL_DIR:-/models/policy}"
if [ ! -f "$MODEL_DIR/config.json" ]; then
  echo "serve: no config.json in $MODEL_DIR: mount an exported model there" \
       "(python tools/export_hf.py --model ... --out DIR; docker run -v DIR:$MODEL_DIR:ro ...)" >&2
  exit 2
fi
exec python3 -m vllm.entrypoints.openai.api_server \
  --model "$MODEL_DIR" \
  --served-model-name "${SERVED_MODEL_NAME:-rlhfstack-policy}" \
  --host 0.0.0.0 --port "${PORT:-8000}" \
  --dtype "${DTYPE:-bfloat16}" \
  "$@"
