"""Checkpoints under pipeline parallelism (``parallel.pp=2``, gloo on CPU).

Each stage writes the weights and optimizer state it trains (heads it holds but never runs are
frozen on that stage and left out of its shard). A run resumed from its checkpoint under the
same layout ends with the same last metrics line as an uninterrupted one (the same computation,
bit for bit); the same checkpoint resumes in one process (the shards merge by name) with the
loss within float rounding (the pipelined and the one-process passes sum in another order).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
TIMING = ("time", "wall_seconds")


def _sft(env: dict, arts: Path, run_dir: Path, nproc: int, *extra: str) -> str:
    launcher = [sys.executable]
    if nproc > 1:
        launcher += ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
    cmd = [
        *launcher,
        "recipes/train_sft.py",
        "+experiment=demo",
        f"artifacts_dir={arts}",
        f"run_dir={run_dir}",
        "trainer.max_steps=4",
        "trainer.save_every=2",
        "trainer.batch_size=8",
        "trainer.micro_batch_size=2",
        "trainer.eval_every=0",
        "logging.tensorboard=false",
        "logging.plots=false",
        "cluster.num_threads=1",
        *extra,
    ]
    p = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, (p.stdout + p.stderr)[-4000:]
    return p.stdout + p.stderr


def _rows(run_dir: Path) -> list[dict]:
    return [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if x]


def _from_checkpoint(src: Path, dst: Path, rows: list[dict]) -> None:
    dst.mkdir()
    shutil.copytree(src / "ckpt-000002", dst / "ckpt-000002")
    (dst / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[:2]))


@pytest.mark.slow
def test_sft_pp2_checkpoint_resumes_under_pp2_and_in_one_process(arts, tmp_path, launch_env):
    full = tmp_path / "full"
    out = _sft(launch_env, arts, full, 2, "parallel.pp=2")
    assert "rank 1/2: dp_shard=1 tp=1 pp=2" in out
    ck = full / "ckpt-000002"
    assert len(list(ck.glob("*.distcp"))) == 2, "one shard per pipeline stage"
    a = _rows(full)

    again = tmp_path / "again"
    _from_checkpoint(full, again, a)
    assert "resumed from" in _sft(launch_env, arts, again, 2, "parallel.pp=2")
    b = _rows(again)
    assert [r["step"] for r in b] == [1, 2, 3, 4]
    strip = lambda r: {k: v for k, v in r.items() if k not in TIMING}  # noqa: E731
    assert strip(a[-1]) == strip(b[-1])

    one = tmp_path / "one"
    _from_checkpoint(full, one, a)
    assert "resumed from" in _sft(launch_env, arts, one, 1)
    c = _rows(one)
    assert [r["step"] for r in c] == [1, 2, 3, 4]
    for k in ("loss", "grad_norm"):
        assert c[-1][k] == pytest.approx(a[-1][k], rel=1e-4), k
