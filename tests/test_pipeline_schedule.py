"""The concurrent pipeline scheduler (``jobs=2``) with stand-in stages: stages run in order in
the pipeline's process, and a later stage whose inputs are finished starts in the background
(never more than ``jobs`` at once); a failing stage stops the others; a preempted stage stops
the pipeline with status 0."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from rlhfstack import pipeline
from rlhfstack.configs import load_config, to_object

DURATION = {"data": 1, "sft": 1, "rm": 3, "ppo": 3, "dpo": 4, "eval": 1}  # in is_alive() polls


class FakeStage:
    """Finishes after DURATION[stage] polls; writes done.json unless told to fail / be preempted."""

    def __init__(self, stage, scfg, log, outcome):
        self.stage, self.run_dir = stage, Path(scfg.run_dir)
        self.left = DURATION[stage]
        self.log, self.outcome, self.exitcode, self.terminated = log, outcome, None, False

    def is_alive(self):
        if self.exitcode is not None:
            return False
        self.left -= 1
        if self.left > 0 and not self.terminated:
            return True
        self.exitcode = {"bg-fail": 3}.get(self.outcome, 0)
        if self.outcome == "ok" and not self.terminated:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            (self.run_dir / "done.json").write_text(json.dumps({"stage": self.stage}))
        self.log.append(("end", self.stage))
        return False

    def join(self):  # like Process.join: returns once the stage has ended
        while self.is_alive():
            pass

    def terminate(self):
        self.terminated = True
        self.log.append(("terminated", self.stage))


def _run(tmp_path, monkeypatch, outcomes=None, jobs=2, log=None):
    log = [] if log is None else log
    outcomes = outcomes or {}
    live: list[FakeStage] = []
    peak = [0]

    def background() -> int:
        return sum(1 for h in live if h.exitcode is None)

    def spawn(stage, scfg, command):
        log.append(("start", stage))
        live.append(FakeStage(stage, scfg, log, outcomes.get(stage, "ok")))
        peak[0] = max(peak[0], background() + 1)  # + the stage running in the foreground
        return live[-1]

    def run_stage(stage, scfg, command=""):  # the foreground: polls the background once
        log.append(("start", stage))
        for h in live:
            h.is_alive()
        if outcomes.get(stage) == "fail":
            raise RuntimeError(f"stage {stage} blew up")
        run_dir = Path(scfg.run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "done.json").write_text("{}")
        log.append(("end", stage))

    monkeypatch.setattr(pipeline, "run_stage", run_stage)
    cfg = to_object(load_config("pipeline", [f"artifacts_dir={tmp_path}", f"jobs={jobs}"]))
    pipeline.run_pipeline(cfg, spawn=spawn)
    return log, peak[0]


def test_dpo_trains_beside_rm_and_ppo_and_eval_waits_for_all(tmp_path, monkeypatch):
    log, peak = _run(tmp_path, monkeypatch)
    starts = [s for e, s in log if e == "start"]
    assert starts == ["data", "sft", "dpo", "rm", "ppo", "eval"]
    pos = {e: i for i, e in enumerate(log)}
    assert pos[("end", "sft")] < pos[("start", "dpo")] < pos[("start", "rm")]
    assert pos[("start", "rm")] < pos[("end", "dpo")]  # DPO trained beside RM
    assert pos[("start", "eval")] > max(pos[("end", "ppo")], pos[("end", "dpo")])
    assert peak == 2


def test_jobs_1_runs_everything_in_order_in_process(tmp_path, monkeypatch):
    log, peak = _run(tmp_path, monkeypatch, jobs=1)
    assert [s for e, s in log if e == "start"] == ["data", "sft", "rm", "ppo", "dpo", "eval"]


def test_failing_background_stage_stops_the_pipeline(tmp_path, monkeypatch):
    log: list[tuple[str, str]] = []
    with pytest.raises(RuntimeError, match="stage dpo failed"):
        _run(tmp_path, monkeypatch, outcomes={"dpo": "bg-fail"}, log=log)
    assert ("start", "eval") not in log


def test_failing_foreground_stage_terminates_the_background(tmp_path, monkeypatch):
    log: list[tuple[str, str]] = []
    with pytest.raises(RuntimeError, match="rm blew up"):
        _run(tmp_path, monkeypatch, outcomes={"rm": "fail"}, log=log)
    assert ("terminated", "dpo") in log


def test_preempted_background_stage_stops_the_pipeline_with_status_0(tmp_path, monkeypatch):
    with pytest.raises(SystemExit) as e:
        _run(tmp_path, monkeypatch, outcomes={"dpo": "preempted"})
    assert e.value.code == 0
    assert not (tmp_path / "eval" / "done.json").exists()
