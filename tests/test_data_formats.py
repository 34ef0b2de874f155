"""TRL's conversational rows (prompt-completion, preference with an explicit or implicit prompt)
and parquet files, through the same adapters and with the same ``file:line:field`` errors."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from rlhfstack.data.loading import load_preferences, load_prompts, load_sft, load_unpaired
from rlhfstack.data.schemas import DataError

SYSTEM = {"role": "system", "content": "Be kind."}
USER = {"role": "user", "content": "What color is the sky?"}
BLUE = {"role": "assistant", "content": "It is blue."}
GREEN = {"role": "assistant", "content": "Green, mostly."}
# what the chatml template makes of [SYSTEM, USER]
PROMPT = (
    "<|im_start|>system\nBe kind.<|im_end|>\n<|im_start|>user\nWhat color is the sky?<|im_end|>\n"
    "<|im_start|>assistant\n"
)


def _jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _load(fn, path: Path, **kw):
    examples, _ = fn(str(path), data_root=".", template="chatml", **kw)
    return examples


def test_trl_conversational_prompt_completion(tmp_path):
    f = _jsonl(tmp_path / "sft.jsonl", [{"prompt": [SYSTEM, USER], "completion": [BLUE]}])
    (ex,) = _load(load_sft, f)
    assert (ex.prompt, ex.completion) == (PROMPT, "It is blue.")
    (p,) = _load(load_prompts, f)
    assert p.prompt == PROMPT
    # KTO's unpaired rows take the same conversational completion
    g = _jsonl(
        tmp_path / "kto.jsonl", [{"prompt": [SYSTEM, USER], "completion": [BLUE], "label": True}]
    )
    (u,) = _load(load_unpaired, g)
    assert (u.prompt, u.completion, u.desirable) == (PROMPT, "It is blue.", True)


def test_trl_conversational_preference_explicit_and_implicit_prompt(tmp_path):
    explicit = {"prompt": [SYSTEM, USER], "chosen": [BLUE], "rejected": [GREEN]}
    implicit = {"chosen": [SYSTEM, USER, BLUE], "rejected": [SYSTEM, USER, GREEN]}
    f = _jsonl(tmp_path / "prefs.jsonl", [explicit, implicit])
    a, b = _load(load_preferences, f)
    assert a == b
    assert (a.prompt, a.chosen, a.rejected) == (PROMPT, "It is blue.", "Green, mostly.")
    # the same files feed SFT (chosen) and PPO prompts
    assert [e.completion for e in _load(load_sft, f)] == ["It is blue.", "It is blue."]
    g = _jsonl(tmp_path / "implicit.jsonl", [implicit])
    assert [e.prompt for e in _load(load_prompts, g)] == [PROMPT]
    # UltraFeedback-style: a prompt string and whole conversations: the conversation wins
    uf = {"prompt": "What color is the sky?", "chosen": [USER, BLUE], "rejected": [USER, GREEN]}
    (u,) = _load(load_preferences, _jsonl(tmp_path / "uf.jsonl", [uf]))
    assert u.prompt == PROMPT.replace("<|im_start|>system\nBe kind.<|im_end|>\n", "")


@pytest.mark.parametrize(
    ("row", "where", "says"),
    [
        ({"prompt": [USER], "completion": [USER]}, "completion[0].role", "assistant's response"),
        ({"prompt": [USER], "completion": []}, "completion", "empty conversation"),
        ({"prompt": [BLUE], "completion": [BLUE]}, "prompt", "end with a user turn"),
        ({"prompt": [USER], "completion": [BLUE, BLUE]}, "completion", "end with a user turn"),
        ({"prompt": [USER], "completion": [{"role": "assistant"}]}, "completion[0].content", ""),
    ],
)
def test_conversational_errors_name_file_line_and_field(tmp_path, row, where, says):
    good = {"prompt": [USER], "completion": [BLUE]}
    f = _jsonl(tmp_path / "sft.jsonl", [good, good, row])
    with pytest.raises(DataError) as err:
        _load(load_sft, f)
    assert str(err.value).startswith(f"{f}:3: field '{where}':"), str(err.value)
    assert says in str(err.value)


def test_implicit_preference_with_different_conversations_is_an_error(tmp_path):
    other = {"role": "user", "content": "Something else?"}
    row = {"chosen": [SYSTEM, USER, BLUE], "rejected": [SYSTEM, other, GREEN]}
    f = _jsonl(tmp_path / "p.jsonl", [row])
    with pytest.raises(DataError, match=r"p\.jsonl:1: field 'rejected': .*differ before"):
        _load(load_preferences, f)


def test_parquet_rows_load_through_the_same_adapters(tmp_path):
    rows = [
        {"prompt": "Tell me a story.", "chosen": " Once upon a time.", "rejected": " No."},
        {"prompt": "Say hi.", "chosen": " Hi!", "rejected": " Bye."},
    ]
    f = tmp_path / "prefs.parquet"
    pq.write_table(pa.Table.from_pylist(rows), f)
    examples = _load(load_preferences, f)
    assert [(e.chosen, e.rejected) for e in examples] == [
        (" Once upon a time.", " No."),
        (" Hi!", " Bye."),
    ]
    # conversational columns (lists of structs) come back as message lists
    conv = tmp_path / "conv.parquet"
    pq.write_table(
        pa.Table.from_pylist(
            [{"prompt": [SYSTEM, USER], "chosen": [BLUE], "rejected": [GREEN]}] * 3
        ),
        conv,
    )
    assert [e.prompt for e in _load(load_preferences, conv)] == [PROMPT] * 3
    assert [e.completion for e in _load(load_sft, conv)] == ["It is blue."] * 3


def test_parquet_errors_name_file_row_and_field(tmp_path):
    rows = [{"prompt": f"p{i}", "completion": f" c{i}"} for i in range(5)]
    rows[3]["completion"] = "   "
    f = tmp_path / "sft.parquet"
    pq.write_table(pa.Table.from_pylist(rows), f)
    with pytest.raises(DataError) as err:
        _load(load_sft, f)
    assert str(err.value) == f"{f}:4: field 'completion': empty text"
    # on_error=skip counts the row instead
    examples, report = load_sft(str(f), data_root=".", on_error="skip")
    assert len(examples) == 4 and report.skipped == 1
    # a file that is not parquet
    bad = tmp_path / "bad.parquet"
    bad.write_text("not parquet")
    with pytest.raises(DataError, match=r"bad\.parquet: cannot read parquet"):
        _load(load_sft, bad)
