"""Launch and mesh: who this process is (torchrun / srun variables), the device mesh
``(pp, dp_shard, tp)``, the collectives the stages use, and a local multi-process launcher for tests."""

from __future__ import annotations

import datetime
import logging
import os
import re
import socket
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.distributed.device_mesh import init_device_mesh

log = logging.getLogger("rlhfstack.distributed")

MIXED_PRECISION = ("none", "bf16")
# ----------------------------------------------------------------------------- launch / ranks


def launch_env() -> tuple[int, int, int]:
    """``(rank, world_size, local_rank)`` from torchrun's variables, else SLURM's, else ``(0, 1, 0)``."""
    env = os.environ
    if "RANK" in env and "WORLD_SIZE" in env:
        return int(env["RANK"]), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", 0))
    if "SLURM_PROCID" in env and int(env.get("SLURM_NTASKS", "1")) > 1:
        return int(env["SLURM_PROCID"]), int(env["SLURM_NTASKS"]), int(env.get("SLURM_LOCALID", 0))
    return 0, 1, 0


def _first_slurm_host(nodelist: str) -> str:
    """First host name of a SLURM node list such as ``gpu[012-015,020],cpu3``."""
    first = re.split(r",(?![^\[]*\])", nodelist.strip())[0]
    m = re.match(r"^([^\[]+)\[([^\]]+)\]", first)
    if not m:
        return first
    prefix, ranges = m.groups()
    return prefix + ranges.split(",")[0].split("-")[0]


def _ensure_rendezvous_env() -> None:
    """Fill ``MASTER_ADDR``/``MASTER_PORT`` under ``srun`` when the job script did not."""
    env = os.environ
    if "MASTER_ADDR" not in env:
        nodelist = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST")
        env["MASTER_ADDR"] = _first_slurm_host(nodelist) if nodelist else "127.0.0.1"
    if "MASTER_PORT" not in env:
        job = int(env.get("SLURM_JOB_ID", "0") or 0)
        env["MASTER_PORT"] = str(20000 + job % 20000)


# ----------------------------------------------------------------------------- state


@dataclass
class ParallelState:
    """Who this process is, and the device mesh ``(pp, dp_shard, tp)`` it belongs to.

    A single process (no launcher, all degrees 1) gets ``world_size == 1`` and no mesh.
    """

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    dp: int = 1
    tp: int = 1
    pp: int = 1
    device: str = "cpu"
    backend: str | None = None
    mesh: Any = None
    finished: bool = field(default=False, repr=False)

    @property
    def distributed(self) -> bool:
        return self.world_size > 1 and not self.finished

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def _coord(self, dim: str) -> int:
        return 0 if self.mesh is None else self.mesh[dim].get_local_rank()

    @property
    def dp_rank(self) -> int:
        """Index of this rank's slice of each global batch."""
        return self._coord("dp_shard")

    @property
    def tp_rank(self) -> int:
        return self._coord("tp")

    @property
    def pp_rank(self) -> int:
        """Pipeline stage held by this rank."""
        return self._coord("pp")

    def group(self, dim: str) -> Any:
        """Process group of one mesh dimension (``pp`` | ``dp_shard`` | ``tp``)."""
        return None if self.mesh is None else self.mesh[dim].get_group()


_STATE = ParallelState()


def current() -> ParallelState:
    """The state set by the last ``init_distributed`` (a single process before that)."""
    return _STATE


def is_main() -> bool:
    """True on global rank 0 (and in a single process): the only rank that writes files."""
    return _STATE.rank == 0


def resolve_degrees(parallel: Any, world_size: int) -> tuple[int, int, int]:
    """``(dp_shard, tp, pp)`` from ``parallel`` (``dp_shard=-1``: the rest of the world)."""
    tp, pp = int(parallel.tp), int(parallel.pp)
    dp = int(parallel.dp_shard)
    if tp < 1 or pp < 1 or dp == 0 or dp < -1:
        raise ValueError(
            f"parallel: degrees must be >= 1 (dp_shard may be -1); got dp_shard={dp} tp={tp} pp={pp}"
        )
    if dp == -1:
        if world_size % (tp * pp):
            raise ValueError(
                f"parallel: world size {world_size} is not divisible by tp*pp={tp * pp}"
            )
        dp = world_size // (tp * pp)
    if dp * tp * pp != world_size:
        need = dp * tp * pp
        hint = (
            f"launch with `torchrun --nproc_per_node={need} ...` (or srun with {need} tasks)"
            if world_size == 1
            else "set parallel.dp_shard/tp/pp so that their product is the world size"
        )
        raise ValueError(
            f"parallel: dp_shard*tp*pp = {dp}*{tp}*{pp} = {need} but {world_size} process(es) were "
            f"launched; {hint}"
        )
    return dp, tp, pp


def init_distributed(
    parallel: Any, device: str = "cpu", backend: str | None = None
) -> ParallelState:
    """Start the process group and the ``(pp, dp_shard, tp)`` mesh; return this rank's state.

    ``device``: ``cpu`` (gloo) or ``cuda`` (nccl; this rank uses ``cuda:LOCAL_RANK``).
    ``backend`` overrides the choice. With one process and all degrees 1 nothing is started.
    """
    global _STATE
    rank, world, local_rank = launch_env()
    dp, tp, pp = resolve_degrees(parallel, world)
    dev = device
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise RuntimeError("cluster.device=cuda but no CUDA device is visible")
        if world > 1:
            # srun --gpus-per-task=1 shows each task one device: index modulo what is visible
            idx = local_rank % torch.cuda.device_count()
            torch.cuda.set_device(idx)
            dev = f"cuda:{idx}"
    if world == 1:
        _STATE = ParallelState(device=dev)
        return _STATE
    want = "nccl" if device.startswith("cuda") else "gloo"
    if backend and backend != want:
        log.warning("cluster.backend=%s does not fit device %s; using %s", backend, device, want)
    backend = want
    if not dist.is_initialized():
        _ensure_rendezvous_env()
        kw: dict[str, Any] = {}
        if backend == "nccl":
            kw["device_id"] = torch.device(dev)
        dist.init_process_group(
            backend, rank=rank, world_size=world, timeout=datetime.timedelta(minutes=30), **kw
        )

    mesh = init_device_mesh(
        "cuda" if device.startswith("cuda") else "cpu",
        (pp, dp, tp),
        mesh_dim_names=("pp", "dp_shard", "tp"),
    )
    _STATE = ParallelState(rank, world, local_rank, dp, tp, pp, dev, backend, mesh)
    log.info(
        "rank %d/%d: dp_shard=%d tp=%d pp=%d on %s (%s)", rank, world, dp, tp, pp, dev, backend
    )
    return _STATE


def teardown() -> None:
    """Destroy the process group (if any); the state falls back to a single process."""
    global _STATE
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
    _STATE.finished = True


def barrier() -> None:
    if _STATE.distributed:
        dist.barrier()


# ----------------------------------------------------------------------------- collectives


def all_reduce_sum(t: torch.Tensor, group: Any = None) -> torch.Tensor:
    """In-place SUM over ``group`` (the world by default); a no-op in a single process."""
    if _STATE.distributed:
        dist.all_reduce(t, op=dist.ReduceOp.SUM, group=group)
    return t


def all_reduce_max(t: torch.Tensor, group: Any = None) -> torch.Tensor:
    if _STATE.distributed:
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=group)
    return t


def sum_stats(stats: dict[str, float], group: Any = None) -> dict[str, float]:
    """Sum a dict of floats over ``group`` (same keys on every rank), in float64."""
    if not _STATE.distributed or not stats:
        return dict(stats)
    keys = list(stats)  # insertion order (the same on every rank: same code path)
    t = torch.tensor([float(stats[k]) for k in keys], dtype=torch.float64, device=comm_device())
    all_reduce_sum(t, group)
    return dict(zip(keys, t.tolist()))


def broadcast_object(obj: Any, src: int = 0, group: Any = None) -> Any:
    """``obj`` of global rank ``src`` on every rank of ``group``."""
    if not _STATE.distributed:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src, group=group, device=comm_device())
    return box[0]


def comm_device() -> torch.device:
    return torch.device(_STATE.device if _STATE.backend == "nccl" else "cpu")


def shard_batch(batch: dict[str, Any], rank: int, size: int) -> dict[str, Any]:
    """Rows ``[rank * B/size, (rank+1) * B/size)`` of every tensor with the batch's leading size.

    The global batch is collated identically on every rank (same seed, same padding), so each
    data-parallel rank takes a contiguous slice. ``B`` must be divisible by ``size``.
    """
    if size == 1:
        return batch
    n = next(v.shape[0] for v in batch.values() if isinstance(v, torch.Tensor))
    if n % size:
        raise ValueError(
            f"global batch of {n} rows is not divisible by the data-parallel degree {size}"
        )
    k = n // size
    return {
        key: v[rank * k : (rank + 1) * k]
        if isinstance(v, torch.Tensor) and v.dim() > 0 and v.shape[0] == n
        else v
        for key, v in batch.items()
    }


def any_rank(flag: bool) -> bool:
    """True on every rank if ``flag`` is true on any (a preemption signal seen by one rank)."""
    if not _STATE.distributed:
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=comm_device())
    all_reduce_max(t)
    return bool(t.item() > 0)


# ----------------------------------------------------------------------------- local launcher


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _local_worker(
    local_rank: int, fn: Callable[..., Any], world: int, port: int, args: tuple
) -> None:
    os.environ.update(
        RANK=str(local_rank),
        WORLD_SIZE=str(world),
        LOCAL_RANK=str(local_rank),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
    )
    fn(*args)


def launch_local(fn: Callable[..., Any], world_size: int, *args: Any) -> None:
    """Run ``fn(*args)`` in ``world_size`` spawned processes with torchrun's environment (tests).

    ``fn`` must be importable (a module-level function). Raises if any process fails.
    """

    mp.start_processes(
        _local_worker,
        args=(fn, world_size, free_port(), args),
        nprocs=world_size,
        start_method="spawn",
    )
