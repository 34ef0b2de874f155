"""Every file an eval entry point reads reports a problem with its file, line and field.

The readers all go through :func:`rlhfstack.data.map_records` (the data loaders' reader), so a
bad line reads ``path:LINE: field 'x': ...`` as in the training data loaders.
"""

from __future__ import annotations

import gzip
import json
import subprocess
import sys
from pathlib import Path

import pytest

from rlhfstack.configs.evaluation import RewardHackingConfig
from rlhfstack.data import DataError
from rlhfstack.evaluation.detectors import load_completions, load_xstest, read_gold_proxy
from rlhfstack.evaluation.jobs.reward_hacking import run_reward_hacking
from rlhfstack.evaluation.judges import load_judge_prompt
from rlhfstack.evaluation.overopt import read_kl_rewards
from rlhfstack.evaluation.rm_probes import read_xstest_safe
from rlhfstack.evaluation.winrate import load_samples

REPO = Path(__file__).resolve().parents[1]
GOOD = json.dumps({"prompt": "p", "completion": "c"})


def _lines(path: Path, *lines: str) -> Path:
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def _located(info: pytest.ExceptionInfo, path: Path, line: int | None, field: str | None) -> str:
    err = info.value
    assert isinstance(err, DataError) and isinstance(err, ValueError)
    assert (err.path, err.line, err.field) == (str(path.resolve()), line, field), str(err)
    prefix = f"{path.resolve()}:{line}" if line is not None else f"{path.resolve()}"
    assert str(err).startswith(prefix), str(err)
    if field:
        assert f"field '{field}':" in str(err)
    return str(err)


# --------------------------------------------------------------------------- reward_hacking samples
def test_completions_bad_json_names_file_and_line(tmp_path):
    # a blank line before the bad one: the line number counts it
    path = _lines(tmp_path / "s.jsonl", GOOD, "", '{"prompt": "p", "completion": ', GOOD)
    with pytest.raises(DataError) as info:
        load_completions(path)
    assert "invalid JSON" in _located(info, path, 3, None)


@pytest.mark.parametrize(
    ("record", "field", "reason"),
    [
        ({"prompt": "p", "completion": 5}, "completion", "bad_type"),
        ({"prompt": "p", "completion": None}, "completion", "null_field"),
        ({"prompt": 3, "completion": "c"}, "prompt", "bad_type"),
        ({"output": ["a"]}, "output", "bad_type"),
    ],
)
def test_completions_non_string_is_an_error_with_field(tmp_path, record, field, reason):
    path = _lines(tmp_path / "s.jsonl", GOOD, json.dumps(record))
    with pytest.raises(DataError) as info:
        load_completions(path)
    _located(info, path, 2, field)
    assert info.value.reason == reason


def test_completions_gz_and_json_list_locations(tmp_path):
    gz = tmp_path / "s.jsonl.gz"
    with gzip.open(gz, "wt", encoding="utf-8") as f:
        f.write(GOOD + "\n" + json.dumps({"completion": 7}) + "\n")
    with pytest.raises(DataError) as info:
        load_completions(gz)
    _located(info, gz, 2, "completion")
    listed = tmp_path / "s.json"
    listed.write_text('[\n  {"completion": "a"},\n  {"completion": 1.5}\n]\n')
    with pytest.raises(DataError) as info:
        load_completions(listed)
    assert " (item [1]): " in _located(info, listed, 3, "completion")
    wrapped = tmp_path / "w.json"
    wrapped.write_text(json.dumps({"samples": [{"completion": "a"}, {"completion": 2}]}))
    with pytest.raises(
        DataError, match=r"w\.json \(item \[1\]\): field 'samples\[1\]\.completion'"
    ):
        load_completions(wrapped)
    assert load_completions(_lines(tmp_path / "ok.jsonl", GOOD)) == (["p"], ["c"])


def test_reward_hacking_job_reports_numeric_completion(tmp_path):
    path = _lines(tmp_path / "s.jsonl", GOOD, GOOD, json.dumps({"prompt": "p", "completion": 5}))
    cfg = RewardHackingConfig(samples=str(path), output_dir=str(tmp_path / "out"))
    with pytest.raises(DataError, match=r"s\.jsonl:3: field 'completion': expected str, got int"):
        run_reward_hacking(cfg)


@pytest.mark.slow
def test_reward_hacking_cli_names_file_and_line(tmp_path):
    path = _lines(tmp_path / "s.jsonl", GOOD, GOOD, "{not json}")
    proc = subprocess.run(
        [sys.executable, "eval/reward_hacking.py", f"samples={path}", f"output_dir={tmp_path}/o"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode != 0
    assert f"{path}:3: invalid JSON" in proc.stderr + proc.stdout


# --------------------------------------------------------------------------- the other entry points
def test_winrate_samples_errors(tmp_path):
    path = _lines(tmp_path / "a.jsonl", GOOD, json.dumps({"prompt": "p", "completion": 5}))
    with pytest.raises(DataError) as info:
        load_samples(path)
    _located(info, path, 2, "completion")
    path = _lines(tmp_path / "b.jsonl", GOOD, json.dumps({"prompt": "p"}))
    with pytest.raises(DataError, match="missing field") as info:
        load_samples(path)
    _located(info, path, 2, "completion")
    bad = {"prompt": "p", "completion": "c", "instruction_difficulty": "hard"}
    path = _lines(tmp_path / "c.jsonl", GOOD, GOOD, json.dumps(bad))
    with pytest.raises(DataError) as info:
        load_samples(path)
    _located(info, path, 3, "instruction_difficulty")
    path = _lines(tmp_path / "d.jsonl", GOOD, "[1,")
    with pytest.raises(DataError, match="invalid JSON") as info:
        load_samples(path)
    _located(info, path, 2, None)


def test_metrics_readers_name_the_bad_field(tmp_path):
    """overoptimization (kl + rewards) and reward_hacking's gold/proxy read ``metrics.jsonl``."""
    rows = [
        {"step": 1, "kl/seq_k1": 0.1, "eval/gold_reward": 0.2, "eval/proxy_reward": 0.3},
        {"step": 2, "kl/seq_k1": "0.4", "eval/gold_reward": 0.2, "eval/proxy_reward": 0.3},
    ]
    path = _lines(tmp_path / "metrics.jsonl", *map(json.dumps, rows))
    with pytest.raises(DataError) as info:
        read_kl_rewards(tmp_path)
    _located(info, path, 2, "kl/seq_k1")
    rows[1] = {"step": 2, "eval/gold_reward": "x", "eval/proxy_reward": 0.3}
    _lines(path, *map(json.dumps, rows))
    with pytest.raises(DataError) as info:
        read_gold_proxy(tmp_path)
    _located(info, path, 2, "eval/gold_reward")
    _lines(path, json.dumps(rows[0]), "{")
    with pytest.raises(DataError, match="invalid JSON") as info:
        read_gold_proxy(tmp_path)
    _located(info, path, 2, None)
    # null (a non-finite value written as null) is a missing value, not an error
    rows[1] = {"step": 2, "kl/seq_k1": None, "eval/gold_reward": None, "eval/proxy_reward": 0.3}
    _lines(path, *map(json.dumps, rows))
    assert list(read_kl_rewards(tmp_path)["step"]) == [1.0]


def test_xstest_csv_errors(tmp_path):
    path = tmp_path / "x.csv"
    path.write_text("id,prompt,type,label\n1,hi,t,safe\n2,yo,t\n")
    with pytest.raises(DataError) as info:
        load_xstest(path)
    _located(info, path, 3, "label")
    with pytest.raises(DataError) as info:
        read_xstest_safe(path)
    _located(info, path, 3, "label")
    path.write_text("id,prompt,type\n1,hi,t\n")
    with pytest.raises(DataError, match="missing field") as info:
        read_xstest_safe(path)
    _located(info, path, 2, "label")


def test_judge_prompt_file_errors(tmp_path):
    path = _lines(
        tmp_path / "judge_prompts.jsonl",
        json.dumps({"name": "single-v1", "prompt_template": "x"}),
        '{"name": "pair-v2", ',
    )
    with pytest.raises(DataError, match="invalid JSON") as info:
        load_judge_prompt(path)
    _located(info, path, 2, None)
    _lines(path, json.dumps({"name": "pair-v2", "prompt_template": None}))
    with pytest.raises(DataError, match="is null") as info:
        load_judge_prompt(path)
    _located(info, path, 1, "prompt_template")


def test_demo_eval_prompt_files_name_the_field(tmp_path):
    from rlhfstack.evaluation.jobs.demo import _read_prompts

    path = _lines(tmp_path / "test_prompts.jsonl", GOOD, json.dumps({"text": "p"}))
    with pytest.raises(DataError, match="missing field") as info:
        _read_prompts(path)
    _located(info, path, 2, "prompt")
    assert _read_prompts(_lines(tmp_path / "ok.jsonl", GOOD, GOOD)) == ["p", "p"]


def test_missing_file_is_named_without_the_data_root_hint(tmp_path):
    path = tmp_path / "absent.jsonl"
    with pytest.raises(FileNotFoundError) as info:
        load_samples(path)
    assert str(info.value) == f"{path}: file not found"
