"""Render chat messages with the model's own Jinja chat template, sandboxed.

Same semantics as Hugging Face `apply_chat_template`: `messages`, `add_generation_prompt`,
`continue_final_message`, `bos_token`, `eos_token`, `raise_exception`, `strftime_now`, `tojson`
without ASCII escaping, `trim_blocks` and `lstrip_blocks`.
"""

from __future__ import annotations

import json
from datetime import datetime
from typing import Any

import jinja2
from jinja2 import meta
from jinja2.ext import loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment

# Used when a model ships no template: ChatML, which most instruct models understand.
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


class TemplateError(ValueError):
    """The template refused the messages (raise_exception) or failed to render."""


def _raise_exception(message: str) -> None:
    raise TemplateError(message)


def _tojson(value: Any, indent: int | None = None, separators=None, sort_keys: bool = False) -> str:
    return json.dumps(value, ensure_ascii=False, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


class ChatTemplate:
    def __init__(self, source: str, *, bos_token: str = "", eos_token: str = "") -> None:
        env = ImmutableSandboxedEnvironment(
            trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols]
        )
        env.filters["tojson"] = _tojson
        env.globals["raise_exception"] = _raise_exception
        env.globals["strftime_now"] = _strftime_now
        self._template = env.from_string(source)
        self._variables = frozenset(meta.find_undeclared_variables(env.parse(source)))
        self._bos_token = bos_token
        self._eos_token = eos_token

    def reads(self, variable: str) -> bool:
        """Whether the template reads `variable` (one it does not set itself)."""
        return variable in self._variables

    def render(
        self,
        messages: list[dict[str, Any]],
        *,
        add_generation_prompt: bool = True,
        continue_final_message: bool = False,
        **extra: Any,
    ) -> str:
        """`continue_final_message`: the text ends right after the last message's content,
        left open for the model to go on with it (what comes after it, an end of turn, cut)."""
        if continue_final_message and add_generation_prompt:
            raise TemplateError(
                "continue_final_message and add_generation_prompt cannot both be true.")
        text = self._render(messages, add_generation_prompt=add_generation_prompt, **extra)
        if continue_final_message:
            text = _cut_after_final(text, messages)
        return text

    def _render(self, messages: list[dict[str, Any]], **variables: Any) -> str:
        try:
            return self._template.render(
                messages=messages,
                bos_token=self._bos_token,
                eos_token=self._eos_token,
                **variables,
            )
        except TemplateError:
            raise
        except jinja2.TemplateError as exc:
            raise TemplateError(f"chat template failed: {exc}") from exc


def _cut_after_final(text: str, messages: list[dict[str, Any]]) -> str:
    """`text` up to the end of the last message's content, as Hugging Face cuts it: its
    last occurrence, stripped (templates often trim the content they write)."""
    content = messages[-1].get("content") if messages else None
    if isinstance(content, list):  # content parts: the last text one
        content = next((p.get("text") for p in reversed(content)
                        if isinstance(p, dict) and isinstance(p.get("text"), str)), None)
    if not isinstance(content, str) or not content.strip():
        raise TemplateError("continue_final_message needs a final message with text to continue.")
    final = content.strip()
    at = text.rfind(final)
    if at < 0:
        raise TemplateError("continue_final_message: the chat template does not write the final "
                            "message's content as it is, so there is no place to continue it.")
    return text[: at + len(final)]
