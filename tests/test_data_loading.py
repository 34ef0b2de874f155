"""File reading, malformed-input errors (file, line, field), skip mode, paths, hub source."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest

from rlhfstack.data import (
    DataError,
    DataFileNotFoundError,
    LoadReport,
    PreferenceExample,
    load_preferences,
    load_prompts,
    load_records,
    load_sft,
    resolve_data_path,
)
from rlhfstack.data import loading as loading_mod

RECORDS = [
    {"prompt": "What is 2+2?", "chosen": "4", "rejected": "5"},
    {"prompt": "Name a color.", "chosen": "Blue.", "rejected": "Seven."},
    {"prompt": 'Say hi, "quoted"\nacross lines', "chosen": "Hi!", "rejected": "No."},
]


def _write(path: Path, data: bytes) -> Path:
    if path.name.endswith(".gz"):
        with gzip.open(path, "wb") as f:
            f.write(data)
    else:
        path.write_bytes(data)
    return path


def _jsonl(records) -> bytes:
    return "".join(json.dumps(r) + "\n" for r in records).encode()


def _csv(records, sep=",") -> bytes:
    import csv
    import io

    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(records[0]), delimiter=sep)
    w.writeheader()
    w.writerows(records)
    return buf.getvalue().encode()


@pytest.mark.parametrize(
    "name,encode",
    [
        ("d.jsonl", _jsonl),
        ("d.jsonl.gz", _jsonl),
        ("d.json", lambda r: json.dumps(r, indent=2).encode()),
        ("d.json.gz", lambda r: json.dumps(r).encode()),
        ("lines.json", _jsonl),  # a ".json" file holding JSON lines
        ("d.csv", _csv),
        ("d.csv.gz", _csv),
        ("d.tsv", lambda r: _csv(r, "\t")),
    ],
)
def test_formats_read_the_same_records(tmp_path, name, encode):
    path = _write(tmp_path / name, encode(RECORDS))
    assert load_records(path) == RECORDS
    pairs, report = load_preferences(path, template="plain")
    assert pairs[2] == PreferenceExample(RECORDS[2]["prompt"], "Hi!", "No.")
    assert (report.read, report.kept, report.skipped) == (3, 3, 0)


def test_fmt_overrides_suffix(tmp_path):
    path = _write(tmp_path / "data.txt", _jsonl(RECORDS))
    with pytest.raises(DataError, match="pass fmt="):
        load_records(path)
    assert load_records(path, fmt="jsonl") == RECORDS


# --------------------------------------------------------------------------- malformed input
GOOD = json.dumps(RECORDS[0])
MALFORMED = {
    # case: (line 2 content, field, reason, text in message)
    "bad_json": (b'{"prompt": "a", "chosen": "b", ', None, "bad_json", "invalid JSON"),
    "missing_field": (b'{"prompt": "a", "chosen": "b"}', "rejected", "missing_field", "missing"),
    # a key present with the value null is named as null, not as a missing field
    "null_field": (b'{"prompt": "a", "chosen": null, "rejected": "c"}', "chosen", "null_field", "is null"),
    "empty_text": (b'{"prompt": "a", "chosen": "  ", "rejected": "c"}', "chosen", "empty_text", "empty text"),
    "identical": (b'{"prompt": "a", "chosen": "same", "rejected": "same "}', "rejected", "identical_pair", "identical"),
    "non_utf8": (b'{"prompt": "caf\xe9", "chosen": "b", "rejected": "c"}', "prompt", "bad_utf8", "0xe9"),
    "wrong_type": (b'{"prompt": "a", "chosen": 3, "rejected": "c"}', "chosen", "bad_type", "string"),
    "not_object": (b'["a", "b"]', None, "bad_record", "JSON object"),
}  # fmt: skip


def _malformed_file(tmp_path: Path, bad_line: bytes) -> Path:
    data = GOOD.encode() + b"\n" + bad_line + b"\n\n" + GOOD.encode() + b"\n"
    return _write(tmp_path / "x.jsonl", data)


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_malformed_raises_with_file_line_field(tmp_path, case):
    bad, field, reason, text = MALFORMED[case]
    path = _malformed_file(tmp_path, bad)
    with pytest.raises(DataError) as info:
        load_preferences(path, adapter="plain")
    err = info.value
    assert (err.path, err.line, err.field, err.reason) == (str(path), 2, field, reason)
    prefix = f"{path}:2: field '{field}':" if field else f"{path}:2:"
    assert str(err).startswith(prefix), str(err)
    assert text in str(err)
    assert isinstance(err, ValueError)


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_malformed_skip_mode_counts_reason(tmp_path, case):
    bad, field, reason, _ = MALFORMED[case]
    path = _malformed_file(tmp_path, bad)
    pairs, report = load_preferences(path, adapter="plain", on_error="skip")
    assert len(pairs) == 2
    assert report.read == 3 and report.kept == 2
    assert report.skipped_by_reason == {reason: 1}
    assert report.messages and report.messages[0].startswith(f"{path}:2:")
    assert "skipped 1" in report.summary() and reason in report.summary()


def test_auto_detection_errors_also_located(tmp_path):
    path = _malformed_file(tmp_path, b'{"prompt": "a", "chosen": "", "rejected": "c"}')
    with pytest.raises(DataError, match=r"x\.jsonl:2: field 'chosen': empty text"):
        load_preferences(path)


def test_json_list_reports_line_and_item(tmp_path):
    records = [
        {"instruction": "Add 1 and 1.", "input": "", "output": "2"},
        {"instruction": "Add 2 and 2.", "input": "", "output": "4"},
        {"instruction": "Add 3 and 3.", "input": ""},
    ]
    path = _write(tmp_path / "a.json", json.dumps(records, indent=2).encode())
    text = path.read_text()
    line = text[: text.index('"Add 3')].count("\n")  # the line of the item's opening "{"
    with pytest.raises(DataError) as info:
        load_sft(path)
    assert str(info.value).startswith(f"{path}:{line} (item [2]): field 'output': missing field")
    examples, report = load_sft(path, on_error="skip")
    assert len(examples) == 2 and report.skipped_by_reason == {"missing_field": 1}


def test_json_list_non_utf8_is_skippable(tmp_path):
    data = b'[{"prompt": "ok", "completion": "fine"},\n {"prompt": "bad \xff", "completion": "x"}]'
    path = _write(tmp_path / "u.json", data)
    with pytest.raises(
        DataError, match=r"u\.json:2 \(item \[1\]\): field 'prompt': invalid UTF-8 byte 0xff"
    ):
        load_sft(path)
    examples, report = load_sft(path, on_error="skip")
    assert len(examples) == 1 and report.skipped_by_reason == {"bad_utf8": 1}


def test_json_list_syntax_error_always_raises(tmp_path):
    path = _write(tmp_path / "s.json", b'[\n {"prompt": "a", "completion": "b"},\n {"prompt": }\n]')
    for on_error in ("raise", "skip"):
        with pytest.raises(DataError) as info:
            load_sft(path, on_error=on_error)
        assert info.value.line == 3 and info.value.reason == "bad_json"


def test_csv_errors_name_line_and_column(tmp_path):
    data = b'prompt,completion\n"multi\nline prompt",ok\nsecond,\nthird,caf\xc3\xa9\nfourth,\xff\n'
    path = _write(tmp_path / "c.csv", data)
    with pytest.raises(DataError, match=r"c\.csv:4: field 'completion': empty text"):
        load_sft(path)
    examples, report = load_sft(path, on_error="skip", template="plain")
    assert [e.completion for e in examples] == ["ok", "café"]
    assert report.skipped_by_reason == {"empty_text": 1, "bad_utf8": 1}
    assert any(
        m.startswith(f"{path}:6: field 'completion': invalid UTF-8") for m in report.messages
    )


def test_missing_file_always_raises(tmp_path):
    for on_error in ("raise", "skip"):
        with pytest.raises(DataFileNotFoundError) as info:
            load_sft(tmp_path / "nope.jsonl", on_error=on_error)
        assert isinstance(info.value, FileNotFoundError) and isinstance(info.value, DataError)
        assert "nope.jsonl" in str(info.value)


def test_corrupt_gzip_raises(tmp_path):
    path = tmp_path / "broken.jsonl.gz"
    path.write_bytes(b"not gzip at all")
    with pytest.raises(DataError, match="cannot read file"):
        load_sft(path, on_error="skip")


def test_no_usable_examples_raises_with_summary(tmp_path):
    path = _write(tmp_path / "e.jsonl", b'{"prompt": "", "completion": "x"}\n')
    with pytest.raises(DataError, match="no usable sft examples") as info:
        load_sft(path, on_error="skip")
    assert "empty_text=1" in str(info.value)


def test_undetectable_format_lists_fields(tmp_path):
    path = _write(tmp_path / "w.jsonl", b'{"foo": "a", "bar": "b"}\n')
    with pytest.raises(
        DataError, match=r"cannot detect the sft format from fields \['bar', 'foo'\]"
    ):
        load_sft(path)


def test_bad_arguments(tmp_path):
    path = _write(tmp_path / "d.jsonl", _jsonl(RECORDS))
    with pytest.raises(ValueError, match="on_error"):
        load_preferences(path, on_error="ignore")
    with pytest.raises(ValueError, match="unknown preference adapter"):
        load_preferences(path, adapter="nope")


def test_max_records_and_report_invariant(tmp_path):
    path = _malformed_file(tmp_path, b'{"prompt": "a", "chosen": "b"}')
    pairs, report = load_preferences(path, on_error="skip", max_records=2)
    assert report.read == 2 and len(pairs) == 1
    assert report.read == report.kept + report.skipped + report.filtered_too_long


def test_load_report_summary_truncates_messages():
    r = LoadReport(source="s.jsonl", adapter="plain", read=10, kept=2)
    for i in range(8):
        r.add_skip("empty_text", f"s.jsonl:{i}: field 'x': empty text")
    s = r.summary()
    assert s.splitlines()[0] == "s.jsonl [adapter=plain]: read 10, kept 2, skipped 8 (empty_text=8)"
    assert "... and 3 more" in s


# --------------------------------------------------------------------------- paths
def test_resolve_data_path(tmp_path, monkeypatch):
    assert resolve_data_path(tmp_path / "a.jsonl") == tmp_path / "a.jsonl"
    assert resolve_data_path("x/a.jsonl", data_root=tmp_path) == tmp_path / "x/a.jsonl"
    assert resolve_data_path("hf://org/name:test") == "hf://org/name:test"
    monkeypatch.setenv("RLHF_DATA_ROOT", str(tmp_path))
    assert resolve_data_path("a.jsonl") == tmp_path / "a.jsonl"
    monkeypatch.delenv("RLHF_DATA_ROOT")
    expected = (
        Path(loading_mod.__file__).resolve().parents[2] / ".." / "shared" / "data"
    ).resolve()
    assert resolve_data_path("a.jsonl") == expected / "a.jsonl"


def test_relative_paths_use_data_root(tmp_path, monkeypatch):
    _write(tmp_path / "p.jsonl", b'{"prompt": "Once upon a time"}\n')
    monkeypatch.setenv("RLHF_DATA_ROOT", str(tmp_path))
    prompts, _ = load_prompts("p.jsonl", template="plain")
    assert prompts[0].prompt == "Once upon a time"


def test_hub_source_goes_through_load_dataset(monkeypatch):
    import datasets

    calls = []

    def fake_load_dataset(name, split):
        calls.append((name, split))
        return [
            {"prompt": "hi", "chosen": "a", "rejected": "b"},
            {"prompt": "x", "chosen": "", "rejected": "c"},
        ]

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    pairs, report = load_preferences("hf://org/prefs:test", on_error="skip", template="plain")
    assert calls == [("org/prefs", "test")]
    assert pairs == [PreferenceExample("hi", "a", "b")]
    assert report.messages == ["hf://org/prefs:test (item [1]): field 'chosen': empty text"]
    load_prompts("hf://org/prefs")
    assert calls[-1] == ("org/prefs", "train")


def test_to_hf_dataset():
    from rlhfstack.data import to_hf_dataset

    ds = to_hf_dataset([PreferenceExample("p", "a", "b"), PreferenceExample("q", "c", "d")])
    assert ds.column_names == ["prompt", "chosen", "rejected"] and ds[1]["chosen"] == "c"


# --------------------------------------------------------------------------- real shared files
DATA_ROOT = loading_mod.default_data_root()
needs_data = pytest.mark.skipif(
    not (DATA_ROOT / "preference").is_dir(), reason=f"shared data not found at {DATA_ROOT}"
)


@needs_data
def test_real_hh_file_skip_and_raise():
    pairs, report = load_preferences(
        "preference/hh-rlhf_harmless-base_1812.jsonl.gz", on_error="skip"
    )
    assert report.adapter == "hh" and report.read == 1812
    assert report.skipped_by_reason == {"empty_text": 4} and len(pairs) == 1808
    with pytest.raises(
        DataError, match=r"hh-rlhf_harmless-base_1812\.jsonl\.gz:69: field 'chosen': empty text"
    ):
        load_preferences("preference/hh-rlhf_harmless-base_1812.jsonl.gz")


@needs_data
def test_real_ultrafeedback_file():
    path = "preference/ultrafeedback_binarized_sample_train1000.jsonl"
    pairs, report = load_preferences(path, adapter="ultrafeedback", on_error="skip")
    assert report.read == 1000 and len(pairs) == 994
    assert report.skipped_by_reason == {"empty_text": 2, "identical_pair": 4}


def test_data_error_pickles_with_attributes():
    import pickle

    err = DataError("empty text", path="x.jsonl", line=3, field="chosen", reason="empty_text")
    back = pickle.loads(pickle.dumps(err))
    assert str(back) == "x.jsonl:3: field 'chosen': empty text"
    assert (back.line, back.field, back.reason) == (3, "chosen", "empty_text")
