# syntax=docker/dockerfile:1
# rlhfstack training image: NVIDIA's NGC PyTorch container (CUDA, cuDNN, NCCL and NVIDIA's own
# torch build) with the project installed editable, NGC's torch left untouched
# (containers/install_into_image.sh pins the torch stack and fails the build if it changes).
#
#   docker build -f containers/train.Dockerfile -t rlhfstack-train:0.1.0 .
#   docker run --gpus all --ipc=host --ulimit memlock=-1 --ulimit stack=67108864 \
#     -v "$PWD/runs:/workspace/rlhfstack/runs" -v /path/to/data:/data \
#     rlhfstack-train:0.1.0 python recipes/train_sft.py +experiment=llama3_8b_sft
#
# On SLURM with pyxis/enroot: run slurm/*.sbatch with RLHF_PYTHON=python inside the container
# (srun --container-image=rlhfstack-train:0.1.0 ...).
FROM nvcr.io/nvidia/pytorch:26.04-py3

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONUNBUFFERED=1 \
    PYTHONHASHSEED=0 \
    TOKENIZERS_PARALLELISM=false \
    HF_HOME=/workspace/hf_home \
    RLHF_DATA_ROOT=/data

WORKDIR /workspace/rlhfstack

# Dependencies first: this layer is rebuilt only when pyproject.toml changes.
COPY pyproject.toml ./
COPY containers/install_into_image.sh containers/install_into_image.sh
COPY rlhfstack/__init__.py rlhfstack/__init__.py
RUN bash containers/install_into_image.sh

# The code (editable install: the package points here).
COPY rlhfstack/ rlhfstack/
COPY conf/ conf/
COPY recipes/ recipes/
COPY tools/ tools/
COPY eval/ eval/
COPY slurm/ slurm/
RUN python -c "import rlhfstack.config, rlhfstack.models.core; print('rlhfstack importable')"

# NGC's ENTRYPOINT (/opt/nvidia/nvidia_entrypoint.sh) is kept: it prints the container banner
# and runs the command. Default command: the pipeline recipe's help.
CMD ["python", "recipes/pipeline.py", "--help"]
