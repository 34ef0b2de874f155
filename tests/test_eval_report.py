"""EVAL_REPORT.md states the run's own task facts (from its resolved configs and its base model),
shows a missing value as not measured, and shows the dev split's win-rates beside the test's."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml

from rlhfstack.evaluation.report import (
    NOT_MEASURED,
    parameter_count,
    publish_report,
    render_report,
    task_facts,
    write_eval_report,
)


def _wr(rate: float, n: int) -> dict:
    return {"rate": rate, "ci95": [rate - 0.05, rate + 0.05], "n": n}


def _policy(tax: float | None) -> dict:
    ci = {"mean": 0.5, "ci95": [0.4, 0.6]}
    d = {
        "gold_reward": ci,
        "proxy_reward": ci,
        "kl_to_sft": ci,
        "sentiment": 0.3,
        "fluency": -1.5,
        "length_tokens": 30.0,
        "ended_frac": 0.7,
        "distinct_1": 0.2,
        "distinct_2": 0.6,
        "repetition_3gram": 0.01,
        "heldout_nll_per_token": 1.5,
    }
    if tax is not None:
        d["alignment_tax_nll"] = tax
    return d


@pytest.fixture
def art(tmp_path, stories_hf) -> Path:
    """A run directory with the data and eval stages' resolved configs, a base model, samples."""
    art = tmp_path / "run"
    shutil.copytree(stories_hf, art / "base_model")
    (art / "data").mkdir(parents=True)
    (art / "eval").mkdir()
    (art / "data" / "config.yaml").write_text(
        yaml.safe_dump(
            {"model": {"name": "tinystory-x", "path": str(art / "base_model")}, "flip_prob": 0.1}
        )
    )
    (art / "eval" / "config.yaml").write_text(
        yaml.safe_dump({"temperature": 0.7, "max_new_tokens": 33})
    )
    (art / "samples").mkdir()
    for n in ("sft", "ppo"):
        (art / "samples" / f"{n}.jsonl").write_text(
            json.dumps({"prompt": "Once", "completion": f"{n} text"}) + "\n"
        )
    return art


def _results(art: Path, tax: float | None) -> dict:
    return {
        "commit": "abc1234",
        "command": "pytest",
        "n_prompts": 12,
        "n_prompts_dev": 9,
        "task": task_facts(art),
        "winrate": {"ppo_vs_sft": _wr(0.7, 12)},
        "judge_winrate": {"ppo_vs_sft": _wr(0.72, 12)},
        "winrate_dev": {"ppo_vs_sft": _wr(0.81, 9)},
        "judge_winrate_dev": {"ppo_vs_sft": _wr(0.83, 9)},
        "policies": {"sft": _policy(None), "ppo": _policy(tax)},
        "rm": {
            "heldout_accuracy": 0.6,
            "heldout_accuracy_gold": None,
            "heldout_ece": 0.1,
            "normalization": {"gain": 2.0, "bias": -0.5},
        },
        "labelers": {
            "n_pairs": 10,
            "flip_prob": 0.1,
            "agreement_with_gold": {"balanced": 0.8},
            "overall_agreement": 0.8,
        },
        "cost": {"eval": {"cpu_seconds": 1.0, "wall_seconds": 1.0, "tokens": 10}},
        "targets": {},
    }


def test_parameter_count_reads_the_model(stories_hf):
    from rlhfstack.models.core import count_parameters, load_causal_lm

    n = parameter_count(stories_hf)
    assert n == count_parameters(load_causal_lm(str(stories_hf), trainable=False))
    assert parameter_count(stories_hf.parent) is None  # no weights there


def test_task_facts_come_from_the_run(art, stories_hf):
    facts = task_facts(art)
    assert facts == {
        "base_model": "tinystory-x",
        "base_model_parameters": parameter_count(stories_hf),
        "label_flip_prob": 0.1,
        "temperature": 0.7,
        "max_new_tokens": 33,
    }
    assert task_facts(art / "nothing_here") == {k: None for k in facts}


def test_report_states_the_runs_facts_not_typed_ones(art):
    text = render_report(art, _results(art, tax=0.25))
    n = parameter_count(art / "base_model")
    assert f"base model tinystory-x ({n:,} parameters)" in text
    assert "10% label noise" in text and "temperature 0.7" in text and "33 new tokens" in text
    for typed in ("260K parameters", "25% label noise", "temperature 1,"):
        assert typed not in text
    assert "+0.250" in text


def test_missing_values_show_not_measured_never_zero(art):
    text = render_report(art, _results(art, tax=None))
    tax_row = next(line for line in text.splitlines() if line.startswith("| alignment tax"))
    assert tax_row.count(NOT_MEASURED) == 2 and "0.000" not in tax_row
    assert f"against the gold reward: {NOT_MEASURED}" in text
    # a run that recorded none of the facts: not measured, not the demo's numbers
    res = _results(art, tax=0.1)
    del res["task"]
    for f in (art / "data" / "config.yaml", art / "eval" / "config.yaml"):
        f.unlink()
    shutil.rmtree(art / "base_model")
    bare = render_report(art, res)
    assert f"base model {NOT_MEASURED} ({NOT_MEASURED} parameters)" in bare
    assert f"{NOT_MEASURED}% label noise" in bare and f"temperature {NOT_MEASURED}" in bare


def test_report_shows_test_and_dev_winrates(art, tmp_path):
    text = render_report(art, _results(art, tax=0.1))
    test_at, dev_at = text.index("Test split (12 prompts"), text.index("Dev split (9 prompts")
    assert test_at < text.index("0.700 [0.650, 0.750] (n=12)") < dev_at
    assert dev_at < text.index("0.810 [0.760, 0.860] (n=9)")
    # without dev results there is no dev table
    res = _results(art, tax=0.1)
    res["winrate_dev"] = {}
    assert "Dev split" not in render_report(art, res)
    # the published copy carries the same text
    write_eval_report(art, _results(art, tax=0.1))
    publish_report(art, tmp_path / "EVAL_REPORT.md", tmp_path / "assets")
    assert "Dev split (9 prompts" in (tmp_path / "EVAL_REPORT.md").read_text()


def test_the_commit_stamp_ignores_the_published_report(tmp_path, monkeypatch):
    import subprocess

    from rlhfstack.evaluation.jobs.demo import git_commit

    def git(*args):
        subprocess.run(["git", *args], cwd=tmp_path, check=True, capture_output=True)

    git("init", "-q")
    (tmp_path / "code.py").write_text("x = 1\n")
    (tmp_path / "EVAL_REPORT.md").write_text("old\n")
    git("add", ".")
    git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "c")
    monkeypatch.chdir(tmp_path)
    head = git_commit()
    assert head != "unknown" and "uncommitted" not in head
    (tmp_path / "EVAL_REPORT.md").write_text("new\n")  # what make demo writes
    assert git_commit() == head
    (tmp_path / "code.py").write_text("x = 2\n")
    assert git_commit() == f"{head} + uncommitted changes"
