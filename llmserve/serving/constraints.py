"""What a request asks its output to be -> one llguidance grammar, checked before the request
is admitted. Engines only apply grammars (engines/grammar.py); building them from OpenAI's
`response_format` and `tools` is written once, here, for every engine.
"""

from __future__ import annotations

import json
import re
from typing import Any

from llguidance import LLMatcher

from llmserve.engines.grammar import as_lark
from llmserve.errors import InvalidRequest
from llmserve.serving.reasoning import ReasoningFormat
from llmserve.serving.schema_bounds import bounded

# Compact JSON as OpenAI writes it (a space after ',' and ':'), and no free whitespace: a
# small model can spend its whole budget on newlines where the grammar allows them.
JSON_STYLE = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}


def json_schema(schema: Any, *, strict: bool, param: str) -> str:
    """The grammar of JSON valid against `schema`. With `strict`, a schema feature that cannot
    be enforced is a 400; without, it is ignored (the rest is still enforced)."""
    if not isinstance(schema, dict):
        raise InvalidRequest("A JSON schema must be an object.", param=param)
    try:
        grammar = LLMatcher.grammar_from_json_schema(
            bounded(schema), defaults=JSON_STYLE, overrides={"lenient": not strict}
        )
    except (ValueError, TypeError) as exc:
        raise InvalidRequest(f"Invalid JSON schema: {exc}", param=param) from None
    check(grammar, param=param, what="JSON schema")
    return grammar


def json_object() -> str:
    """Any JSON object (`response_format: json_object`), its numbers bounded as below."""
    return LLMatcher.grammar_from_json_schema(bounded({"type": "object"}), defaults=JSON_STYLE)


def lark(source: str, *, param: str) -> str:
    grammar = LLMatcher.grammar_from_lark(source)
    check(grammar, param=param, what="grammar")
    return grammar


def check(grammar: str, *, param: str, what: str) -> None:
    """A 400 naming `param` unless llguidance can build a matcher for `grammar`."""
    failed, messages = LLMatcher.validate_grammar_with_warnings(grammar)
    if failed:
        raise InvalidRequest(f"Invalid {what}: {messages[0]}", param=param)


def after_reasoning(grammar: str, fmt: ReasoningFormat, *, opened: bool) -> str:
    """`grammar` from the end of a thinking model's reasoning on, the reasoning itself free
    (as vLLM applies tools and response_format to such models): `opened`, the output starts
    inside it and must close it; else it may open and close one first. One Lark grammar, so
    engines with an llguidance backend of their own take it too."""
    answer = re.sub(r"(?m)^(\s*)start(\s*:)", r"\1llmserve_answer\2", as_lark(grammar))
    think = "llmserve_thought llmserve_blank"
    head = think if opened else f"({json.dumps(fmt.start)} {think})?"
    return "\n".join([
        f"start: {head} llmserve_answer",
        # any text, up to and with the end tag (a lexeme that ends where the tag is written)
        f"llmserve_thought[suffix={json.dumps(fmt.end)}]: /(?s:.*)/",
        'llmserve_blank: "" | " " | "\\n" | "\\n\\n"',
        answer,
    ])
