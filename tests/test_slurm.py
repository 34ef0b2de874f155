"""slurm/*.sbatch against a real one-node SLURM cluster started by the test.

The fixture writes a ``slurm.conf`` for this host (2 CPUs, private ports and directories),
starts ``munged``, ``slurmctld`` and ``slurmd`` as root, and stops them afterwards. Then:

* ``slurm/sft.sbatch`` runs a tiny SFT (tiny random Llama, 2 torchrun workers on CPU with FSDP2
  over gloo) to completion: srun -> torchrun c10d rendezvous on ``scontrol show hostnames``;
* ``slurm/ppo.sbatch`` runs a tensor-parallel PPO (TP=2 over the 2 workers) to completion;
* the preemption path: ``SIGUSR1`` to the batch shell (what ``--signal=B:USR1@120`` delivers)
  reaches both workers through srun and torchrun, the job requeues itself and the second run
  sees ``SLURM_RESTART_COUNT=1``.

Needs root and Debian's ``slurm-wlm`` + ``munge`` (``bash slurm/ci_install_slurm.sh``); skips
with the reason otherwise. Every wait is bounded.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
BINARIES = ("munged", "slurmctld", "slurmd", "sbatch", "srun", "scontrol", "sinfo", "scancel")

pytestmark = pytest.mark.slow


def _skip_reason() -> str | None:
    if not hasattr(os, "geteuid") or os.geteuid() != 0:
        return "SLURM test needs root to start munged/slurmctld/slurmd"
    missing = [b for b in BINARIES if shutil.which(b) is None]
    if missing:
        return (
            f"SLURM not installed (missing {', '.join(missing)}): "
            "run `bash slurm/ci_install_slurm.sh` (apt-get install slurm-wlm munge)"
        )
    return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_for(pred, timeout: float, what: str, interval: float = 0.5):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = pred()
        if value:
            return value
        time.sleep(interval)
    raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what}")


@dataclass
class Cluster:
    root: Path
    env: dict[str, str]

    def run(self, *args: str, timeout: float = 30, check: bool = True) -> str:
        res = subprocess.run(
            list(args), env=self.env, capture_output=True, text=True, timeout=timeout, cwd=REPO_ROOT
        )
        if check and res.returncode != 0:
            raise RuntimeError(
                f"{' '.join(args)} failed ({res.returncode}): {res.stderr}{res.stdout}"
            )
        return res.stdout

    def job(self, job_id: str) -> dict[str, str]:
        out = self.run("scontrol", "-o", "show", "job", job_id, check=False)
        return dict(re.findall(r"(\w+)=(\S*)", out))

    def wait_job(self, job_id: str, timeout: float) -> dict[str, str]:
        final = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY"}

        def done():
            info = self.job(job_id)
            return info if info.get("JobState") in final else None

        try:
            return _wait_for(done, timeout, f"job {job_id}")
        except TimeoutError:
            self.run("scancel", job_id, check=False)
            raise

    def logs(self) -> str:
        return "\n".join(
            f"--- {p.name}\n{p.read_text(errors='replace')[-4000:]}"
            for p in sorted(self.root.glob("log/*"))
        )


def _slurm_conf(root: Path, host: str, ctld_port: int, d_port: int) -> str:
    return f"""\
ClusterName=rlhftest
SlurmctldHost={host}(127.0.0.1)
SlurmctldPort={ctld_port}
SlurmdPort={d_port}
AuthType=auth/munge
AuthInfo=socket={root}/munge/munge.sock
CredType=cred/munge
SlurmUser=root
SlurmdUser=root
StateSaveLocation={root}/state
SlurmdSpoolDir={root}/spool
SlurmctldPidFile={root}/slurmctld.pid
SlurmdPidFile={root}/slurmd.pid
SlurmctldLogFile={root}/log/slurmctld.log
SlurmdLogFile={root}/log/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=2,bf_interval=2
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
MpiDefault=none
ReturnToService=2
SlurmctldTimeout=30
SlurmdTimeout=30
InactiveLimit=0
KillWait=10
MinJobAge=300
JobRequeue=1
NodeName={host} NodeAddr=127.0.0.1 CPUs=2 RealMemory=2000 State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=30 State=UP
"""


@pytest.fixture(scope="module")
def cluster():
    reason = _skip_reason()
    if reason:
        pytest.skip(reason)
    root = Path(tempfile.mkdtemp(prefix="rlhf-slurm-"))
    root.chmod(0o755)
    for d in ("munge", "state", "spool", "log"):
        (root / d).mkdir()
    (root / "munge").chmod(0o755)
    key = root / "munge" / "munge.key"
    key.write_bytes(os.urandom(1024))
    key.chmod(0o400)
    sock = root / "munge" / "munge.sock"
    host = socket.gethostname().split(".")[0]
    conf = root / "slurm.conf"
    conf.write_text(_slurm_conf(root, host, _free_port(), _free_port()))
    env = {**os.environ, "SLURM_CONF": str(conf)}
    for var in [v for v in env if v.startswith(("SLURM_", "SBATCH_", "SRUN_"))]:
        if var != "SLURM_CONF":  # a test run inside a SLURM job must not leak its own job
            env.pop(var)
    daemons: list[subprocess.Popen] = []
    outputs = []
    munged_args = [
        "munged",
        "--force",
        f"--socket={sock}",
        f"--key-file={key}",
        f"--log-file={root}/log/munged.log",
        f"--pid-file={root}/munge/munged.pid",
        f"--seed-file={root}/munge/munged.seed",
    ]
    c = Cluster(root, env)
    try:
        subprocess.run(munged_args, env=env, check=True, timeout=20, capture_output=True)
        _wait_for(sock.exists, 10, "munge socket")
        for daemon in ("slurmctld", "slurmd"):
            out = open(root / "log" / f"{daemon}.stdout", "w")  # noqa: SIM115 (closed below)
            outputs.append(out)
            daemons.append(
                subprocess.Popen(
                    [daemon, "-D", "-f", str(conf)], env=env, stdout=out, stderr=subprocess.STDOUT
                )
            )
            if daemon == "slurmctld":
                _wait_for(
                    lambda: c.run("scontrol", "ping", check=False).count("UP"), 30, "slurmctld"
                )
        _wait_for(
            lambda: c.run("sinfo", "-h", "-o", "%T", check=False).strip() == "idle", 40, "idle node"
        )
        yield c
    except Exception as err:
        pytest.fail(f"could not start the test cluster: {err}\n{c.logs()}")
    finally:
        for p in reversed(daemons):
            p.send_signal(signal.SIGTERM)
        for p in reversed(daemons):
            try:
                p.wait(timeout=20)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(timeout=10)
        for out in outputs:
            out.close()
        subprocess.run(
            ["munged", f"--socket={sock}", "--stop"],
            env=env,
            timeout=20,
            capture_output=True,
            check=False,
        )
        shutil.rmtree(root, ignore_errors=True)


def _sbatch(c: Cluster, script: str, out: Path, extra_env: dict[str, str], args: list[str]) -> str:
    """Submit ``slurm/<script>`` the way a user would, sized for this 2-CPU CPU-only node."""
    env_list = ",".join(f"{k}={v}" for k, v in extra_env.items())
    job_id = c.run(
        "sbatch",
        "--parsable",
        "--gpus-per-node=0",
        "--cpus-per-task=2",
        "--time=00:10:00",
        f"--output={out}",
        f"--export=ALL,{env_list}",
        str(REPO_ROOT / "slurm" / script),
        *args,
    ).strip()
    assert re.fullmatch(r"\d+", job_id), job_id
    return job_id


def _tiny_model(path: Path) -> None:
    """A random 2-layer Llama + word-level tokenizer with a dedicated PAD (no shared data needed)."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    words = "once upon a time there was little girl boy named lily tom who liked to play in park".split()
    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3, **{w: i + 4 for i, w in enumerate(words)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="<pad>",
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
    ).save_pretrained(path)
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=len(vocab),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
    LlamaForCausalLM(cfg).save_pretrained(path)


def test_sbatch_sft_two_workers(cluster, tmp_path):
    model = tmp_path / "base"
    _tiny_model(model)
    data = tmp_path / "sft.jsonl"
    with open(data, "w") as f:
        for i in range(32):
            name = ("lily", "tom")[i % 2]
            f.write(
                json.dumps(
                    {
                        "prompt": f"once upon a time there was {name}",
                        "completion": " who liked to play in park",
                    }
                )
                + "\n"
            )
    run_dir = tmp_path / "run"
    out = tmp_path / "job.out"
    job = _sbatch(
        cluster,
        "sft.sbatch",
        out,
        {
            "NPROC_PER_NODE": "2",
            "RLHF_CLUSTER": "local",
            "RLHF_PYTHON": sys.executable,
            "RLHF_REPO_DIR": str(REPO_ROOT),
            "OMP_NUM_THREADS": "1",
        },
        [
            f"model.path={model}",
            f"data.train_path={data}",
            "data.eval_path=null",
            "data.adapter=plain",
            "data.template=plain",
            f"run_dir={run_dir}",
            "parallel.dp_shard=2",
            "trainer.max_steps=2",
            "trainer.batch_size=8",
            "trainer.micro_batch_size=4",
            "trainer.warmup_steps=0",
            "logging.tensorboard=false",
            "logging.plots=false",
        ],
    )
    info = cluster.wait_job(job, timeout=300)
    log = out.read_text(errors="replace") if out.exists() else "(no job output)"
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", (
        f"{info}\n{log}\n{cluster.logs()}"
    )
    host = socket.gethostname().split(".")[0]
    assert re.search(rf"rendezvous {re.escape(host)}:\d+", log), log
    assert "rank 1/2" in log and "dp_shard=2" in log, log  # both workers joined one process group
    assert (run_dir / "model" / "config.json").exists(), log
    assert (run_dir / "done.json").exists()
    steps = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert max(r.get("step", 0) for r in steps) == 2


def test_sbatch_ppo_tensor_parallel_two_workers(cluster, smoke, tmp_path):
    """slurm/ppo.sbatch: a TP=2 PPO (policy, critic, reference and reward model sharded over the
    two workers, rollouts on a gathered replica) on the smoke pipeline's SFT and RM."""
    run_dir = tmp_path / "run"
    out = tmp_path / "job.out"
    job = _sbatch(
        cluster,
        "ppo.sbatch",
        out,
        {
            "NPROC_PER_NODE": "2",
            "RLHF_CLUSTER": "local",
            "RLHF_PYTHON": sys.executable,
            "RLHF_REPO_DIR": str(REPO_ROOT),
            "OMP_NUM_THREADS": "1",
        },
        [
            f"artifacts_dir={smoke}",
            f"run_dir={run_dir}",
            "parallel.tp=2",
            "trainer.max_steps=2",
            "trainer.save_every=1",
            "trainer.batch_size=8",
            "trainer.micro_batch_size=4",
            "ppo.num_minibatches=2",
            "rollout.max_new_tokens=8",
            "gold_eval_every=0",
            "logging.tensorboard=false",
            "logging.plots=false",
        ],
    )
    info = cluster.wait_job(job, timeout=400)
    log = out.read_text(errors="replace") if out.exists() else "(no job output)"
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", (
        f"{info}\n{log}\n{cluster.logs()}"
    )
    assert "rank 1/2: dp_shard=1 tp=2 pp=1" in log, log
    assert (run_dir / "model" / "config.json").exists() and (run_dir / "done.json").exists(), log
    assert len(list((run_dir / "ckpt-000001").glob("*.distcp"))) == 2, log
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2]
    assert all(abs(r["first_minibatch_ratio"] - 1.0) < 1e-5 for r in rows), rows


WORKER = r'''
"""Stands in for a training stage: reports its rank, saves on SIGUSR1, resumes after requeue."""
import os, signal, sys, time
from pathlib import Path

out = Path(next(a.split("=", 1)[1] for a in sys.argv[1:] if a.startswith("out=")))
rank = os.environ["RANK"]
restart = int(os.environ.get("SLURM_RESTART_COUNT", "0"))
assert os.environ["WORLD_SIZE"] == "2", os.environ["WORLD_SIZE"]
if restart == 0:
    def on_usr1(signum, frame):
        (out / f"saved-{rank}").write_text("checkpoint")
        sys.exit(0)
    signal.signal(signal.SIGUSR1, on_usr1)
    (out / f"ready-{rank}").write_text(os.environ["MASTER_ADDR"])
    time.sleep(120)
    sys.exit(3)  # never preempted: fail
(out / f"resumed-{rank}").write_text(str(restart))
'''


def test_usr1_checkpoints_and_requeues(cluster, tmp_path):
    worker = tmp_path / "worker.py"
    worker.write_text(WORKER)
    marks = tmp_path / "marks"
    marks.mkdir()
    out = tmp_path / "job.out"
    job = _sbatch(
        cluster,
        "sft.sbatch",
        out,
        {
            "NPROC_PER_NODE": "2",
            "RLHF_CLUSTER": "local",
            "RLHF_PYTHON": sys.executable,
            "RLHF_REPO_DIR": str(REPO_ROOT),
            "RLHF_RECIPE": str(worker),
        },
        [f"out={marks}"],
    )
    try:
        _wait_for(lambda: len(list(marks.glob("ready-*"))) == 2, 120, "both workers running")
    except TimeoutError:
        cluster.run("scancel", job, check=False)
        raise AssertionError(
            out.read_text(errors="replace") if out.exists() else "no output"
        ) from None
    # what --signal=B:USR1@120 does 120 s before the time limit
    cluster.run("scancel", "--batch", "--signal=USR1", job)

    def requeued() -> bool:
        info = cluster.job(job)
        return info.get("Restarts") == "1" and info.get("JobState") != "COMPLETING"

    _wait_for(requeued, 120, "the requeue")
    # SLURM holds a requeued batch job back for ~2 minutes (Reason=BeginTime) so that slurmd
    # forgets the old allocation's revoked credential: a relaunch within the same second is
    # refused ("Job credential revoked") and the job ends FAILED. Release it early, but a few
    # seconds after the requeue (an earlier version of this test used StartTime=now and failed
    # whenever the release landed in the requeue's second).
    if cluster.job(job).get("Reason") == "BeginTime":
        cluster.run("scontrol", "update", f"JobId={job}", "StartTime=now+5", check=False)
    info = cluster.wait_job(job, timeout=240)
    log = out.read_text(errors="replace") if out.exists() else ""
    assert info["JobState"] == "COMPLETED", f"{info}\n{log}\n{cluster.logs()}"
    assert info["Restarts"] == "1", f"{info}\n{log}"
    assert sorted(p.name for p in marks.iterdir()) == [
        "ready-0",
        "ready-1",
        "resumed-0",
        "resumed-1",
        "saved-0",
        "saved-1",
    ], log
    assert "requeueing job" in log
