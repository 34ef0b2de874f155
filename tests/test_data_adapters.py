"""Adapters on crafted records and on the first rows of the real shared files."""

from __future__ import annotations

import gzip
import json

import pytest

from rlhfstack.data import (
    DataError,
    PreferenceExample,
    PromptExample,
    SFTExample,
    adapt,
    detect_adapter,
    get_template,
    load_preferences,
    load_prompts,
    load_sft,
    parse_hh_transcript,
    split_hh_pair,
)
from rlhfstack.data.loading import default_data_root

HH = get_template("hh")
PLAIN = get_template("plain")
CHATML = get_template("chatml")


def _pref(record, name="auto", template=HH):
    name = detect_adapter("preference", record) if name == "auto" else name
    return adapt("preference", name, record, template)


def _err(fn, *args):
    with pytest.raises(DataError) as info:
        fn(*args)
    return info.value


# --------------------------------------------------------------------------- HH-RLHF
def test_hh_single_turn():
    rec = {
        "chosen": "\n\nHuman: Hi there\n\nAssistant: Hello! How can I help?",
        "rejected": "\n\nHuman: Hi there\n\nAssistant: Go away.",
    }
    assert detect_adapter("preference", rec) == "hh"
    ex = _pref(rec)
    assert ex == PreferenceExample(
        "\n\nHuman: Hi there\n\nAssistant:", "Hello! How can I help?", "Go away."
    )
    assert HH.join(ex.prompt, ex.chosen) == rec["chosen"]


def test_hh_multi_turn_uses_last_assistant_marker():
    prefix = "\n\nHuman: A\n\nAssistant: B\n\nHuman: C\n\nAssistant:"
    ex = _pref({"chosen": prefix + "  good", "rejected": prefix + " bad"})
    assert ex == PreferenceExample(prefix, "good", "bad")


def test_hh_divergent_prefix_uses_longest_common_prefix_at_marker():
    common = "\n\nHuman: Q\n\nAssistant:"
    chosen = common + " Sure.\n\nAssistant: More text"  # response contains a marker
    rejected = common + " No."
    ex = _pref({"chosen": chosen, "rejected": rejected})
    assert ex.prompt == common
    assert ex.chosen == "Sure.\n\nAssistant: More text" and ex.rejected == "No."


def test_hh_errors():
    err = _err(split_hh_pair, "\n\nHuman: a\n\nAssistant: b", "no markers here")
    assert (err.field, err.reason) == ("rejected", "bad_format")
    err = _err(split_hh_pair, "\n\nHuman: a\n\nAssistant: b", "X\n\nHuman: z\n\nAssistant: c")
    assert err.field == "rejected" and "no conversation prefix" in str(err)
    err = _err(
        _pref, {"chosen": "\n\nHuman: a\n\nAssistant: ", "rejected": "\n\nHuman: a\n\nAssistant: b"}
    )
    assert (err.field, err.reason) == ("chosen", "empty_text")


def test_hh_rerendered_with_other_template():
    rec = {
        "chosen": "\n\nHuman: A\n\nAssistant: B\n\nHuman: C\n\nAssistant: D",
        "rejected": "\n\nHuman: A\n\nAssistant: B\n\nHuman: C\n\nAssistant: E",
    }
    ex = _pref(rec, template=CHATML)
    assert ex.prompt == (
        "<|im_start|>user\nA<|im_end|>\n<|im_start|>assistant\nB<|im_end|>\n"
        "<|im_start|>user\nC<|im_end|>\n<|im_start|>assistant\n"
    )
    assert (ex.chosen, ex.rejected) == ("D", "E")


def test_parse_hh_transcript():
    msgs = parse_hh_transcript("\n\nHuman: A\n\nAssistant: B\n\nHuman: C\n\nAssistant:")
    assert msgs == [
        {"role": "user", "content": "A"},
        {"role": "assistant", "content": "B"},
        {"role": "user", "content": "C"},
    ]
    assert HH.render_prompt(msgs) == "\n\nHuman: A\n\nAssistant: B\n\nHuman: C\n\nAssistant:"


def test_hh_for_sft_and_prompts():
    rec = {"chosen": "\n\nHuman: Q\n\nAssistant: yes", "rejected": "\n\nHuman: Q\n\nAssistant: no"}
    assert detect_adapter("sft", rec) == "hh" and detect_adapter("prompt", rec) == "hh"
    assert adapt("sft", "hh", rec, HH) == SFTExample("\n\nHuman: Q\n\nAssistant:", "yes")
    assert adapt("prompt", "hh", rec, HH) == PromptExample("\n\nHuman: Q\n\nAssistant:")


# --------------------------------------------------------------------------- UltraFeedback / plain
def test_ultrafeedback_message_lists():
    rec = {
        "prompt": "Write a haiku",
        "chosen": [
            {"role": "user", "content": "Write a haiku"},
            {"role": "assistant", "content": "Leaves fall"},
        ],
        "rejected": [
            {"role": "user", "content": "Write a haiku"},
            {"role": "assistant", "content": "No"},
        ],
    }
    assert detect_adapter("preference", rec) == "ultrafeedback"
    ex = _pref(rec)
    assert ex == PreferenceExample("\n\nHuman: Write a haiku\n\nAssistant:", "Leaves fall", "No")
    assert _pref(rec, template=PLAIN).prompt == "Write a haiku"


def test_ultrafeedback_errors():
    u = {"role": "user", "content": "Q"}
    rec = {"chosen": [u, {"role": "assistant", "content": "A"}], "rejected": [{"role": "user", "content": "other"}, {"role": "assistant", "content": "B"}]}  # fmt: skip
    assert _err(_pref, rec, "ultrafeedback").field == "rejected"
    rec = {"chosen": [u, {"role": "assistant", "content": "A"}], "rejected": [u]}
    err = _err(_pref, rec, "ultrafeedback")
    assert (err.field, err.reason) == ("rejected[0].role", "bad_format")
    rec = {
        "chosen": [u, {"role": "assistant"}],
        "rejected": [u, {"role": "assistant", "content": "B"}],
    }
    assert _err(_pref, rec, "ultrafeedback").field == "chosen[1].content"


def test_plain_records():
    assert _pref({"prompt": "P", "chosen": "a", "rejected": "b"}) == PreferenceExample(
        "\n\nHuman: P\n\nAssistant:", "a", "b"
    )
    rec = {"prompt": "Once upon a time", "completion": "there was a cat."}
    assert detect_adapter("sft", rec) == "plain"
    assert adapt("sft", "plain", rec, PLAIN) == SFTExample("Once upon a time", "there was a cat.")
    assert adapt("prompt", "plain", {"prompt": "Once"}, PLAIN) == PromptExample("Once")
    # an already-rendered HH prompt is not wrapped twice
    rendered = "\n\nHuman: P\n\nAssistant:"
    assert adapt("sft", "plain", {"prompt": rendered, "completion": "c"}, HH).prompt == rendered
    # SFT from a preference record trains on the chosen response
    assert adapt(
        "sft", "plain", {"prompt": "P", "chosen": "a", "rejected": "b"}, PLAIN
    ) == SFTExample("P", "a")


# --------------------------------------------------------------------------- Alpaca
def test_alpaca():
    rec = {"instruction": "Translate to French.", "input": "Hello", "output": "Bonjour"}
    assert detect_adapter("sft", rec) == "alpaca"
    ex = adapt("sft", "alpaca", rec, HH)
    assert ex == SFTExample("\n\nHuman: Translate to French.\n\nHello\n\nAssistant:", "Bonjour")
    no_input = adapt(
        "sft", "alpaca", {"instruction": "Say hi.", "input": "", "output": "Hi"}, PLAIN
    )
    assert no_input == SFTExample("Say hi.", "Hi")
    with_history = {
        "instruction": "And 3+3?",
        "output": "6",
        "history": [["2+2?", "4"]],
        "system": "Be brief.",
    }
    assert adapt("sft", "alpaca", with_history, HH).prompt == (
        "Be brief.\n\nHuman: 2+2?\n\nAssistant: 4\n\nHuman: And 3+3?\n\nAssistant:"
    )
    err = _err(adapt, "sft", "alpaca", {"instruction": "x", "input": ""}, HH)
    assert (err.field, err.reason) == ("output", "missing_field")
    assert adapt("prompt", "alpaca", rec, PLAIN) == PromptExample("Translate to French.\n\nHello")


# --------------------------------------------------------------------------- ShareGPT / messages
SHAREGPT = {
    "conversations": [
        {"from": "human", "value": "Hi"},
        {"from": "gpt", "value": "Hello"},
        {"from": "human", "value": "Tell a joke"},
    ],
    "chosen": {"from": "gpt", "value": "Why did the chicken..."},
    "rejected": {"from": "gpt", "value": "No."},
}


def test_sharegpt_preference():
    assert detect_adapter("preference", SHAREGPT) == "sharegpt"
    ex = _pref(SHAREGPT)
    assert ex.prompt == "\n\nHuman: Hi\n\nAssistant: Hello\n\nHuman: Tell a joke\n\nAssistant:"
    assert (ex.chosen, ex.rejected) == ("Why did the chicken...", "No.")
    with_system = {
        **SHAREGPT,
        "conversations": [{"from": "system", "value": "S"}, *SHAREGPT["conversations"]],
    }
    assert _pref(with_system, template=CHATML).prompt.startswith(
        "<|im_start|>system\nS<|im_end|>\n"
    )


def test_sharegpt_sft_and_errors():
    rec = {"conversations": [{"from": "human", "value": "Q"}, {"from": "gpt", "value": "A"}]}
    assert detect_adapter("sft", rec) == "sharegpt"
    assert adapt("sft", "sharegpt", rec, HH) == SFTExample("\n\nHuman: Q\n\nAssistant:", "A")
    assert adapt("prompt", "sharegpt", rec, PLAIN) == PromptExample("Q")
    bad = {"conversations": [{"from": "human", "value": "Q"}]}
    assert _err(adapt, "sft", "sharegpt", bad, HH).reason == "bad_format"
    bad = {"conversations": [{"from": "alien", "value": "Q"}, {"from": "gpt", "value": "A"}]}
    assert _err(adapt, "sft", "sharegpt", bad, HH).field == "conversations[0].from"
    bad = {**SHAREGPT, "chosen": {"from": "gpt"}}
    assert _err(_pref, bad).field == "chosen.value"


def test_null_is_named_null_not_missing():
    """JSON null is reported as null (reason ``null_field``), apart from an absent key."""
    err = _err(adapt, "sft", "alpaca", {"instruction": "x", "output": None}, HH)
    assert (err.field, err.reason, err.detail) == ("output", "null_field", "is null")
    assert "field 'output': is null" in str(err)
    bad = {**SHAREGPT, "chosen": {"from": "gpt", "value": None}}
    err = _err(_pref, bad)
    assert (err.field, err.reason) == ("chosen.value", "null_field")
    bad = {"messages": [{"role": "user", "content": None}, {"role": "assistant", "content": "A"}]}
    err = _err(adapt, "sft", "messages", bad, PLAIN)
    assert (err.field, err.reason) == ("messages[0].content", "null_field")
    absent = _err(adapt, "sft", "alpaca", {"instruction": "x"}, HH)
    assert absent.reason == "missing_field" and "missing field" in str(absent)


def test_messages_format():
    rec = {"messages": [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "A"}]}
    assert detect_adapter("sft", rec) == "messages"
    assert adapt("sft", "messages", rec, PLAIN) == SFTExample("Q", "A")


def test_prompt_sources():
    assert (
        adapt(
            "prompt",
            detect_adapter("prompt", {"turns": ["T1", "T2"]}),
            {"turns": ["T1", "T2"]},
            PLAIN,
        ).prompt
        == "T1"
    )
    arena = {"turns": [{"content": "C1"}]}
    assert adapt("prompt", "turns", arena, PLAIN).prompt == "C1"
    assert detect_adapter("prompt", {"goal": "g", "target": "t"}) == "field:goal"
    assert adapt("prompt", "field:goal", {"goal": "g"}, PLAIN).prompt == "g"
    err = _err(detect_adapter, "prompt", {"x": 1})
    assert "field:NAME" in str(err)


# --------------------------------------------------------------------------- real shared files
ROOT = default_data_root()
needs_data = pytest.mark.skipif(
    not (ROOT / "preference").is_dir(), reason=f"no shared data at {ROOT}"
)


@needs_data
def test_real_hh_rows_reconstruct_transcripts():
    path = ROOT / "preference/hh-rlhf_harmless-base_1812.jsonl.gz"
    with gzip.open(path, "rt", encoding="utf-8") as f:
        raw = [json.loads(next(f)) for _ in range(20)]
    pairs, report = load_preferences(path, max_records=20)
    assert report.adapter == "hh" and len(pairs) == 20
    for rec, ex in zip(raw, pairs):
        assert ex.prompt.startswith("\n\nHuman:") and ex.prompt.endswith("\n\nAssistant:")
        assert HH.join(ex.prompt, ex.chosen).strip() == rec["chosen"].strip()
        assert HH.join(ex.prompt, ex.rejected).strip() == rec["rejected"].strip()


@needs_data
def test_real_ultrafeedback_rows():
    path = ROOT / "preference/ultrafeedback_binarized_sample_train1000.jsonl"
    with open(path, encoding="utf-8") as f:
        raw = [json.loads(next(f)) for _ in range(10)]
    pairs, report = load_preferences(path, adapter="ultrafeedback", max_records=10)
    assert len(pairs) == 10
    for rec, ex in zip(raw, pairs):
        assert ex.prompt == HH.render_prompt(rec["prompt"])
        assert (ex.chosen, ex.rejected) == (rec["chosen"], rec["rejected"])


@needs_data
def test_real_sharegpt_dpo_rows():
    path = ROOT / "preference/llamafactory_dpo_en_demo.json"
    raw = json.loads(path.read_text(encoding="utf-8"))[:10]
    pairs, report = load_preferences(path, max_records=10)
    assert report.adapter == "sharegpt" and len(pairs) == 10
    for rec, ex in zip(raw, pairs):
        assert ex.prompt.endswith(rec["conversations"][-1]["value"] + "\n\nAssistant:")
        assert (ex.chosen, ex.rejected) == (rec["chosen"]["value"], rec["rejected"]["value"])


@needs_data
def test_real_alpaca_rows():
    path = ROOT / "sft/llamafactory_alpaca_en_demo.json"
    raw = json.loads(path.read_text(encoding="utf-8"))[:10]
    examples, report = load_sft(path, max_records=10, template="plain")
    assert report.adapter == "alpaca" and len(examples) == 10
    for rec, ex in zip(raw, examples):
        assert ex.prompt.startswith(rec["instruction"]) and ex.completion == rec["output"]
        assert (rec["input"] in ex.prompt) if rec["input"] else ex.prompt == rec["instruction"]


@needs_data
@pytest.mark.parametrize(
    "rel,adapter",
    [
        ("eval_prompts/mt_bench_question.jsonl", "turns"),
        ("eval_prompts/arena_hard_v0.1_question.jsonl", "turns"),
        ("safety/advbench_harmful_behaviors.csv", "field:goal"),
        ("safety/xstest_prompts.csv", "plain"),
        ("eval_prompts/alpaca_eval_805_text_davinci_003_outputs.json", "alpaca"),
        ("benchmarks/gsm8k/test.jsonl", "field:question"),
    ],
)
def test_real_prompt_files(rel, adapter):
    prompts, report = load_prompts(rel, max_records=5)
    assert report.adapter == adapter and len(prompts) == 5
    assert all(p.prompt.endswith("\n\nAssistant:") for p in prompts)
