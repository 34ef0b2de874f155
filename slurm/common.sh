#!/usr/bin/env bash
# Shared by every slurm/*.sbatch script (sourced, not run). It
#   * moves to the repository (the directory sbatch was called from, or $RLHF_REPO_DIR),
#   * sets the rendezvous: MASTER_ADDR = first host of `scontrol show hostnames`, MASTER_PORT
#     derived from the job id (so two jobs sharing a node do not collide),
#   * exports NCCL / threading defaults (any of them can be overridden from the environment),
#   * defines `launch RECIPE [hydra overrides...]`: one srun task per node, each a torchrun
#     that starts NPROC_PER_NODE workers meeting through a c10d rendezvous on MASTER_ADDR,
#   * handles the pre-timeout / preemption signal: the scripts ask for `--signal=B:USR1@120`
#     (the batch shell gets SIGUSR1 120 s before the time limit); the trap forwards it to the
#     step (srun -> torchrun -> workers: the training loop saves a checkpoint and exits), waits
#     for it, then `scontrol requeue`s the job (`#SBATCH --requeue`). The requeued job runs the
#     same command and the stage resumes from its newest checkpoint.
#     Why `B:` and a forward instead of `--signal=USR1@120` on the step: torchrun's default action
#     for SIGUSR1 is to die without stopping its workers cleanly; here torchrun is told to
#     forward SIGUSR1 (PET_SIGNALS_TO_HANDLE) and to give workers time to save
#     (TORCH_ELASTIC_SHUTDOWN_TIMEOUT, below the 120 s warning).

set -euo pipefail

log() { echo "[$(date '+%F %T')] [slurm/${RLHF_STAGE:-job}] $*"; }

: "${SLURM_JOB_ID:?submit this script with sbatch}"
REPO_DIR="${RLHF_REPO_DIR:-${SLURM_SUBMIT_DIR:-$PWD}}"
cd "$REPO_DIR"
PYTHON="${RLHF_PYTHON:-$REPO_DIR/.venv/bin/python}"
if [ ! -x "$PYTHON" ]; then PYTHON="$(command -v python3)"; fi

NNODES="${SLURM_JOB_NUM_NODES:-${SLURM_NNODES:-1}}"
# GPUs per node from the allocation; NPROC_PER_NODE overrides (CPU runs set it explicitly).
NPROC_PER_NODE="${NPROC_PER_NODE:-${SLURM_GPUS_ON_NODE:-${SLURM_GPUS_PER_NODE:-1}}}"
NPROC_PER_NODE="${NPROC_PER_NODE##*:}"   # "a100:8" -> "8"

# (sed reads all lines: `head -n 1` could SIGPIPE scontrol and fail the job under pipefail)
MASTER_ADDR="$(scontrol show hostnames "$SLURM_JOB_NODELIST" | sed -n 1p)"
MASTER_PORT="${MASTER_PORT:-$((20000 + SLURM_JOB_ID % 20000))}"
export MASTER_ADDR MASTER_PORT

# ---- NCCL: fail fast on a dead peer, use InfiniBand where present, bootstrap on real NICs.
export TORCH_NCCL_ASYNC_ERROR_HANDLING="${TORCH_NCCL_ASYNC_ERROR_HANDLING:-1}"
export NCCL_DEBUG="${NCCL_DEBUG:-WARN}"
export NCCL_IB_DISABLE="${NCCL_IB_DISABLE:-0}"
export NCCL_SOCKET_IFNAME="${NCCL_SOCKET_IFNAME:-^lo,docker0}"
export NCCL_NET_GDR_LEVEL="${NCCL_NET_GDR_LEVEL:-PHB}"   # GPUDirect RDMA when GPU and NIC share a PCIe host bridge
export NCCL_CROSS_NIC="${NCCL_CROSS_NIC:-0}"
# ---- Threads, tokenizers, reproducibility, unbuffered logs.
CPUS_PER_TASK="${SLURM_CPUS_PER_TASK:-$NPROC_PER_NODE}"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-$(( CPUS_PER_TASK / NPROC_PER_NODE > 0 ? CPUS_PER_TASK / NPROC_PER_NODE : 1 ))}"
export TOKENIZERS_PARALLELISM=false PYTHONHASHSEED=0 PYTHONUNBUFFERED=1
# ---- torchrun: forward SIGUSR1 to the workers and let them save before SIGKILL.
export PET_SIGNALS_TO_HANDLE="${PET_SIGNALS_TO_HANDLE:-SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1}"
export TORCH_ELASTIC_SHUTDOWN_TIMEOUT="${TORCH_ELASTIC_SHUTDOWN_TIMEOUT:-100}"

STEP_PID=""
REQUEUE=0
_forward() {  # forward a signal to the running step
  if [ -n "$STEP_PID" ] && kill -0 "$STEP_PID" 2>/dev/null; then kill "-$1" "$STEP_PID" || true; fi
}
_on_usr1() { log "SIGUSR1 (time limit / preemption notice): checkpoint, then requeue"; REQUEUE=1; _forward USR1; }
_on_term() { log "SIGTERM: forwarding to the step"; _forward TERM; }
trap _on_usr1 USR1
trap _on_term TERM

log "job $SLURM_JOB_ID (restart ${SLURM_RESTART_COUNT:-0}): $NNODES node(s) x $NPROC_PER_NODE process(es);" \
    "rendezvous $MASTER_ADDR:$MASTER_PORT; python $PYTHON"

# launch RECIPE [ARGS...]: run RECIPE with NPROC_PER_NODE workers on each of STEP_NODES nodes
# (default: every node of the allocation); returns its exit status. After a SIGUSR1 the job is
# requeued (and this shell exits) once the step has stopped.
launch() {
  local recipe="$1"
  shift
  local nodes="${STEP_NODES:-$NNODES}"
  log "launch $recipe $* ($nodes node(s) x $NPROC_PER_NODE)"
  srun --nodes="$nodes" --ntasks="$nodes" --ntasks-per-node=1 --kill-on-bad-exit=1 \
    "$PYTHON" -m torch.distributed.run \
    --nnodes="$nodes" --nproc-per-node="$NPROC_PER_NODE" \
    --rdzv-backend=c10d --rdzv-endpoint="$MASTER_ADDR:$MASTER_PORT" --rdzv-id="$SLURM_JOB_ID" \
    --max-restarts=0 \
    "$recipe" "$@" &
  STEP_PID=$!
  local rc=0
  while true; do
    rc=0
    wait "$STEP_PID" || rc=$?
    # a trapped signal interrupts `wait` (status > 128) while the step still runs: wait again
    if [ "$rc" -gt 128 ] && kill -0 "$STEP_PID" 2>/dev/null; then continue; fi
    break
  done
  STEP_PID=""
  if [ "$REQUEUE" = 1 ]; then
    log "step stopped (status $rc); requeueing job $SLURM_JOB_ID"
    scontrol requeue "$SLURM_JOB_ID"
    exit 0
  fi
  log "step finished with status $rc"
  return "$rc"
}
