"""Adapters: one raw record (a dict) -> one typed example.

Each adapter validates the fields it reads and raises :class:`DataError` (without a file
location; the loader adds it) naming the field and the reason. Prompts are rendered with the
:class:`ChatTemplate` passed in, except HH-RLHF transcripts under the ``"hh"`` template, which
are kept verbatim (they already are HH prompts).

Supported formats (``adapter=`` name; ``"auto"`` picks by the record's fields):

=============== ============================================================ ==============
name            record                                                       kinds
=============== ============================================================ ==============
hh              ``{chosen, rejected}`` full "\\n\\nHuman: .. \\n\\nAssistant: .." texts  pref, sft, prompt
ultrafeedback   ``{prompt?, chosen: [{role, content}..], rejected: [..]}``    pref, sft, prompt
                (without ``prompt``: TRL's implicit-prompt rows, the
                conversation before the last reply is the prompt)
plain           ``{prompt, completion}`` / ``{prompt, chosen, rejected}`` /   all
                ``{prompt}`` (strings, or TRL's conversational rows: message
                lists ``[{role, content}..]``; chosen / rejected / completion
                end with the assistant's reply)
alpaca          ``{instruction, input?, output, system?, history?}``          sft, prompt
sharegpt        ``{conversations: [{from, value}..], chosen?, rejected?,      all
                system?}``
messages        ``{messages: [{role, content}..]}``                           sft, prompt
turns           ``{turns: [str, ..]}`` (MT-Bench style; first turn)           prompt
field:NAME      any record; the prompt is ``record[NAME]``                    prompt
=============== ============================================================ ==============

For SFT, a preference record (``hh``/``ultrafeedback``/``plain``/``sharegpt`` with
``chosen``) yields ``SFTExample(prompt, completion=chosen)``.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from typing import Any, Literal

from .schemas import (
    DataError,
    Example,
    PreferenceExample,
    PromptExample,
    SFTExample,
    UnpairedExample,
)
from .templates import HH_ASSISTANT, ChatTemplate, normalize_role

__all__ = [
    "Kind",
    "ADAPTERS",
    "detect_adapter",
    "adapt",
    "get_adapter",
    "validate_example",
    "split_hh_pair",
    "parse_hh_transcript",
    "require_field",
]

Kind = Literal["sft", "preference", "prompt", "unpaired"]


# --------------------------------------------------------------------------- field access
def _require(record: Mapping[str, Any], key: str, field: str | None = None) -> Any:
    """``record[key]``; a key that is absent and a key whose value is JSON ``null`` are told apart
    (``missing field`` vs ``is null``), both located at ``field``."""
    field = field or key
    if key not in record:
        present = ", ".join(sorted(map(str, record.keys()))) or "none"
        raise DataError(
            f"missing field (record has: {present})", field=field, reason="missing_field"
        )
    if record[key] is None:
        raise DataError("is null", field=field, reason="null_field")
    return record[key]


def require_field(
    record: Any, key: str, expected: type | tuple[type, ...], *, optional: bool = False
) -> Any:
    """``record[key]`` checked to be an ``expected`` instance (``bool`` never passes for a
    number). Raises :class:`DataError` naming ``key``: ``bad_record`` when ``record`` is not a
    JSON object, ``missing_field`` / ``null_field`` (unless ``optional``, then None is
    returned), ``bad_type``. For records of a file the caller adds the location
    (:func:`rlhfstack.data.loading.map_records` does)."""
    if not isinstance(record, Mapping):
        raise DataError(f"expected a JSON object, got {type(record).__name__}", reason="bad_record")
    if optional and record.get(key) is None:
        return None
    value = _require(record, key)
    types = expected if isinstance(expected, tuple) else (expected,)
    if not isinstance(value, types) or (isinstance(value, bool) and bool not in types):
        names = " or ".join(t.__name__ for t in types)
        raise DataError(
            f"expected {names}, got {type(value).__name__} ({value!r:.40})",
            field=key,
            reason="bad_type",
        )
    return value


def _text(value: Any, field: str) -> str:
    if value is None:
        raise DataError("is null", field=field, reason="null_field")
    if not isinstance(value, str):
        raise DataError(
            f"expected a string, got {type(value).__name__}", field=field, reason="bad_type"
        )
    if not value.strip():
        raise DataError("empty text", field=field, reason="empty_text")
    return value


def _req_text(record: Mapping[str, Any], key: str) -> str:
    return _text(_require(record, key), key)


def _opt_text(record: Mapping[str, Any], key: str) -> str:
    value = record.get(key)
    if value is None:
        return ""
    if not isinstance(value, str):
        raise DataError(
            f"expected a string, got {type(value).__name__}", field=key, reason="bad_type"
        )
    return value


def _messages(
    value: Any, field: str, role_key: str = "role", content_key: str = "content"
) -> list[dict[str, str]]:
    """Validate a list of chat messages; returns ``[{"role", "content"}]`` with normalized roles."""
    if not isinstance(value, list):
        raise DataError(
            f"expected a list of messages, got {type(value).__name__}",
            field=field,
            reason="bad_type",
        )
    if not value:
        raise DataError("empty conversation", field=field, reason="empty_text")
    out = []
    for i, msg in enumerate(value):
        where = f"{field}[{i}]"
        if not isinstance(msg, Mapping):
            raise DataError(
                f"expected a message object, got {type(msg).__name__}",
                field=where,
                reason="bad_type",
            )
        role = _require(msg, role_key, f"{where}.{role_key}")
        try:
            role = normalize_role(role)
        except ValueError as e:
            raise DataError(str(e), field=f"{where}.{role_key}", reason="bad_format") from None
        content = _text(
            _require(msg, content_key, f"{where}.{content_key}"), f"{where}.{content_key}"
        )
        out.append({"role": role, "content": content})
    return out


def _check_prompt_turns(msgs: list[dict[str, str]], field: str) -> list[dict[str, str]]:
    if not msgs or msgs[-1]["role"] != "user":
        last = msgs[-1]["role"] if msgs else "nothing"
        raise DataError(
            f"the prompt conversation must end with a user turn, it ends with {last}",
            field=field,
            reason="bad_format",
        )
    return msgs


def _render(template: ChatTemplate, prompt: str | list[dict[str, str]], field: str) -> str:
    try:
        return template.render_prompt(prompt)
    except ValueError as e:
        raise DataError(str(e), field=field, reason="bad_format") from None


# --------------------------------------------------------------------------- HH-RLHF
_HH_TURN = re.compile(r"\n\n(Human|Assistant):")


def split_hh_pair(chosen: str, rejected: str) -> tuple[str, str, str]:
    """Split two HH transcripts into ``(prompt, chosen_response, rejected_response)``.

    The prompt is everything up to and including the last ``"\\n\\nAssistant:"`` marker and
    must be the same for both; if it is not (a response that itself contains the marker, or
    transcripts that diverge earlier), the longest common prefix ending at a marker is used.
    Responses have leading whitespace removed.
    """
    for name, text in (("chosen", chosen), ("rejected", rejected)):
        if HH_ASSISTANT not in text:
            raise DataError(
                "not an HH transcript: no '\\n\\nAssistant:' marker",
                field=name,
                reason="bad_format",
            )
    i = chosen.rfind(HH_ASSISTANT) + len(HH_ASSISTANT)
    j = rejected.rfind(HH_ASSISTANT) + len(HH_ASSISTANT)
    if chosen[:i] == rejected[:j]:
        prompt = chosen[:i]
    else:
        n = 0
        limit = min(len(chosen), len(rejected))
        while n < limit and chosen[n] == rejected[n]:
            n += 1
        k = chosen.rfind(HH_ASSISTANT, 0, n)
        if k < 0:
            raise DataError(
                "chosen and rejected share no conversation prefix ending at '\\n\\nAssistant:'",
                field="rejected",
                reason="bad_format",
            )
        prompt = chosen[: k + len(HH_ASSISTANT)]
    return prompt, chosen[len(prompt) :].lstrip(), rejected[len(prompt) :].lstrip()


def parse_hh_transcript(text: str) -> list[dict[str, str]]:
    """Parse ``"\\n\\nHuman: a\\n\\nAssistant: b..."`` into messages (an empty final
    ``Assistant:`` turn, i.e. the generation slot, is dropped; text before the first marker
    becomes a system message)."""
    pieces = _HH_TURN.split(text)
    msgs: list[dict[str, str]] = []
    if pieces[0].strip():
        msgs.append({"role": "system", "content": pieces[0].strip()})
    for speaker, content in zip(pieces[1::2], pieces[2::2]):
        role = "user" if speaker == "Human" else "assistant"
        msgs.append({"role": role, "content": content.strip()})
    if msgs and msgs[-1]["role"] == "assistant" and not msgs[-1]["content"]:
        msgs.pop()
    return msgs


def _hh_prompt(prompt: str, template: ChatTemplate) -> str:
    if template.name == "hh":
        return prompt
    msgs = parse_hh_transcript(prompt)
    if any(not m["content"] for m in msgs):
        raise DataError("HH transcript has an empty turn", field="chosen", reason="empty_text")
    return _render(template, _check_prompt_turns(msgs, "chosen"), "chosen")


def _pref_hh(record: Mapping[str, Any], template: ChatTemplate) -> PreferenceExample:
    chosen, rejected = _req_text(record, "chosen"), _req_text(record, "rejected")
    prompt, c, r = split_hh_pair(chosen, rejected)
    return PreferenceExample(_hh_prompt(prompt, template), c, r)


def _prompt_hh(record: Mapping[str, Any], template: ChatTemplate) -> PromptExample:
    chosen = _req_text(record, "chosen")
    if isinstance(record.get("rejected"), str):
        prompt = split_hh_pair(chosen, record["rejected"])[0]
    else:
        k = chosen.rfind(HH_ASSISTANT)
        if k < 0:
            raise DataError(
                "not an HH transcript: no '\\n\\nAssistant:' marker",
                field="chosen",
                reason="bad_format",
            )
        prompt = chosen[: k + len(HH_ASSISTANT)]
    return PromptExample(_hh_prompt(prompt, template))


# --------------------------------------------------------------------------- prompt/chosen/rejected
def _response(value: Any, field: str) -> tuple[list[dict[str, str]] | None, str]:
    """A response given as a string or as a message list ending with the assistant reply."""
    if isinstance(value, str):
        return None, _text(value, field)
    if not isinstance(value, list):
        raise DataError(
            f"expected a string or a list of messages, got {type(value).__name__}",
            field=field,
            reason="bad_type",
        )
    msgs = _messages(value, field)
    if msgs[-1]["role"] != "assistant":
        raise DataError(
            f"the last message must be the assistant's response, got {msgs[-1]['role']}",
            field=f"{field}[{len(msgs) - 1}].role",
            reason="bad_format",
        )
    return msgs[:-1], msgs[-1]["content"]


def _prompt_value(record: Mapping[str, Any], template: ChatTemplate) -> str:
    value = _require(record, "prompt")
    if isinstance(value, list):
        return _render(
            template, _check_prompt_turns(_messages(value, "prompt"), "prompt"), "prompt"
        )
    return _render(template, _text(value, "prompt"), "prompt")


def _prompt_and_reply(
    record: Mapping[str, Any], key: str, template: ChatTemplate
) -> tuple[list[dict[str, str]] | str, str]:
    """The prompt (messages, or a string) and the reply of ``record[key]``: a string, or a message
    list ending with the assistant's reply (TRL's conversational rows). When that list holds
    messages before the reply, they are the whole prompt (TRL's implicit-prompt preference rows;
    UltraFeedback, whose ``prompt`` field repeats the first user turn); else the prompt is
    ``record["prompt"]``, a string or a message list."""
    prefix, reply = _response(_require(record, key), key)
    if prefix:
        return _check_prompt_turns(prefix, key), reply
    prompt = _require(record, "prompt")
    if isinstance(prompt, list):
        return _check_prompt_turns(_messages(prompt, "prompt"), "prompt"), reply
    return _text(prompt, "prompt"), reply


def _prompt_source(record: Mapping[str, Any], key: str) -> str:
    """Where a prompt came from, for errors: the conversation in ``key`` when it holds more than
    the reply, else ``prompt``."""
    value = record.get(key)
    return key if isinstance(value, list) and len(value) > 1 else "prompt"


def _pref_plain(record: Mapping[str, Any], template: ChatTemplate) -> PreferenceExample:
    c_prompt, chosen = _prompt_and_reply(record, "chosen", template)
    r_prompt, rejected = _prompt_and_reply(record, "rejected", template)
    if r_prompt != c_prompt:
        raise DataError(
            "chosen and rejected conversations differ before the final response",
            field="rejected",
            reason="bad_format",
        )
    return PreferenceExample(
        _render(template, c_prompt, _prompt_source(record, "chosen")),
        chosen,
        rejected,
        _soft_label(record),
    )


def _soft_label(record: Mapping[str, Any]) -> float:
    """The optional ``p_chosen`` field (a soft label in [0, 1]); 1.0 when absent."""
    value = record.get("p_chosen")
    if value is None:
        return 1.0
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0.0 <= value <= 1.0:
        raise DataError(
            f"expected a probability in [0, 1], got {value!r}", field="p_chosen",
            reason="bad_type",
        )  # fmt: skip
    return float(value)


def _sft_plain(record: Mapping[str, Any], template: ChatTemplate) -> SFTExample:
    prompt, completion = _prompt_and_reply(record, "completion", template)
    return SFTExample(_render(template, prompt, _prompt_source(record, "completion")), completion)


def _prompt_plain(record: Mapping[str, Any], template: ChatTemplate) -> PromptExample:
    return PromptExample(_prompt_value(record, template))


def _prompt_of_pair(record: Mapping[str, Any], template: ChatTemplate) -> PromptExample:
    """The prompt of a preference row: ``prompt``, or the conversation before the chosen reply."""
    prompt, _ = _prompt_and_reply(record, "chosen", template)
    return PromptExample(_render(template, prompt, _prompt_source(record, "chosen")))


def _unpaired_plain(record: Mapping[str, Any], template: ChatTemplate) -> UnpairedExample:
    """``{"prompt", "completion", "label"}`` (TRL's KTO format): ``label`` true = desirable."""
    prompt, completion = _prompt_and_reply(record, "completion", template)
    label = _require(record, "label")
    if not isinstance(label, bool):
        raise DataError(
            f"expected true or false, got {type(label).__name__} {label!r}",
            field="label",
            reason="bad_type",
        )
    field = _prompt_source(record, "completion")
    return UnpairedExample(_render(template, prompt, field), completion, label)


# --------------------------------------------------------------------------- alpaca
def _alpaca_messages(record: Mapping[str, Any]) -> list[dict[str, str]]:
    instruction = _req_text(record, "instruction")
    extra = _opt_text(record, "input")
    user = f"{instruction}\n\n{extra}" if extra.strip() else instruction
    msgs: list[dict[str, str]] = []
    system = _opt_text(record, "system")
    if system.strip():
        msgs.append({"role": "system", "content": system})
    history = record.get("history") or []
    if not isinstance(history, list):
        raise DataError(
            "expected a list of [query, response] pairs", field="history", reason="bad_type"
        )
    for i, pair in enumerate(history):
        if not (isinstance(pair, list | tuple) and len(pair) == 2):
            raise DataError(
                "expected a [query, response] pair", field=f"history[{i}]", reason="bad_type"
            )
        msgs.append({"role": "user", "content": _text(pair[0], f"history[{i}][0]")})
        msgs.append({"role": "assistant", "content": _text(pair[1], f"history[{i}][1]")})
    msgs.append({"role": "user", "content": user})
    return msgs


def _sft_alpaca(record: Mapping[str, Any], template: ChatTemplate) -> SFTExample:
    prompt = _render(template, _alpaca_messages(record), "instruction")
    return SFTExample(prompt, _req_text(record, "output"))


def _prompt_alpaca(record: Mapping[str, Any], template: ChatTemplate) -> PromptExample:
    return PromptExample(_render(template, _alpaca_messages(record), "instruction"))


# --------------------------------------------------------------------------- sharegpt / messages
def _conversation(record: Mapping[str, Any], key: str) -> list[dict[str, str]]:
    if key == "conversations":
        msgs = _messages(_require(record, key), key, role_key="from", content_key="value")
    else:
        msgs = _messages(_require(record, key), key)
    system = _opt_text(record, "system")
    if system.strip() and msgs[0]["role"] != "system":
        msgs.insert(0, {"role": "system", "content": system})
    return msgs


def _sharegpt_reply(value: Any, field: str) -> str:
    if isinstance(value, str):
        return _text(value, field)
    if not isinstance(value, Mapping):
        raise DataError(
            f"expected a {{from, value}} message or a string, got {type(value).__name__}",
            field=field,
            reason="bad_type",
        )
    return _text(_require(value, "value", f"{field}.value"), f"{field}.value")


def _pref_sharegpt(record: Mapping[str, Any], template: ChatTemplate) -> PreferenceExample:
    msgs = _check_prompt_turns(_conversation(record, "conversations"), "conversations")
    prompt = _render(template, msgs, "conversations")
    chosen = _sharegpt_reply(_require(record, "chosen"), "chosen")
    rejected = _sharegpt_reply(_require(record, "rejected"), "rejected")
    return PreferenceExample(prompt, chosen, rejected)


def _sft_conversation(key: str) -> Callable[[Mapping[str, Any], ChatTemplate], SFTExample]:
    def adapter(record: Mapping[str, Any], template: ChatTemplate) -> SFTExample:
        msgs = _conversation(record, key)
        if msgs[-1]["role"] != "assistant":
            raise DataError(
                "the last turn must be the assistant's (it is the completion)",
                field=f"{key}[{len(msgs) - 1}]",
                reason="bad_format",
            )
        prompt = _render(template, _check_prompt_turns(msgs[:-1], key), key)
        return SFTExample(prompt, msgs[-1]["content"])

    return adapter


def _prompt_conversation(key: str) -> Callable[[Mapping[str, Any], ChatTemplate], PromptExample]:
    def adapter(record: Mapping[str, Any], template: ChatTemplate) -> PromptExample:
        msgs = _conversation(record, key)
        if msgs[-1]["role"] == "assistant":
            msgs = msgs[:-1]
        return PromptExample(_render(template, _check_prompt_turns(msgs, key), key))

    return adapter


# --------------------------------------------------------------------------- misc prompt sources
def _prompt_turns(record: Mapping[str, Any], template: ChatTemplate) -> PromptExample:
    turns = _require(record, "turns")
    if not isinstance(turns, list) or not turns:
        raise DataError("expected a non-empty list of turns", field="turns", reason="bad_type")
    first, field = turns[0], "turns[0]"
    if isinstance(first, Mapping):  # arena-hard style {"content": ...}
        first, field = _require(first, "content", "turns[0].content"), "turns[0].content"
    return PromptExample(_render(template, _text(first, field), field))


def _prompt_field(name: str) -> Callable[[Mapping[str, Any], ChatTemplate], PromptExample]:
    def adapter(record: Mapping[str, Any], template: ChatTemplate) -> PromptExample:
        return PromptExample(_render(template, _req_text(record, name), name))

    return adapter


def _sft_from_preference(
    pref: Callable[[Mapping[str, Any], ChatTemplate], PreferenceExample],
) -> Callable[[Mapping[str, Any], ChatTemplate], SFTExample]:
    def adapter(record: Mapping[str, Any], template: ChatTemplate) -> SFTExample:
        ex = pref(record, template)
        if not ex.chosen.strip():
            raise DataError("empty text", field="chosen", reason="empty_text")
        return SFTExample(ex.prompt, ex.chosen)

    return adapter


def _sft_plain_or_chosen(record: Mapping[str, Any], template: ChatTemplate) -> SFTExample:
    if "completion" not in record and "chosen" in record:
        return _sft_from_preference(_pref_plain)(record, template)
    return _sft_plain(record, template)


def _sft_sharegpt(record: Mapping[str, Any], template: ChatTemplate) -> SFTExample:
    if "chosen" in record:
        return _sft_from_preference(_pref_sharegpt)(record, template)
    return _sft_conversation("conversations")(record, template)


Adapter = Callable[[Mapping[str, Any], ChatTemplate], Example]

ADAPTERS: dict[str, dict[str, Adapter]] = {
    "sft": {
        "plain": _sft_plain_or_chosen,
        "alpaca": _sft_alpaca,
        "sharegpt": _sft_sharegpt,
        "messages": _sft_conversation("messages"),
        "hh": _sft_from_preference(_pref_hh),
        "ultrafeedback": _sft_from_preference(_pref_plain),
    },
    "preference": {
        "hh": _pref_hh,
        "ultrafeedback": _pref_plain,
        "plain": _pref_plain,
        "sharegpt": _pref_sharegpt,
    },
    "unpaired": {"plain": _unpaired_plain},
    "prompt": {
        "plain": _prompt_plain,
        "alpaca": _prompt_alpaca,
        "sharegpt": _prompt_conversation("conversations"),
        "messages": _prompt_conversation("messages"),
        "hh": _prompt_hh,
        "ultrafeedback": _prompt_of_pair,
        "turns": _prompt_turns,
    },
}
"""``ADAPTERS[kind][name]``; prompts additionally accept ``"field:NAME"``."""

# Prompt-only datasets in the shared data folder use these fields for the prompt text.
_PROMPT_FIELDS = ("question", "Instruction", "goal", "instruction_text", "text")


def detect_adapter(kind: Kind, record: Mapping[str, Any]) -> str:
    """Choose an adapter name for ``kind`` from the fields of one record."""
    if not isinstance(record, Mapping):
        raise DataError(f"expected a JSON object, got {type(record).__name__}", reason="bad_record")
    keys = set(record.keys())
    chosen = record.get("chosen")
    if kind == "preference":
        if "conversations" in keys:
            return "sharegpt"
        if {"chosen", "rejected"} <= keys:
            if isinstance(chosen, list):
                return "ultrafeedback"
            return "plain" if "prompt" in keys else "hh"
    elif kind == "unpaired":
        if {"completion", "label"} <= keys:
            return "plain"
    elif kind == "sft":
        if "conversations" in keys:
            return "sharegpt"
        if "messages" in keys:
            return "messages"
        if "instruction" in keys and "output" in keys:
            return "alpaca"
        if "prompt" in keys and "completion" in keys:
            return "plain"
        if {"chosen", "rejected"} <= keys:
            if isinstance(chosen, list):
                return "ultrafeedback"
            return "plain" if "prompt" in keys else "hh"
    else:
        if "prompt" in keys:
            return "plain"
        if "conversations" in keys:
            return "sharegpt"
        if "messages" in keys:
            return "messages"
        if "instruction" in keys:
            return "alpaca"
        if "turns" in keys:
            return "turns"
        if "chosen" in keys and isinstance(chosen, str):
            return "hh"
        if "chosen" in keys and isinstance(chosen, list):
            return "ultrafeedback"
        for name in _PROMPT_FIELDS:
            if name in keys:
                return f"field:{name}"
    names = sorted(ADAPTERS[kind]) + (["field:NAME"] if kind == "prompt" else [])
    raise DataError(
        f"cannot detect the {kind} format from fields {sorted(map(str, keys))}; "
        f"pass adapter= one of {names}",
        reason="bad_format",
    )


def get_adapter(kind: Kind, name: str) -> Adapter:
    """Look up an adapter by kind and name (raises ``ValueError`` listing valid names)."""
    if kind not in ADAPTERS:
        raise ValueError(f"unknown data kind {kind!r}; expected one of {sorted(ADAPTERS)}")
    if kind == "prompt" and name.startswith("field:"):
        return _prompt_field(name.split(":", 1)[1])
    if name not in ADAPTERS[kind]:
        raise ValueError(
            f"unknown {kind} adapter {name!r}; expected one of {sorted(ADAPTERS[kind])}"
        )
    return ADAPTERS[kind][name]


def validate_example(example: Example) -> Example:
    """Checks every adapter's output: no blank text, and ``chosen`` differs from ``rejected``."""
    for name in ("prompt", "completion", "chosen", "rejected"):
        value = getattr(example, name, None)
        if value is not None and not value.strip():
            raise DataError("empty text", field=name, reason="empty_text")
    if (
        isinstance(example, PreferenceExample)
        and example.chosen.strip() == example.rejected.strip()
    ):
        raise DataError(
            "chosen and rejected responses are identical", field="rejected", reason="identical_pair"
        )
    return example


def adapt(kind: Kind, name: str, record: Mapping[str, Any], template: ChatTemplate) -> Example:
    """Convert one record with adapter ``name`` and validate the result."""
    if not isinstance(record, Mapping):
        raise DataError(f"expected a JSON object, got {type(record).__name__}", reason="bad_record")
    return validate_example(get_adapter(kind, name)(record, template))
