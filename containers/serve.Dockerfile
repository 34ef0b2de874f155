# syntax=docker/dockerfile:1
# rlhfstack serving image: vLLM's OpenAI-compatible server for a model exported with
# tools/export_hf.py (one HF directory, LoRA merged, bf16).
#
#   python tools/export_hf.py --model runs/llama3_8b/dpo/model --out export/llama3_8b_dpo
#   docker build -f containers/serve.Dockerfile -t rlhfstack-serve:0.1.0 .
#   docker run --gpus all --ipc=host -p 8000:8000 -v "$PWD/export/llama3_8b_dpo:/models/policy:ro" \
#     rlhfstack-serve:0.1.0 [--tensor-parallel-size 2 ...]
#   curl localhost:8000/v1/completions -H 'Content-Type: application/json' \
#     -d '{"model": "rlhfstack-policy", "prompt": "Hello", "max_tokens": 32}'
FROM vllm/vllm-openai:v0.19.1

ENV MODEL_DIR=/models/policy \
    SERVED_MODEL_NAME=rlhfstack-policy \
    PORT=8000 \
    DTYPE=bfloat16 \
    HF_HUB_OFFLINE=1

WORKDIR /srv
COPY containers/serve_entrypoint.sh /usr/local/bin/rlhfstack-serve
RUN chmod 0755 /usr/local/bin/rlhfstack-serve

EXPOSE 8000
HEALTHCHECK --interval=30s --timeout=5s --start-period=300s --retries=3 \
  CMD python3 -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/health', timeout=4)"

ENTRYPOINT ["/usr/local/bin/rlhfstack-serve"]
CMD []
