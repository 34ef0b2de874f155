"""Tensor- and pipeline-parallel PPO (``parallel.tp``, ``parallel.pp``; gloo on CPU) against one
process.

Under ``tp`` the policy, the critic, the reference and the reward model are sharded over the
tensor-parallel group; under ``pp`` the policy's layers are split over the stages for the
training passes (the critic and heads run on the last stage). Rollouts and scoring run on a
gathered replica of the trained modules, or (``rollout.tp_decode=sharded``) on the
tensor-parallel modules themselves. The tensor-parallel ranks and pipeline stages of a
data-parallel rank hold the same rows, so a TP=2 or PP=2 run draws the same samples as one
process, and its metrics must match it:

* PP=2: bit for bit, every logged number but the timings. Each stage runs the one-process
  operations on the same micro-batches; the tied embedding's gradient is summed micro-batch by
  micro-batch in the one-process order (``parallel.pp_tied_grads=micro_batch``), the clip norm
  reduces per-tensor norms in the one-process parameter order, and the rollout replica's
  value head reads the trained head's bits.
* TP=2: rel 1e-4, abs 1e-5 on every logged number. The row-parallel products (``o_proj``,
  ``down_proj``) sum two partial dot products across the group where one process sums one,
  and the tensor-parallel reference / reward passes do the same: float32 reassociation, about
  1e-7 relative per product, grown to a few 1e-6 after a few Adam updates (measured: at most
  4e-6 absolute over 2 iterations). The samples stay the same as long as no draw lands within
  that distance of a category boundary, and no token's ratio or value within it of a clip
  boundary; the clip fractions count tokens past a boundary and may move by one token (abs 0.05
  at these sizes). Over longer runs a reassociated PPO run leaves the one-process trajectory
  (see docs/scaling.md: one process with AVX2 instead of AVX-512 kernels does the same).

Checkpoints of a TP or PP run resume after SIGKILL to the same last metrics line (the same layout:
bitwise the same computation), resume in one process (the model and optimizer reshard; the
sampling generator belongs to the data-parallel rank), and refuse another ``parallel.dp_shard``
with a message that names the layouts they accept.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil  # installed with peft
import pytest
from helpers import PPO_SMALL

REPO = Path(__file__).resolve().parent.parent
SMALL = PPO_SMALL
TIMING = ("time", "wall_seconds")
REL, ABS = 1e-4, 1e-5  # see the module docstring
# fractions of tokens at a clip boundary: one token whose ratio or value lands within float
# rounding of the boundary moves them by 1 / (tokens in a minibatch)
DISCRETE = {"ppo/clipfrac": 0.05, "ppo/vf_clipfrac": 0.05}


def _cmd(smoke: Path, run_dir: Path, nproc: int, *extra: str) -> list[str]:
    launcher = [sys.executable]
    if nproc > 1:
        launcher += ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
    return [
        *launcher,
        "recipes/train_ppo.py",
        f"artifacts_dir={smoke}",
        f"run_dir={run_dir}",
        *SMALL,
        *extra,
    ]


def _start(env: dict, smoke: Path, run_dir: Path, nproc: int, *extra: str) -> subprocess.Popen:
    # a session of its own: a kill takes torchrun and its workers together (a lost node)
    return subprocess.Popen(
        _cmd(smoke, run_dir, nproc, *extra),
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )


def _finish(p: subprocess.Popen, ok: bool = True) -> str:
    out, _ = p.communicate(timeout=600)
    if ok:
        assert p.returncode == 0, out[-4000:]
    return out


def _run(env: dict, smoke: Path, run_dir: Path, nproc: int, *extra: str) -> str:
    return _finish(_start(env, smoke, run_dir, nproc, *extra))


def _rows(run_dir: Path) -> list[dict]:
    return [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if x]


def _assert_rows_close(a: list[dict], b: list[dict]) -> None:
    assert [r["step"] for r in a] == [r["step"] for r in b]
    for ra, rb in zip(a, b):
        assert set(ra) == set(rb), ra["step"]
        for k, v in ra.items():
            if k in TIMING or k == "step":
                continue
            tol = DISCRETE.get(k, ABS)
            assert rb[k] == pytest.approx(v, rel=REL, abs=tol), (ra["step"], k)


def _assert_rows_equal(a: list[dict], b: list[dict]) -> None:
    strip = lambda r: {k: v for k, v in r.items() if k not in TIMING}  # noqa: E731
    assert [strip(r) for r in a] == [strip(r) for r in b]


def _assert_first_minibatch_checks(rows: list[dict]) -> None:
    for r in rows:  # the rollout replica equals the sharded weights being trained
        assert r["first_minibatch_ratio"] == pytest.approx(1.0, abs=1e-5), r["step"]
        assert r["first_minibatch_approx_kl"] == pytest.approx(0.0, abs=1e-6), r["step"]


@pytest.mark.slow
@pytest.mark.parametrize(
    ("layout", "variant"),
    [
        # separate critic (a second sharded trunk) and the gold evaluation (sharded RM)
        ("tp=2", ["ppo.value_model=separate", "gold_eval_every=2", "gold_eval_prompts=8"]),
        ("tp=2", ["ppo.value_model=shared", "ppo.whiten_rewards=true"]),
        ("tp=2", ["ppo.advantage_estimator=grpo", "rollout.samples_per_prompt=4"]),
        # decoding (and the gold evaluation's sampling) with the tensor-parallel modules
        ("tp=2", ["rollout.tp_decode=sharded", "gold_eval_every=2", "gold_eval_prompts=8"]),
        # the critic runs whole on the last stage; the gold evaluation on rank 0's replica
        ("pp=2", ["ppo.value_model=separate", "gold_eval_every=2", "gold_eval_prompts=8"]),
        # LoRA: the reference is the replica with its adapter off; value head on the last stage
        ("pp=2", ["model.lora.enabled=true", "model.lora.r=4", "ppo.value_model=shared"]),
    ],
    ids=[
        "tp2-separate-critic-gold-eval",
        "tp2-shared-value-whitened-rewards",
        "tp2-grpo",
        "tp2-sharded-decode-gold-eval",
        "pp2-separate-critic-gold-eval",
        "pp2-lora-shared-value",
    ],
)
def test_ppo_model_parallel_matches_one_process(smoke, tmp_path, launch_env, layout, variant):
    one, two = tmp_path / "one", tmp_path / "two"
    n = 6 if layout == "pp=2" else 3  # bitwise runs stay together over any horizon
    steps = f"trainer.max_steps={n}"
    p1 = _start(launch_env, smoke, one, 1, steps, *variant)
    p2 = _start(launch_env, smoke, two, 2, steps, f"parallel.{layout}", *variant)
    _finish(p1)
    out = _finish(p2)
    tp, pp = ("2", "1") if layout == "tp=2" else ("1", "2")
    assert f"rank 1/2: dp_shard=1 tp={tp} pp={pp}" in out
    sharded = "rollout.tp_decode=sharded" in variant
    assert ("rollouts decode with the tensor-parallel modules" in out) == sharded
    a, b = _rows(one), _rows(two)
    assert [r["step"] for r in b] == list(range(1, n + 1))
    _assert_first_minibatch_checks(b)
    if layout == "pp=2":
        _assert_rows_equal(a, b)
    else:
        _assert_rows_close(a, b)
    if "gold_eval_every=2" in variant:
        assert "eval/gold_reward" in b[1] and "eval/proxy_reward" in b[-1]
    # rank 0 alone wrote the final (gathered) model
    assert (two / "model" / "config.json").exists() and (two / "done.json").exists()


@pytest.mark.slow
@pytest.mark.parametrize("layout", ["tp", "pp"])
def test_ppo_sigkill_resume_and_resume_under_other_layouts(smoke, tmp_path, launch_env, layout):
    full, cut = tmp_path / "full", tmp_path / "cut"
    # 6 iterations: the killed run has 4 left after its first checkpoint, so the kill lands first
    args = ("trainer.max_steps=6", "trainer.save_every=2", f"parallel.{layout}=2")
    _run(launch_env, smoke, full, 2, *args)
    ck = full / "ckpt-000002"
    assert len(list(ck.glob("*.distcp"))) == 2, "one shard per tensor-parallel rank / stage"
    written = {"dp_shard": 1, "tp": 1, "pp": 1, layout: 2}
    assert json.loads((ck / "extra.json").read_text())["state"]["layout"] == written

    # killed (torchrun and both workers) after its first checkpoint, then resumed
    p = _start(launch_env, smoke, cut, 2, *args)
    deadline = time.time() + 300
    while not list(cut.glob("ckpt-*/extra.json")) and time.time() < deadline:
        time.sleep(0.05)  # a checkpoint directory appears complete (renamed into place)
    # torchrun starts each worker in a session of its own: kill the workers, then torchrun
    for child in psutil.Process(p.pid).children(recursive=True):
        child.kill()
    os.killpg(p.pid, signal.SIGKILL)
    p.wait()
    assert list(cut.glob("ckpt-*/extra.json")), "no checkpoint before the kill"
    assert not (cut / "done.json").exists(), "the run ended before the kill"
    out = _run(launch_env, smoke, cut, 2, *args)
    assert "resumed from" in out
    a, b = _rows(full), _rows(cut)
    assert [r["step"] for r in b] == [1, 2, 3, 4, 5, 6]
    strip = lambda r: {k: v for k, v in r.items() if k not in TIMING}  # noqa: E731
    assert strip(a[-1]) == strip(b[-1])

    # the checkpoint in one process: sharded weights and optimizer state load whole
    one = tmp_path / "one"
    one.mkdir()
    shutil.copytree(ck, one / "ckpt-000002")
    (one / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in a[:2]))
    out = _run(launch_env, smoke, one, 1, "trainer.max_steps=6", "trainer.save_every=2")
    assert "resumed from" in out
    c = _rows(one)
    assert [r["step"] for r in c] == [1, 2, 3, 4, 5, 6]
    if layout == "pp":  # the pipelined update is the one-process update bit for bit
        _assert_rows_equal(a[2:], c[2:])
    else:
        _assert_rows_close(a[2:], c[2:])

    # ... and not under another data-parallel degree: the message names what it accepts
    dp2 = tmp_path / "dp2"
    dp2.mkdir()
    shutil.copytree(ck, dp2 / "ckpt-000002")
    p = _start(launch_env, smoke, dp2, 2, "trainer.max_steps=6", "parallel.dp_shard=2")
    out = _finish(p, ok=False)
    assert p.returncode != 0
    assert f"written with parallel.dp_shard=1 (tp={written['tp']}, pp={written['pp']})" in out
    assert "resumes it with parallel.dp_shard=1 and any parallel.tp and parallel.pp" in out


@pytest.mark.slow
def test_ppo_dp2_by_tp2_matches_dp2(smoke, tmp_path, launch_env):
    """4 processes (2 data-parallel x 2 tensor-parallel) against 2 data-parallel processes: the
    same rows per data-parallel rank, so the same metrics to the TP tolerance."""
    dp, dptp = tmp_path / "dp2", tmp_path / "dp2tp2"
    _run(launch_env, smoke, dp, 2, "trainer.max_steps=2", "parallel.dp_shard=2")
    out = _run(
        launch_env, smoke, dptp, 4, "trainer.max_steps=2", "parallel.dp_shard=2", "parallel.tp=2"
    )
    assert "rank 3/4: dp_shard=2 tp=2 pp=1" in out
    a, b = _rows(dp), _rows(dptp)
    _assert_first_minibatch_checks(b)
    _assert_rows_close(a, b)


def test_ppo_refuses_layouts_it_does_not_build(tmp_path):
    from rlhfstack.configs import load_config, to_object
    from rlhfstack.stages.ppo import _validate_distributed

    cfg = to_object(load_config("ppo", [f"run_dir={tmp_path}", "rollout.tp_decode=sharded"]))
    _validate_distributed(cfg, dp=1, tp=2, pp=1)  # decode with the tensor-parallel modules
    with pytest.raises(NotImplementedError, match="decode in step"):
        _validate_distributed(cfg, dp=2, tp=2, pp=1)  # FSDP2 gathers weights at every forward
    with pytest.raises(NotImplementedError, match="rollout.tp_decode=replica"):
        _validate_distributed(cfg, dp=1, tp=2, pp=2)  # the stages hold parts of the policy
    _validate_distributed(cfg, dp=2, tp=1, pp=1)  # no tensor parallelism: the choice is moot
    _validate_distributed(cfg, dp=1, tp=1, pp=2)  # pipelined training, rollouts on a replica
    tis = [
        "rollout.tp_decode=sharded",
        "ppo.rollout_is=token_tis",
        "ppo.logprobs_from_rollout=false",
    ]
    cfg = to_object(load_config("ppo", [f"run_dir={tmp_path}", *tis]))
    with pytest.raises(ValueError, match="no engine gap to correct"):
        _validate_distributed(cfg, dp=1, tp=2, pp=1)
