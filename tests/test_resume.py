"""Checkpoints and resume in the shared supervised loop (SFT here; RM and DPO use the same loop).

A checkpoint is ``run_dir/ckpt-NNNNNN/``: ``torch.distributed.checkpoint`` shards of the trainable
parameters and optimizer state, plus ``extra.json`` / ``extra.safetensors`` (schedule, RNG, step, recipe; no pickle). The resume tests copy
the step-2 checkpoint of an uninterrupted run into a fresh run directory (what a kill after that
checkpoint leaves behind), run the same command there, and compare the last ``metrics.jsonl`` row
with the uninterrupted run's.
"""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
TIMING = ("time", "wall_seconds")


def _sft(env: dict, arts: Path, run_dir: Path, *extra: str, nproc: int = 1) -> subprocess.Popen:
    launcher = [sys.executable]
    if nproc > 1:
        launcher += [
            "-m",
            "torch.distributed.run",
            "--standalone",
            f"--nproc_per_node={nproc}",
        ]
    cmd = [
        *launcher,
        "recipes/train_sft.py",
        "+experiment=demo",
        f"artifacts_dir={arts}",
        f"run_dir={run_dir}",
        "trainer.eval_every=0",
        "logging.tensorboard=false",
        "logging.plots=false",
        "cluster.num_threads=1",
        *extra,
    ]
    return subprocess.Popen(
        cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )


def _ok(p: subprocess.Popen, timeout: float = 300) -> str:
    out, _ = p.communicate(timeout=timeout)
    assert p.returncode == 0, out[-4000:]
    return out


def _rows(run_dir: Path) -> list[dict]:
    return [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if x]


def _strip(row: dict) -> dict:
    return {k: v for k, v in row.items() if k not in TIMING}


def _interrupted_copy(src: Path, dst: Path, step: int) -> None:
    """What a kill after ``src``'s step-``step`` checkpoint would have left: that checkpoint, the
    config, and a metrics log that already holds a row past it (dropped on resume)."""
    dst.mkdir(parents=True)
    shutil.copytree(src / f"ckpt-{step:06d}", dst / f"ckpt-{step:06d}")
    shutil.copy(src / "config.yaml", dst / "config.yaml")
    rows = _rows(src)[: step + 1]
    (dst / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_sft_checkpoint_layout_and_resume_matches_uninterrupted(arts, tmp_path, launch_env):
    full, cut = tmp_path / "full", tmp_path / "cut"
    _ok(_sft(launch_env, arts, full, "trainer.max_steps=6", "trainer.save_every=2"))
    # every 2 steps, the final step excluded (the model is saved instead); the 2 newest are kept
    assert sorted(p.name for p in full.glob("ckpt-*")) == ["ckpt-000002", "ckpt-000004"]
    ck = full / "ckpt-000002"
    assert (
        (ck / ".metadata").exists() and list(ck.glob("*.distcp")) and (ck / "extra.json").exists()
    )
    assert (ck / "extra.safetensors").exists() and not list(ck.glob("*.pt")), "nothing pickled"
    assert not list(full.glob(".ckpt-*")), "a partial checkpoint was left behind"

    _interrupted_copy(full, cut, 2)
    out = _ok(_sft(launch_env, arts, cut, "trainer.max_steps=6", "trainer.save_every=2"))
    assert "resumed from" in out and "at step 2" in out, out[-2000:]
    a, b = _rows(full), _rows(cut)
    assert [r["step"] for r in b] == list(range(1, 7))
    assert _strip(a[-1]) == _strip(b[-1])


def test_save_every_without_a_model_is_rejected_before_training(tmp_path):
    from rlhfstack.training import train_loop

    class _Cfg:  # the fields train_loop reads
        seed = 0

        class trainer:  # noqa: N801
            batch_size, micro_batch_size, save_every = 2, 1, 1
            lr, adam_betas, adam_eps, weight_decay = 1e-3, (0.9, 0.999), 1e-8, 0.0
            warmup_steps, lr_schedule, grad_clip, eval_every, log_every = 0, "constant", 0, 0, 1

    from rlhfstack.training import Run

    run = Run(cfg=_Cfg, run_dir=tmp_path / "r", logger=None, cost=None, device="cpu")  # type: ignore[arg-type]
    with pytest.raises(NotImplementedError, match="save_every"):
        train_loop(run, params=[], items=[1, 2], collate=None, loss_fn=None, max_steps=1)


@pytest.mark.slow
def test_sigterm_checkpoints_exits_zero_and_resumes(arts, tmp_path, launch_env):
    run_dir = tmp_path / "term"
    args = ("trainer.max_steps=400", "trainer.log_every=1")
    p = _sft(launch_env, arts, run_dir, *args)
    deadline = time.time() + 120
    while time.time() < deadline and not (
        (run_dir / "metrics.jsonl").exists() and len(_rows(run_dir)) >= 3
    ):
        time.sleep(0.2)
    p.send_signal(signal.SIGTERM)
    out = _ok(p, timeout=120)
    assert "preempted: checkpoint at step" in out, out[-2000:]
    (ck,) = run_dir.glob("ckpt-*")
    stopped = int(ck.name.split("-")[1])
    assert stopped < 400 and not (run_dir / "done.json").exists()
    out = _ok(_sft(launch_env, arts, run_dir, *args), timeout=600)
    assert f"at step {stopped}" in out
    assert [r["step"] for r in _rows(run_dir)] == list(range(1, 401))
    assert (run_dir / "done.json").exists()


@pytest.mark.slow
def test_fsdp2_checkpoint_resumes_on_two_ranks_and_reshards_to_one(arts, tmp_path, launch_env):
    full, cut2, cut1 = tmp_path / "full", tmp_path / "cut2", tmp_path / "cut1"
    common = ("trainer.max_steps=6", "trainer.save_every=2")
    _ok(_sft(launch_env, arts, full, *common, "parallel.dp_shard=2", nproc=2))
    ck = full / "ckpt-000002"
    assert len(list(ck.glob("*.distcp"))) == 2  # one shard file per rank
    _interrupted_copy(full, cut2, 2)
    _interrupted_copy(full, cut1, 2)
    out = _ok(_sft(launch_env, arts, cut2, *common, "parallel.dp_shard=2", nproc=2))
    assert "resumed from" in out, out[-2000:]
    a, b = _rows(full), _rows(cut2)
    assert [r["step"] for r in b] == list(range(1, 7))
    for k, v in _strip(a[-1]).items():
        assert b[-1][k] == pytest.approx(v, rel=1e-6, abs=1e-9), k
    # the same sharded checkpoint, resumed in one process (DCP reshards on load)
    _ok(_sft(launch_env, arts, cut1, *common))
    c = _rows(cut1)
    assert c[-1]["loss"] == pytest.approx(a[-1]["loss"], rel=1e-4)
