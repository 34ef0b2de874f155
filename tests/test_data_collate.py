"""Tokenization, length filtering and padded batches (GPT-2 tokenizer + a tiny BOS tokenizer)."""

from __future__ import annotations

import functools
import json

import pytest
import torch

from rlhfstack.data import (
    IGNORE_INDEX,
    LoadReport,
    PreferenceExample,
    PromptExample,
    SFTExample,
    check_tokenizer,
    collate_preference,
    collate_prompts,
    collate_sft,
    count_long_prompts,
    encode_prompts,
    filter_by_length,
    load_preferences,
    load_sft,
    pairs_share_prompts,
    tokenize_preference,
    tokenize_sft,
)
from rlhfstack.data.loading import default_data_root

TINY_GPT2 = default_data_root() / "models" / "tiny-gpt2"
pytestmark = pytest.mark.skipif(not TINY_GPT2.is_dir(), reason="tiny-gpt2 not in the shared data")


@pytest.fixture(scope="module")
def tok():
    from transformers import AutoTokenizer

    t = AutoTokenizer.from_pretrained(str(TINY_GPT2))
    t.add_special_tokens({"pad_token": "<pad>"})
    return t


class CharTok:
    """A character tokenizer that adds BOS (like Llama); ``": "`` is merged into one token."""

    bos_token_id, eos_token_id, pad_token_id = 1, 2, 0
    bos_token, eos_token, pad_token = "<s>", "</s>", "<pad>"

    def _ids(self, text: str) -> list[int]:
        ids = []
        if text.startswith("<s>"):
            ids, text = [1], text[3:]
        i = 0
        while i < len(text):
            if text.startswith(": ", i):
                ids.append(3)
                i += 2
            else:
                ids.append(10 + ord(text[i]))
                i += 1
        return ids

    def __call__(self, text, add_special_tokens=True):
        texts = [text] if isinstance(text, str) else text
        out = [([1] if add_special_tokens else []) + self._ids(t) for t in texts]
        return {"input_ids": out[0] if isinstance(text, str) else out}


def test_check_tokenizer(tok):
    from transformers import AutoTokenizer

    raw = AutoTokenizer.from_pretrained(str(TINY_GPT2))
    with pytest.raises(ValueError, match=r"no pad_token.*add_special_tokens"):
        check_tokenizer(raw)
    raw.pad_token = raw.eos_token
    with pytest.raises(ValueError, match="pad_token .* is its eos_token"):
        tokenize_sft([SFTExample("a", "b")], raw, 16)
    check_tokenizer(tok)


def test_sft_batch(tok):
    examples = [
        SFTExample("Once upon a time", "there was a cat."),
        SFTExample("\n\nHuman: Hi\n\nAssistant:", "Hello there, my good friend!"),
    ]
    items = tokenize_sft(examples, tok, max_len=64)
    batch = collate_sft(items, tok.pad_token_id)
    lens = [len(i["input_ids"]) for i in items]
    B, T = batch["input_ids"].shape
    assert (B, T) == (2, max(lens))
    assert batch["labels"].shape == batch["attention_mask"].shape == (B, T)
    assert batch["attention_mask"].sum(1).tolist() == lens
    for b, ex in enumerate(examples):
        n_prompt = len(tok(ex.prompt)["input_ids"])
        ids, labels = batch["input_ids"][b], batch["labels"][b]
        assert ids[:n_prompt].tolist() == tok(ex.prompt)["input_ids"]
        assert (labels[:n_prompt] == IGNORE_INDEX).all()
        assert ids[lens[b] - 1] == tok.eos_token_id and labels[lens[b] - 1] == tok.eos_token_id
        assert tok.decode(ids[n_prompt : lens[b] - 1]) == " " + ex.completion
        assert (labels[n_prompt : lens[b]] == ids[n_prompt : lens[b]]).all()
        assert (ids[lens[b] :] == tok.pad_token_id).all()  # right padding
        assert (labels[lens[b] :] == IGNORE_INDEX).all()
    assert tok.decode(batch["input_ids"][0, : lens[0] - 1]) == "Once upon a time there was a cat."


def test_sft_truncation(tok):
    long_prompt = " ".join(["word"] * 100)
    items = tokenize_sft([SFTExample(long_prompt, "the end")], tok, max_len=20)
    ids, labels = items[0]["input_ids"], items[0]["labels"]
    assert len(ids) == 20 and ids[-1] == tok.eos_token_id  # prompt cut on the left
    assert sum(x != IGNORE_INDEX for x in labels) == len(tok(" the end")["input_ids"]) + 1
    items = tokenize_sft([SFTExample("Hi", " ".join(["word"] * 100))], tok, max_len=20)
    ids = items[0]["input_ids"]
    assert len(ids) == 20 and ids[-1] != tok.eos_token_id  # response cut: no EOS
    assert ids[0] == tok("Hi")["input_ids"][0]


def test_bos_added_once_and_boundary_fallback():
    t = CharTok()
    assert encode_prompts(t, ["ab", "<s>ab"]) == [[1, 107, 108], [1, 107, 108]]
    # "A:" + " B" merges ": " across the boundary -> the response is tokenized on its own
    item = tokenize_sft([SFTExample("A:", "B")], t, max_len=16)[0]
    assert item["input_ids"] == [1, 75, 68, 42, 76, 2]
    assert item["labels"] == [IGNORE_INDEX] * 3 + [42, 76, 2]
    # left truncation keeps BOS
    batch = collate_prompts(["abcdef"], t, max_prompt_len=3)
    assert batch["input_ids"].tolist() == [[1, 111, 112]]


def test_preference_batch(tok):
    pairs = [
        PreferenceExample("\n\nHuman: Q\n\nAssistant:", "A long and detailed answer.", "No."),
        PreferenceExample(
            "\n\nHuman: Another question here\n\nAssistant:", "Yes.", "Maybe so, who knows"
        ),
    ]
    items = tokenize_preference(pairs, tok, max_len=64)
    batch = collate_preference(items, tok.pad_token_id)
    shapes = {v.shape for v in batch.values()}
    assert len(shapes) == 1  # chosen and rejected share [B, T]
    for b, ex in enumerate(pairs):
        n_prompt = len(tok(ex.prompt)["input_ids"])
        for name in ("chosen", "rejected"):
            ids = batch[f"{name}_input_ids"][b]
            mask = batch[f"{name}_loss_mask"][b]
            att = batch[f"{name}_attention_mask"][b]
            n = int(att.sum())
            assert att[:n].all() and not att[n:].any()
            assert not mask[:n_prompt].any() and mask[n_prompt:n].all() and not mask[n:].any()
            assert ids[n - 1] == tok.eos_token_id and (ids[n:] == tok.pad_token_id).all()
            assert tok.decode(ids[n_prompt : n - 1]) == " " + getattr(ex, name)


def test_truncated_pairs_keep_one_prompt_for_both_rows(tok):
    """A pair over max_len: both rows keep the same prompt tokens (cut as for the longer
    response, the prompt keeping its end), each ends in EOS within max_len."""
    long_prompt = "\n\nHuman: " + " ".join(f"w{i}" for i in range(40)) + "\n\nAssistant:"
    pairs = [PreferenceExample(long_prompt, "short", " ".join(["long"] * 30))]
    full = tokenize_preference(pairs, tok, max_len=512)[0]
    item = tokenize_preference(pairs, tok, max_len=40)[0]
    assert pairs_share_prompts([item])
    n_c = item["chosen_loss_mask"].index(1)
    assert n_c == item["rejected_loss_mask"].index(1) < full["chosen_loss_mask"].index(1)
    # the prompt kept its end: the last prompt tokens are those of the full prompt
    n_full = full["chosen_loss_mask"].index(1)
    assert item["chosen_input_ids"][1:n_c] == full["chosen_input_ids"][n_full - n_c + 1 : n_full]
    assert item["chosen_input_ids"][n_c:] == full["chosen_input_ids"][n_full:]  # short: whole
    assert item["chosen_input_ids"][-1] == tok.eos_token_id
    # the long response fills max_len: its start is kept, its end (and EOS) cut
    rej = item["rejected_input_ids"]
    assert len(rej) == 40 and rej[n_c:] == full["rejected_input_ids"][n_full : n_full + 40 - n_c]


def test_pairs_share_prompts_and_the_shared_prompt_switch(tok):
    from rlhfstack.distributed import ParallelState
    from rlhfstack.training import shared_prompt_pad

    pairs = [PreferenceExample("\n\nHuman: Q\n\nAssistant:", "A long and detailed answer.", "No.")]
    items = tokenize_preference(pairs, tok, max_len=64)
    assert pairs_share_prompts(items)
    # a prompt that differs in one token, and one cut to a different length
    changed = dict(
        items[0],
        rejected_input_ids=[items[0]["rejected_input_ids"][0] + 1]
        + items[0]["rejected_input_ids"][1:],
    )
    shorter = dict(items[0], rejected_loss_mask=[1] + items[0]["rejected_loss_mask"][1:])
    assert not pairs_share_prompts([*items, changed])
    assert not pairs_share_prompts([shorter])
    one, two = ParallelState(), ParallelState(rank=0, world_size=2, dp=2)
    assert shared_prompt_pad(True, 7, [changed], one) == 7  # one process: batch-wise fallback
    assert shared_prompt_pad(True, 7, items, two) == 7
    assert shared_prompt_pad(True, 7, [*items, changed], two) is None  # ranks must agree
    assert shared_prompt_pad(True, 7, items, ParallelState(world_size=2, tp=2)) is None
    assert shared_prompt_pad(False, 7, items, one) is None


def test_prompts_left_padded(tok):
    prompts = [PromptExample("Hi"), "Once upon a time there was"]
    batch = collate_prompts(prompts, tok, max_prompt_len=4)
    ids, att = batch["input_ids"], batch["attention_mask"]
    n_hi = len(tok("Hi")["input_ids"])
    assert ids.shape == att.shape == (2, 4)
    assert att[0].tolist() == [0] * (4 - n_hi) + [1] * n_hi
    assert (ids[0, : 4 - n_hi] == tok.pad_token_id).all()
    assert ids[1].tolist() == tok("Once upon a time there was")["input_ids"][-4:]


def test_count_long_prompts_counts_exactly_the_prompts_collate_cuts():
    t = CharTok()  # BOS + one id per character
    prompts = ["ab", "abc", PromptExample("abcd"), "<s>abcdef"]
    assert count_long_prompts(prompts, t, 4) == 2  # "abcd" and "abcdef": 5 and 7 ids with BOS
    batch = collate_prompts(prompts, t, max_prompt_len=4)
    full = encode_prompts(t, [p if isinstance(p, str) else p.prompt for p in prompts])
    kept = [
        [i for i, m in zip(row, mask) if m]
        for row, mask in zip(batch["input_ids"].tolist(), batch["attention_mask"].tolist())
    ]
    assert sum(k != f for k, f in zip(kept, full)) == 2
    assert kept[3] == [1, 110, 111, 112]  # BOS, then the last tokens: the start is dropped
    assert count_long_prompts(prompts, t, 7) == 0


def test_filter_by_length(tok):
    examples = [
        SFTExample("short", "short"),
        SFTExample(" ".join(["long"] * 50), "short"),
        SFTExample("short", " ".join(["long"] * 50)),
    ]
    kept, n = filter_by_length(examples, tok, max_prompt_tokens=10, max_response_tokens=10)
    assert kept == examples[:1] and n == 2
    report = LoadReport(read=3, kept=3)
    kept, n = filter_by_length(examples, tok, 10, None, report=report)
    assert n == 1 and report.filtered_too_long == 1 and report.kept == 2
    assert filter_by_length(examples, tok, None, None) == (examples, 0)
    # the limits are exact: a kept example is never truncated with max_len = sum of limits
    pairs = [PreferenceExample("Q" * k, "a " * k, "b " * (2 * k)) for k in range(1, 12)]
    kept, n = filter_by_length(pairs, tok, 6, 12)
    assert 0 < len(kept) < len(pairs) and n == len(pairs) - len(kept)
    for item in tokenize_preference(kept, tok, max_len=18):
        assert item["chosen_input_ids"][-1] == tok.eos_token_id
        assert item["rejected_input_ids"][-1] == tok.eos_token_id


def test_loaders_filter_and_report(tok, tmp_path):
    path = tmp_path / "p.jsonl"
    rows = [
        {"prompt": "P", "chosen": "a", "rejected": "b"},
        {"prompt": "P", "chosen": "x " * 40, "rejected": "b"},
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    pairs, report = load_preferences(
        path, tokenizer=tok, max_prompt_tokens=16, max_response_tokens=8
    )
    assert len(pairs) == 1 and report.filtered_too_long == 1 and report.kept == 1
    assert "filtered as too long 1" in report.summary()
    sft, report = load_sft(path, tokenizer=tok, max_response_tokens=8, template="plain")
    assert [e.completion for e in sft] == ["a"] and report.filtered_too_long == 1


def test_dataloader_integration(tok):
    examples = [SFTExample(f"Prompt {i}", "word " * (i + 1)) for i in range(6)]
    items = tokenize_sft(examples, tok, max_len=32)
    loader = torch.utils.data.DataLoader(
        items, batch_size=4, collate_fn=functools.partial(collate_sft, pad_id=tok.pad_token_id)
    )
    batches = list(loader)
    assert [b["input_ids"].shape[0] for b in batches] == [4, 2]
    assert all(b["input_ids"].dtype == torch.long for b in batches)
