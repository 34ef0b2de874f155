"""What a user reads while a run goes: records tagged with their stage (library records and a
background stage's included), one log file per stage, ``trainer.log_every`` honoured, progress
lines with rate and ETA off a terminal, each stage's closing summary, and the results table as
the last lines of ``tools/publish_report.py`` (``make demo``)."""

from __future__ import annotations

import importlib.util
import io
import json
import logging
import multiprocessing as mp
import re
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from rlhfstack import logs, pipeline, progress
from rlhfstack.runtime import CostMeter, RunLogger, read_jsonl
from rlhfstack.training import Run, stage_summary, train_loop

REPO = Path(__file__).resolve().parent.parent
#: a formatted line: [time][stage][logger][LEVEL] - message
LINE = re.compile(r"^\[[\d\- :,]+\]\[(?P<stage>[a-z_]+)\]\[(?P<name>[\w.]+)\]\[(?P<level>\w+)\] - ")


class Collect(logging.Handler):
    """Keeps (stage, logger, message) of every record it is handed, and the formatted lines."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[tuple[str, str, str]] = []
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.seen.append((record.stage, record.name, record.getMessage()))
        self.lines.append(self.format(record))


@pytest.fixture
def collect():
    """A root handler tagged by ``logs.configure_logging`` (the stage state restored after)."""
    handler = Collect()
    root = logging.getLogger()
    root.addHandler(handler)
    logs.configure_logging()
    saved = dict(logs._current)
    # start untagged: a stage run in-process by an earlier test leaves its tag set
    logs._current.update(stage=None, default=logs.DEFAULT_STAGE)
    yield handler
    logs.close_stage_log()
    logs._current.update(saved)
    root.removeHandler(handler)


def test_records_of_the_project_and_of_libraries_name_their_stage(collect, tmp_path):
    with logs.stage_context("sft"):
        logging.getLogger("rlhfstack").info("step 1/2 loss 1.0")
        logging.getLogger("transformers.modeling_utils").warning("a library warning")
    logs.set_default_stage("pipeline")
    logging.getLogger("rlhfstack.pipeline").info("between stages")
    assert collect.seen == [
        ("sft", "rlhfstack", "step 1/2 loss 1.0"),
        ("sft", "transformers.modeling_utils", "a library warning"),
        ("pipeline", "rlhfstack.pipeline", "between stages"),
    ]
    for line in collect.lines:
        assert LINE.match(line), line
    assert collect.lines[1].split(" - ")[0].endswith("[sft][transformers.modeling_utils][WARNING]")


def test_each_stage_writes_its_own_log_file(collect, tmp_path):
    path = logs.open_stage_log("rm", tmp_path / "rm")
    logging.getLogger("rlhfstack").info("rm line")
    logging.getLogger("datasets").warning("library line")
    logs.open_stage_log("ppo", tmp_path / "ppo")  # the next stage closes the previous log
    logging.getLogger("rlhfstack").info("ppo line")
    logs.close_stage_log()
    logging.getLogger("rlhfstack").info("after both")
    assert path == tmp_path / "rm" / "rm.log"
    rm_lines = path.read_text().splitlines()
    assert [LINE.match(x)["stage"] for x in rm_lines] == ["rm", "rm"]
    assert rm_lines[0].endswith("rm line") and rm_lines[1].endswith("library line")
    ppo_lines = (tmp_path / "ppo" / "ppo.log").read_text().splitlines()
    assert len(ppo_lines) == 1 and "[ppo][rlhfstack][INFO] - ppo line" in ppo_lines[0]
    assert len(collect.seen) == 4  # the console / pipeline handlers got every record


def _fake_stage(stage, scfg, command):
    """A stand-in for a stage in the background process: logs as stages do, writes done.json."""
    logs.open_stage_log(stage, scfg.run_dir)
    logging.getLogger("rlhfstack").info("step 1/1 loss 0.5")
    logging.getLogger("transformers.trainer").warning("from a library")
    Path(scfg.run_dir, "done.json").write_text("{}")
    logs.close_stage_log()


def _child(stage, scfg, queue):
    """Target of the spawned process: the pipeline's background wrapper around a fake stage."""
    pipeline._run_stage = _fake_stage
    pipeline._run_stage_child(stage, scfg, "", queue)


def test_a_background_stage_logs_into_the_pipeline_log_and_reports_its_end_at_once(
    collect, tmp_path
):
    scfg = SimpleNamespace(run_dir=str(tmp_path / "dpo"))
    logs.set_default_stage("pipeline")
    with logs.stage_context("rm"), logs.forward_from_children() as queue:
        proc = mp.get_context("spawn").Process(target=_child, args=("dpo", scfg, queue))
        proc.start()
        # "done" arrives while the process is never joined: it is logged when the stage ends
        deadline = time.monotonic() + 120
        while not any("stage dpo done" in m for _, _, m in collect.seen):
            assert time.monotonic() < deadline, collect.seen
            time.sleep(0.05)
        logging.getLogger("rlhfstack").info("foreground line")
        proc.join()
    assert proc.exitcode == 0
    background = [s for s in collect.seen if s[2] != "foreground line"]
    assert [s[0] for s in background] == ["dpo"] * len(background)  # tagged in the child
    messages = [m for _, _, m in background]
    assert "step 1/1 loss 0.5" in messages and "from a library" in messages
    assert re.fullmatch(r"== stage dpo done \(background, \d+:\d\d\)", messages[-1])
    assert ("rm", "rlhfstack", "foreground line") in collect.seen
    # the child's own log file has its records, tagged too
    own = (tmp_path / "dpo" / "dpo.log").read_text().splitlines()
    assert len(own) == 2 and all(LINE.match(x)["stage"] == "dpo" for x in own)


def _toy_run(tmp_path: Path, log_every: int) -> Run:
    trainer = SimpleNamespace(
        batch_size=2,
        micro_batch_size=2,
        save_every=0,
        lr=0.1,
        adam_betas=(0.9, 0.999),
        adam_eps=1e-8,
        weight_decay=0.0,
        warmup_steps=0,
        lr_schedule="constant",
        grad_clip=1.0,
        eval_every=3,
        log_every=log_every,
    )
    cfg = SimpleNamespace(seed=0, trainer=trainer, logging=SimpleNamespace(plots=False))
    logger = RunLogger(tmp_path, tensorboard=False)
    return Run(cfg=cfg, run_dir=tmp_path, logger=logger, cost=CostMeter(), device="cpu")


def test_train_loop_honours_log_every_in_its_lines_and_metrics(tmp_path, caplog):
    torch.manual_seed(0)
    model = nn.Linear(2, 1)
    run = _toy_run(tmp_path, log_every=4)
    with caplog.at_level(logging.INFO, logger="rlhfstack"):
        train_loop(
            run,
            params=list(model.parameters()),
            items=[torch.randn(2) for _ in range(4)],
            collate=lambda xs: {"x": torch.stack(xs)},
            loss_fn=lambda mb, n: (model(mb["x"]).pow(2).sum() / n, {}),
            max_steps=10,
            eval_fn=lambda: {"val/loss": 1.0},
        )
    lines = [r.getMessage() for r in caplog.records if r.name == "rlhfstack.progress"]
    # every 4th step and the last; each with its rate and ETA
    assert [int(re.match(r"step (\d+)/10 loss ", x)[1]) for x in lines] == [4, 8, 10]
    assert all(
        re.search(r"\[\d+%, [\d.]+ (step/s|s/step), elapsed \d+:\d\d, ETA ", x) for x in lines
    )
    # metrics rows: the same steps, plus the steps with an evaluation (eval_every=3)
    assert [r["step"] for r in read_jsonl(tmp_path / "metrics.jsonl")] == [3, 4, 6, 8, 9, 10]


class Clock:
    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


def test_progress_off_a_terminal_logs_done_total_rate_and_eta(monkeypatch, caplog):
    clock = Clock()
    monkeypatch.setattr(progress, "_now", clock)
    monkeypatch.setenv("RLHF_PROGRESS", "auto")
    monkeypatch.setattr(progress.sys, "stderr", io.StringIO())  # not a terminal: no bar
    assert not progress.bar_wanted()
    with caplog.at_level(logging.INFO, logger="rlhfstack"):
        with progress.Progress(10, "step", unit="step", every=5) as bar:
            for _ in range(10):
                clock.t += 0.5
                bar.update(loss=0.25)
        # by time: at most one line per interval, and a last one
        with progress.Progress(300, "sample", unit="sample", interval=10) as bar:
            for _ in range(3):
                clock.t += 6.0
                bar.update(100)
    assert [r.getMessage() for r in caplog.records] == [
        "step 5/10 loss 0.2500 [50%, 2 step/s, elapsed 0:02, ETA 0:02]",
        "step 10/10 loss 0.2500 [100%, 2 step/s, elapsed 0:05, ETA 0:00]",
        "sample 200/300 [67%, 16.7 sample/s, elapsed 0:12, ETA 0:06]",
        "sample 300/300 [100%, 16.7 sample/s, elapsed 0:18, ETA 0:00]",
    ]
    assert progress.format_rate(0.25, "it") == "4 s/it"
    assert progress.format_duration(3725) == "1:02:05"


def test_progress_draws_a_bar_on_a_terminal(monkeypatch, caplog):
    class Tty(io.StringIO):
        def isatty(self) -> bool:
            return True

    err = Tty()
    monkeypatch.setattr(progress.sys, "stderr", err)
    monkeypatch.delenv("RLHF_PROGRESS", raising=False)
    assert progress.bar_wanted()
    with progress.Progress(4, "step", unit="step", every=2) as bar:
        for _ in range(4):
            bar.update(loss=1.0)
    assert "step" in err.getvalue() and "4/4" in err.getvalue()  # tqdm's bar
    monkeypatch.setenv("RLHF_PROGRESS", "lines")
    assert not progress.bar_wanted()


def test_rates_are_written_without_an_exponent():
    assert progress.format_rate(1234.5, "step") == "1234 step/s"
    assert progress.format_rate(5.214, "step") == "5.21 step/s"
    assert progress.format_rate(1 / 3.4, "step") == "3.4 s/step"
    assert progress.format_rate(1 / 250.0, "step") == "250 s/step"


def test_stage_summary_names_outputs_steps_times_and_headline_metrics(tmp_path):
    run_dir = tmp_path / "rm"
    (run_dir / "model").mkdir(parents=True)
    (run_dir / "dashboard.png").write_bytes(b"")
    (run_dir / "rm.log").write_text("")
    rows = [
        {"step": 10, "loss": 0.7, "accuracy": 0.5, "grad_norm": 1.0},
        {"step": 20, "loss": 0.6, "accuracy": 0.6, "val/accuracy": 0.61, "lr": 0.0},
    ]
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    cost = {"wall_seconds": 75.4, "cpu_seconds": 3725.0, "tokens": 1234567}
    lines = stage_summary("rm", run_dir, steps=20, cost=cost, model_dir=run_dir / "model")
    assert lines == [
        "== rm done: 20 steps in 1:15 (CPU 1:02:05, 1,234,567 tokens)",
        f"   run_dir  {run_dir}",
        f"   model    {run_dir / 'model'}",
        f"   metrics  {run_dir / 'metrics.jsonl'}",
        f"   plots    {run_dir / 'dashboard.png'}",
        f"   log      {run_dir / 'rm.log'}",
        "   final    loss 0.6, accuracy 0.6, val/accuracy 0.61",
    ]


def _publish_report_main():
    spec = importlib.util.spec_from_file_location(
        "publish_report", REPO / "tools/publish_report.py"
    )
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.main


def test_publish_report_ends_with_the_results_table_and_the_report_path(tmp_path, capsys):
    art = tmp_path / "demo"
    art.mkdir()
    (art / "EVAL_REPORT.md").write_text("# report\n")
    wr = {"rate": 0.69140625, "ci95": [0.6328125, 0.74609375], "n": 256}
    results = {
        "n_prompts": 256,
        "winrate": {"ppo_vs_sft": wr, "dpo_vs_sft": {**wr, "rate": 0.5}},
        "judge_winrate": {"ppo_vs_sft": wr},
        "targets": {
            "ppo_vs_sft_rate_ge_0.65_ci_lo_gt_0.5": {
                "value": 0.6914,
                "ci95": wr["ci95"],
                "met": True,
            },
            "dpo_vs_sft_rate_ge_0.60": {"value": 0.5, "met": False},
        },
    }
    (art / "results.json").write_text(json.dumps(results))
    out = tmp_path / "EVAL_REPORT.md"
    _publish_report_main()(
        ["--artifacts", str(art), "--out", str(out), "--assets", str(tmp_path / "assets")]
    )
    printed = capsys.readouterr().out.rstrip("\n").splitlines()
    assert printed[-1] == f"Report: {out.resolve()} (plots in {tmp_path / 'assets'})"
    table = printed[-8:-1]
    assert table[0].startswith("Win-rates on the test split (256 prompts")
    assert re.fullmatch(r"  ppo vs sft +0\.691 \[0\.633, 0\.746\] \(n=256\) +0\.691 .*", table[2])
    assert re.fullmatch(r"  dpo vs sft +0\.500 \[0\.633, 0\.746\] \(n=256\) +-", table[3])
    assert table[4] == "Targets (1 of 2 met):"
    assert re.fullmatch(
        r"  ppo_vs_sft_rate_ge_0\.65_ci_lo_gt_0\.5 +0\.691 \[0\.633, 0\.746\] +met", table[5]
    )
    assert re.fullmatch(r"  dpo_vs_sft_rate_ge_0\.60 +0\.500 +MISSED", table[6])
    assert out.read_text() == "# report\n"


def test_every_stage_of_the_smoke_pipeline_writes_a_tagged_log_ending_in_its_summary(smoke):
    for stage in ("data", "sft", "rm", "ppo", "dpo", "eval"):
        lines = (smoke / stage / f"{stage}.log").read_text().splitlines()
        assert lines, stage
        for line in lines:
            m = LINE.match(line)
            assert m and m["stage"] == stage, (stage, line)
        text = "\n".join(lines)
        assert f"- == {stage} done" in text, stage
        assert f"   log      {smoke / stage / (stage + '.log')}" in text, stage
    for stage in ("sft", "rm", "ppo", "dpo"):  # where each trained model is
        assert (
            f"   model    {smoke / stage / 'model'}" in (smoke / stage / f"{stage}.log").read_text()
        )
    sft = (smoke / "sft" / "sft.log").read_text()
    assert re.search(r"step 2/2 loss [\d.]+ .*\[100%, .* ETA 0:00\]", sft)
    assert "sampling 4 completions" in (smoke / "data" / "data.log").read_text()
    ev = (smoke / "eval" / "eval.log").read_text()
    assert "Win-rates on the test split" in ev and re.search(r"Targets \(\d of 3 met\)", ev)
    assert f"report: {smoke / 'EVAL_REPORT.md'}" in ev


def test_the_llm_judge_reports_progress_after_announcing_its_requests(monkeypatch, caplog):
    from test_judges_llm import PROMPTS, A, B, FakeChatServer, _judge

    from rlhfstack.evaluation.judges import JudgmentCache

    monkeypatch.setattr(progress, "DEFAULT_INTERVAL", 0.0)  # a line per answer
    with caplog.at_level(logging.INFO, logger="rlhfstack"), FakeChatServer() as server:
        _judge(server, "longer", JudgmentCache(None)).judge(PROMPTS, A, B)
    msgs = [r.getMessage() for r in caplog.records]
    start = next(i for i, m in enumerate(msgs) if "6 judgments to request" in m)
    done = [int(m[1]) for m in (re.search(r"judgment (\d)/6 \[.*ETA ", x) for x in msgs) if m]
    assert done == [1, 2, 3, 4, 5, 6]
    assert all(i > start for i, x in enumerate(msgs) if "judgment " in x and "/6 [" in x)


def test_progress_every_n_counts_crossings_when_updates_are_larger_than_one(caplog):
    with caplog.at_level(logging.INFO, logger="rlhfstack"):
        with progress.Progress(10, "sample", every=4) as bar:
            for n in (3, 3, 3, 1):
                bar.update(n)
    done = [int(re.match(r"sample (\d+)/10 ", r.getMessage())[1]) for r in caplog.records]
    assert done == [6, 9, 10]  # past 4, past 8, the end


def test_an_evaluation_job_names_its_records_unless_a_pipeline_did(collect):
    logs.set_default_stage(logs.DEFAULT_STAGE)
    logs.tag_job("hh_eval")
    logs.tag_job("winrate")  # called inside hh_eval: the outer job's name stays
    logging.getLogger("rlhfstack.winrate").info("judging")
    assert collect.seen == [("hh_eval", "rlhfstack.winrate", "judging")]
