"""Chat templates: the ONE place where conversations become prompt text.

A template renders a conversation (a list of ``{"role", "content"}`` messages whose last
message is from the user, or a bare prompt string = one user message) into the prompt text
the policy sees, ending where the assistant's reply starts. Built-ins:

* ``"hh"``       -- Anthropic HH: ``"\\n\\nHuman: {msg}\\n\\nAssistant: {reply}...\\n\\nAssistant:"``
* ``"plain"``    -- identity: a prompt string is used as-is (story continuation demo)
* ``"chatml"``   -- ``<|im_start|>{role}\\n{content}<|im_end|>\\n ... <|im_start|>assistant\\n``
* ``"tokenizer"``-- ``tokenizer.apply_chat_template(..., add_generation_prompt=True)``

Responses are appended to prompts with :func:`join_prompt_response`, which inserts one space
when neither side has whitespace at the boundary (``"Assistant:" + "Hi"`` ->
``"Assistant: Hi"``; ``"...assistant\\n" + "Hi"`` is left alone).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

__all__ = [
    "ChatTemplate",
    "Message",
    "TEMPLATE_NAMES",
    "get_template",
    "join_prompt_response",
    "normalize_role",
    "HH_HUMAN",
    "HH_ASSISTANT",
]

Message = Mapping[str, str]

HH_HUMAN = "\n\nHuman:"
HH_ASSISTANT = "\n\nAssistant:"

TEMPLATE_NAMES = ("hh", "plain", "chatml", "tokenizer")

_ROLE_ALIASES = {
    "user": "user",
    "human": "user",
    "prompter": "user",
    "assistant": "assistant",
    "gpt": "assistant",
    "bot": "assistant",
    "model": "assistant",
    "chatgpt": "assistant",
    "system": "system",
}


def normalize_role(role: str) -> str:
    """Map dataset role names (``human``, ``gpt``, ``bot``, ...) to user/assistant/system."""
    key = str(role).strip().lower()
    if key not in _ROLE_ALIASES:
        raise ValueError(f"unknown message role {role!r} (expected one of {sorted(_ROLE_ALIASES)})")
    return _ROLE_ALIASES[key]


def join_prompt_response(prompt: str, response: str) -> str:
    """``prompt + response`` with a single space inserted when the boundary has no whitespace."""
    if not prompt or not response or prompt[-1].isspace() or response[0].isspace():
        return prompt + response
    return prompt + " " + response


@dataclass(frozen=True)
class ChatTemplate:
    """Renders conversations into prompt text. Build one with :func:`get_template`.

    Attributes:
        name: one of :data:`TEMPLATE_NAMES`.
        tokenizer: only for ``"tokenizer"``: a HF tokenizer with a ``chat_template``.
        stop_strings: strings that mark the end of an assistant turn in generated text
            (e.g. ``"\\n\\nHuman:"`` for ``"hh"``); rollouts may stop/truncate on them.
    """

    name: str
    tokenizer: Any = None
    stop_strings: tuple[str, ...] = ()

    def render_prompt(self, messages: str | Sequence[Message]) -> str:
        """Render a prompt string (one user message) or a message list into prompt text."""
        if isinstance(messages, str):
            if self.name == "plain" or self.is_rendered(messages):
                return messages
            msgs = [{"role": "user", "content": messages}]
        else:
            msgs = _normalize_messages(messages)
        if self.name == "plain":
            return "\n\n".join(m["content"] for m in msgs)
        if self.name == "hh":
            return _render_hh(msgs)
        if self.name == "chatml":
            body = "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in msgs)
            return body + "<|im_start|>assistant\n"
        if self.name == "tokenizer":
            return self.tokenizer.apply_chat_template(
                msgs, tokenize=False, add_generation_prompt=True
            )
        raise ValueError(f"unknown chat template {self.name!r}")

    def is_rendered(self, text: str) -> bool:
        """True if ``text`` already is a prompt in this template's format (so rendering is
        idempotent: an HH transcript prefix is not wrapped in a second ``Human:`` turn)."""
        if self.name == "hh":
            return text.endswith(HH_ASSISTANT) and "Human:" in text
        if self.name == "chatml":
            return text.endswith("<|im_start|>assistant\n")
        return self.name == "plain"

    def join(self, prompt: str, response: str) -> str:
        """Full text of prompt followed by response (see :func:`join_prompt_response`)."""
        return join_prompt_response(prompt, response)


def _normalize_messages(messages: Sequence[Message]) -> list[dict[str, str]]:
    if not messages:
        raise ValueError("cannot render an empty conversation")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, Mapping) or "role" not in m or "content" not in m:
            raise ValueError(f"message {i} must be a mapping with 'role' and 'content': {m!r}")
        if not isinstance(m["content"], str):
            raise ValueError(f"message {i} content must be a string, got {type(m['content'])}")
        out.append({"role": normalize_role(m["role"]), "content": m["content"]})
    if out[-1]["role"] != "user":
        raise ValueError(
            f"a prompt must end with a user message, the last one is {out[-1]['role']!r}"
        )
    return out


def _render_hh(msgs: list[dict[str, str]]) -> str:
    parts: list[str] = []
    for m in msgs:
        if m["role"] == "system":
            parts.append(m["content"])
        else:
            marker = HH_HUMAN if m["role"] == "user" else HH_ASSISTANT
            parts.append(join_prompt_response(marker, m["content"]))
    return "".join(parts) + HH_ASSISTANT


def get_template(spec: str | ChatTemplate = "hh", tokenizer: Any = None) -> ChatTemplate:
    """Return a built-in template by name (or pass a :class:`ChatTemplate` through).

    ``"tokenizer"`` needs ``tokenizer`` with a non-empty ``chat_template``; a clear
    ``ValueError`` is raised otherwise.
    """
    if isinstance(spec, ChatTemplate):
        return spec
    name = str(spec).strip().lower()
    if name == "hh":
        return ChatTemplate("hh", stop_strings=(HH_HUMAN, HH_ASSISTANT))
    if name == "plain":
        return ChatTemplate("plain")
    if name == "chatml":
        return ChatTemplate("chatml", stop_strings=("<|im_end|>", "<|im_start|>"))
    if name == "tokenizer":
        if tokenizer is None or not getattr(tokenizer, "chat_template", None):
            raise ValueError(
                "chat template 'tokenizer' needs a tokenizer that has a chat_template; "
                "this one has none -- use template='hh', 'chatml' or 'plain' instead"
            )
        return ChatTemplate("tokenizer", tokenizer=tokenizer)
    raise ValueError(f"unknown chat template {spec!r}; choose one of {TEMPLATE_NAMES}")
