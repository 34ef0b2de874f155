"""PPO under ``torchrun --nproc_per_node=2 ... parallel.dp_shard=2`` (FSDP2 over gloo on CPU).

Each rank rolls out B/2 prompts on a gathered replica of the policy and trains its rows under
FSDP2, with losses normalized by the global token count. The replica must be refreshed after
every update: the first-minibatch ratio reads exactly 1 at *every* iteration only if the
rollout's log-probs came from the weights being trained.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import PPO_SMALL

REPO = Path(__file__).resolve().parent.parent
SMALL = [*PPO_SMALL, "parallel.dp_shard=2"]


def _torchrun(env: dict, smoke: Path, run_dir: Path, *extra: str) -> str:
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        "recipes/train_ppo.py",
        f"artifacts_dir={smoke}",
        f"run_dir={run_dir}",
        *SMALL,
        *extra,
    ]
    res = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, (res.stdout + res.stderr)[-4000:]
    return res.stdout + res.stderr


def _rows(run_dir: Path) -> list[dict]:
    return [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if x]


@pytest.mark.parametrize(
    "variant",
    [
        ["ppo.value_model=shared"],  # full fine-tune, value head on the policy trunk
        ["model.lora.enabled=true", "model.lora.r=4", "ppo.value_model=separate"],
        # critic-free: one group of 4 samples of a prompt per rank, no value model
        ["ppo.advantage_estimator=grpo", "rollout.samples_per_prompt=4"],
    ],
    ids=["full-shared-value", "lora-separate-critic", "grpo-no-critic"],
)
def test_ppo_fsdp2_two_ranks_invariants_and_checkpoint(smoke, tmp_path, variant, launch_env):
    run_dir = tmp_path / "dp2"
    out = _torchrun(
        launch_env, smoke, run_dir, "trainer.max_steps=3", "trainer.save_every=2", *variant
    )
    assert "rank 1/2: dp_shard=2" in out
    rows = _rows(run_dir)
    assert [r["step"] for r in rows] == [1, 2, 3]
    # policy == reference at step 1 (rollout-pass vs full-forward log-probs: float rounding)
    assert rows[0]["kl/seq_k1"] == pytest.approx(0.0, abs=1e-5)
    for r in rows:  # rollout replica == trained weights at every iteration
        assert r["first_minibatch_ratio"] == pytest.approx(1.0, abs=1e-5), r["step"]
        assert r["first_minibatch_approx_kl"] == pytest.approx(0.0, abs=1e-6), r["step"]
    assert rows[-1]["tokens"] > 0 and all(v == v for v in rows[-1].values())  # finite, not NaN
    # rank 0 alone wrote the final artifacts; the checkpoint has one shard and one RNG file per rank
    assert (run_dir / "model" / "config.json").exists() and (run_dir / "done.json").exists()
    ck = run_dir / "ckpt-000002"
    assert len(list(ck.glob("*.distcp"))) == 2 and {p.name for p in ck.glob("rank-*.json")} == {
        "rank-0.json",
        "rank-1.json",
    }
    assert not list(ck.glob("*.pt")), "checkpoint state is JSON + safetensors, nothing pickled"


@pytest.mark.slow
def test_ppo_fsdp2_resume_matches_uninterrupted(smoke, tmp_path, launch_env):
    full, cut = tmp_path / "full", tmp_path / "cut"
    _torchrun(launch_env, smoke, full, "trainer.max_steps=4", "trainer.save_every=2")
    cut.mkdir()
    shutil.copytree(full / "ckpt-000002", cut / "ckpt-000002")
    rows = _rows(full)
    (cut / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[:3]))
    out = _torchrun(launch_env, smoke, cut, "trainer.max_steps=4", "trainer.save_every=2")
    assert "resumed from" in out
    a, b = _rows(full), _rows(cut)
    assert [r["step"] for r in b] == [1, 2, 3, 4]
    timing = ("time", "wall_seconds")
    assert {k: v for k, v in a[-1].items() if k not in timing} == {
        k: v for k, v in b[-1].items() if k not in timing
    }
