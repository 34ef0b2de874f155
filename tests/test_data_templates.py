"""Chat templates: rendering, idempotence, tokenizer templates, prompt/response joining."""

from __future__ import annotations

from pathlib import Path

import pytest

from rlhfstack.data import ChatTemplate, get_template, join_prompt_response
from rlhfstack.data.loading import default_data_root

MSGS = [
    {"role": "system", "content": "Be nice."},
    {"role": "user", "content": "Hi"},
    {"role": "assistant", "content": "Hello"},
    {"role": "user", "content": "Bye"},
]


def test_hh():
    t = get_template("hh")
    assert t.render_prompt("Hi") == "\n\nHuman: Hi\n\nAssistant:"
    assert (
        t.render_prompt(MSGS)
        == "Be nice.\n\nHuman: Hi\n\nAssistant: Hello\n\nHuman: Bye\n\nAssistant:"
    )
    assert "\n\nHuman:" in t.stop_strings
    rendered = t.render_prompt("Hi")
    assert t.render_prompt(rendered) == rendered  # idempotent


def test_plain_is_identity():
    t = get_template("plain")
    assert t.render_prompt("Once upon a time") == "Once upon a time"
    assert t.render_prompt([{"role": "user", "content": "Once"}]) == "Once"


def test_chatml():
    t = get_template("chatml")
    out = t.render_prompt([{"role": "human", "content": "Hi"}])
    assert out == "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    assert t.render_prompt(out) == out


def test_prompt_must_end_with_user():
    with pytest.raises(ValueError, match="must end with a user message"):
        get_template("hh").render_prompt(MSGS[:3])
    with pytest.raises(ValueError, match="unknown message role"):
        get_template("hh").render_prompt([{"role": "robot", "content": "x"}])


def test_unknown_template():
    with pytest.raises(ValueError, match="unknown chat template"):
        get_template("vicuna")
    t = ChatTemplate("hh")
    assert get_template(t) is t


TINY_GPT2 = default_data_root() / "models" / "tiny-gpt2"


@pytest.mark.skipif(not Path(TINY_GPT2).is_dir(), reason="tiny-gpt2 not in the shared data")
def test_tokenizer_template():
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(TINY_GPT2))
    with pytest.raises(ValueError, match="needs a tokenizer that has a chat_template"):
        get_template("tokenizer", tok)
    tok.chat_template = (
        "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}</{{ m['role'] }}>{% endfor %}"
        "{% if add_generation_prompt %}<assistant>{% endif %}"
    )
    t = get_template("tokenizer", tok)
    assert t.render_prompt("Hi") == "<user>Hi</user><assistant>"


def test_join_prompt_response():
    assert join_prompt_response("\n\nAssistant:", "Hi") == "\n\nAssistant: Hi"
    assert join_prompt_response("\n\nAssistant:", " Hi") == "\n\nAssistant: Hi"
    assert join_prompt_response("<|im_start|>assistant\n", "Hi") == "<|im_start|>assistant\nHi"
    assert join_prompt_response("Once upon a time", "there was") == "Once upon a time there was"
    assert join_prompt_response("", "x") == "x"
