"""tools/compare_runs.py: two runs' metrics.jsonl, step by step, timings aside."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def _tool():
    spec = importlib.util.spec_from_file_location("compare_runs", REPO / "tools/compare_runs.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _run(path: Path, rows: list[dict]) -> Path:
    path.mkdir()
    lines = [json.dumps({"event": "start"})] + [json.dumps(r) for r in rows]  # a stepless row
    (path / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    return path


ROWS = [
    {"step": 1, "loss": 0.5, "ppo/clipfrac": 0.0, "tokens": 100.0, "time": 1.0},
    {"step": 2, "loss": 0.25, "ppo/clipfrac": 0.01, "tokens": 120.0, "time": 2.0},
]


def test_equal_runs_match_exactly_whatever_their_timings(tmp_path, capsys):
    a = _run(tmp_path / "a", ROWS)
    b = _run(tmp_path / "b", [{**r, "time": r["time"] * 3, "wall_seconds": 9.0} for r in ROWS])
    assert _tool().main([str(a), str(b)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out == ["step 1: equal", "step 2: equal", "last lines (step 2): match exactly"]


def test_a_last_bit_difference_fails_exact_and_passes_a_tolerance(tmp_path, capsys):
    a = _run(tmp_path / "a", ROWS)
    b = _run(tmp_path / "b", [ROWS[0], {**ROWS[1], "loss": 0.25 + 1e-7}])
    tool = _tool()
    assert tool.main([str(a), str(b)]) == 1
    out = capsys.readouterr().out
    assert "step 1: equal" in out and "max |diff| 1e-07 (loss)" in out
    assert "last lines (step 2): do not match exactly" in out
    assert tool.main([str(a), str(b), "--rel", "1e-4", "--abs", "1e-5"]) == 0
    assert "match to rel 0.0001 / abs 1e-05" in capsys.readouterr().out
    # the tolerance is per value: a large relative gap in a small number is not hidden
    c = _run(tmp_path / "c", [ROWS[0], {**ROWS[1], "ppo/clipfrac": 0.02}])
    assert tool.main([str(a), str(c), "--rel", "1e-4", "--abs", "1e-5"]) == 1


def test_other_samples_and_missing_keys_do_not_match(tmp_path, capsys):
    a = _run(tmp_path / "a", ROWS)
    b = _run(tmp_path / "b", [ROWS[0], {k: v for k, v in ROWS[1].items() if k != "loss"}])
    assert _tool().main([str(a), str(b), "--rel", "1"]) == 1
    assert "keys on one side only: loss" in capsys.readouterr().out


def test_unreadable_input_names_the_file_and_line(tmp_path, capsys):
    a = _run(tmp_path / "a", ROWS)
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "metrics.jsonl").write_text(json.dumps(ROWS[0]) + "\n{not json\n")
    assert _tool().main([str(a), str(bad)]) == 2
    assert f"{bad / 'metrics.jsonl'}:2: not JSON" in capsys.readouterr().err
    assert _tool().main([str(a), str(tmp_path / "nowhere")]) == 2
