"""Fast checks of slurm/*.sbatch and the Hydra submitit launcher config (no SLURM needed).

The launch logic of ``slurm/common.sh`` runs for real against stand-in ``srun``/``scontrol``
commands that record what they are asked to do (a 2-node allocation), so the torchrun command
line, rendezvous and pipeline stage skipping are checked on every machine; tests/test_slurm.py
runs the same scripts on a real SLURM cluster.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

REPO_ROOT = Path(__file__).resolve().parents[1]
SLURM = REPO_ROOT / "slurm"
STAGE_SCRIPTS = {
    "sft": "recipes/train_sft.py",
    "rm": "recipes/train_rm.py",
    "ppo": "recipes/train_ppo.py",
    "dpo": "recipes/train_dpo.py",
}
# hydra_plugins.hydra_submitit_launcher.config (hydra-submitit-launcher 1.2.0): BaseQueueConf +
# SlurmQueueConf fields.
SUBMITIT_SLURM_FIELDS = {
    "submitit_folder", "timeout_min", "cpus_per_task", "gpus_per_node", "tasks_per_node", "mem_gb",
    "nodes", "name", "stderr_to_stdout", "_target_", "partition", "qos", "comment", "constraint",
    "exclude", "gres", "cpus_per_gpu", "gpus_per_task", "mem_per_gpu", "mem_per_cpu", "account",
    "signal_delay_s", "max_num_timeout", "additional_parameters", "array_parallelism", "setup",
    "srun_args",
}  # fmt: skip


def _directives(path: Path) -> dict[str, str]:
    out = {}
    for line in path.read_text().splitlines():
        m = re.match(r"^#SBATCH\s+--([\w-]+)(?:=(\S+))?", line)
        if m:
            out[m.group(1)] = m.group(2) or ""
    return out


@pytest.mark.parametrize("script", sorted(p.name for p in SLURM.glob("*.sbatch")))
def test_sbatch_syntax_and_directives(script):
    path = SLURM / script
    subprocess.run(["bash", "-n", str(path)], check=True, timeout=10)
    d = _directives(path)
    assert d["signal"] == "B:USR1@120" and "requeue" in d, d
    assert d["ntasks-per-node"] == "1"  # one torchrun per node
    assert re.fullmatch(r"\d+", d["gpus-per-node"]) and re.fullmatch(r"\d+:\d\d:\d\d", d["time"])
    text = path.read_text()
    # every #SBATCH line precedes the first command (sbatch stops reading them there)
    first_cmd = next(
        i for i, ln in enumerate(text.splitlines()) if ln.strip() and not ln.startswith("#")
    )
    assert all(i < first_cmd for i, ln in enumerate(text.splitlines()) if ln.startswith("#SBATCH"))
    assert "slurm/common.sh" in text


def test_common_sh_and_ci_install_syntax():
    for name in ("common.sh", "ci_install_slurm.sh"):
        subprocess.run(["bash", "-n", str(SLURM / name)], check=True, timeout=10)
    text = (SLURM / "common.sh").read_text()
    for needle in (
        "scontrol show hostnames",
        "--rdzv-backend=c10d",
        "TORCH_NCCL_ASYNC_ERROR_HANDLING",
        "NCCL_SOCKET_IFNAME",
        "NCCL_IB_DISABLE",
        "scontrol requeue",
        "trap _on_usr1 USR1",
        "PET_SIGNALS_TO_HANDLE",
    ):
        assert needle in text, needle


def _fake_slurm(tmp_path: Path) -> tuple[dict[str, str], Path]:
    """PATH with stand-in scontrol/srun: 2 nodes; srun records its argv and exits 0."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    calls = tmp_path / "calls.txt"
    (bin_dir / "scontrol").write_text(
        "#!/usr/bin/env bash\n"
        'if [ "$1 $2" = "show hostnames" ]; then printf "gpu-a017\\ngpu-a018\\n"; exit 0; fi\n'
        f'echo "scontrol $*" >> "{calls}"\n'
    )
    (bin_dir / "srun").write_text(
        f'#!/usr/bin/env bash\nprintf "%s\\n" "srun $*" >> "{calls}"\nexit "${{FAKE_SRUN_RC:-0}}"\n'
    )
    for f in bin_dir.iterdir():
        f.chmod(0o755)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "NPROC", "MASTER_"))}
    env.update(
        PATH=f"{bin_dir}:{env['PATH']}",
        SLURM_JOB_ID="4242",
        SLURM_JOB_NODELIST="gpu-a[017-018]",
        SLURM_JOB_NUM_NODES="2",
        SLURM_GPUS_ON_NODE="8",
        SLURM_SUBMIT_DIR=str(REPO_ROOT),
        RLHF_PYTHON="/usr/bin/python3",
    )
    return env, calls


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
@pytest.mark.parametrize("stage", sorted(STAGE_SCRIPTS))
def test_stage_script_launches_torchrun(stage, tmp_path):
    env, calls = _fake_slurm(tmp_path)
    res = subprocess.run(
        ["bash", str(SLURM / f"{stage}.sbatch"), "+experiment=llama3_8b_sft", "trainer.lr=1e-5"],
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
        cwd=tmp_path,
    )
    assert res.returncode == 0, res.stderr + res.stdout
    (srun,) = calls.read_text().splitlines()
    port = 20000 + 4242 % 20000
    assert srun.startswith("srun --nodes=2 --ntasks=2 --ntasks-per-node=1 --kill-on-bad-exit=1 ")
    assert "/usr/bin/python3 -m torch.distributed.run --nnodes=2 --nproc-per-node=8" in srun
    assert f"--rdzv-backend=c10d --rdzv-endpoint=gpu-a017:{port} --rdzv-id=4242" in srun
    assert srun.endswith(
        f"{STAGE_SCRIPTS[stage]} cluster=slurm cluster.nodes=2 cluster.gpus_per_node=8 "
        "+experiment=llama3_8b_sft trainer.lr=1e-5"
    ), srun
    assert f"rendezvous gpu-a017:{port}" in res.stdout


def test_failed_step_fails_the_job(tmp_path):
    env, _ = _fake_slurm(tmp_path)
    env["FAKE_SRUN_RC"] = "3"
    res = subprocess.run(
        ["bash", str(SLURM / "sft.sbatch")], env=env, capture_output=True, text=True, timeout=30
    )
    assert res.returncode == 3


def test_pipeline_skips_finished_stages(tmp_path):
    env, calls = _fake_slurm(tmp_path)
    art = tmp_path / "art"
    (art / "sft").mkdir(parents=True)
    (art / "sft" / "done.json").write_text("{}")
    env.update(MODEL="qwen2_7b", ARTIFACTS_DIR=str(art), STAGES="sft rm ppo dpo")
    res = subprocess.run(
        ["bash", str(SLURM / "pipeline.sbatch"), "trainer.save_every=5"],
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert res.returncode == 0, res.stderr + res.stdout
    lines = calls.read_text().splitlines()
    assert [re.search(r"recipes/train_(\w+)\.py", ln).group(1) for ln in lines] == [
        "rm",
        "ppo",
        "dpo",
    ]
    rm, ppo, dpo = lines
    assert "--nnodes=2 --nproc-per-node=8" in rm and "+experiment=qwen2_7b_rm" in rm
    # PPO runs on one node, FSDP2 over its GPUs
    assert ppo.startswith("srun --nodes=1 --ntasks=1 ") and "--nnodes=1 --nproc-per-node=8" in ppo
    assert "+experiment=qwen2_7b_ppo_lora" in ppo and f"artifacts_dir={art}" in ppo
    assert dpo.endswith("trainer.save_every=5")
    assert "sft: " in res.stdout and "skipped" in res.stdout
    # every experiment the pipeline names exists
    for ln in lines:
        exp = re.search(r"\+experiment=(\w+)", ln).group(1)
        assert (REPO_ROOT / "conf" / "experiment" / f"{exp}.yaml").exists(), exp


def test_hydra_submitit_launcher_config():
    path = REPO_ROOT / "conf" / "hydra" / "launcher" / "slurm.yaml"
    text = path.read_text()
    assert text.startswith("# @package hydra.launcher")
    cfg = yaml.safe_load(text)
    assert cfg.pop("defaults") == ["submitit_slurm"]
    unknown = set(cfg) - SUBMITIT_SLURM_FIELDS
    assert not unknown, f"not SlurmQueueConf fields: {unknown}"
    assert cfg["signal_delay_s"] == 120 and cfg["max_num_timeout"] >= 1
    assert "%j" in cfg["submitit_folder"]
    try:  # with the optional extra installed, check against the plugin's own dataclass
        from dataclasses import fields

        from hydra_plugins.hydra_submitit_launcher.config import SlurmQueueConf
    except ImportError:
        return
    assert set(cfg) <= {f.name for f in fields(SlurmQueueConf)}


def test_default_composition_ignores_launcher_config():
    """conf/hydra/ only adds an option: the stages still compose without the plugin."""
    from rlhfstack.configs import load_config

    cfg = load_config("sft", [])
    assert cfg.stage == "sft"
