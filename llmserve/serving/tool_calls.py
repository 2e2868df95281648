"""Tool calls and structured output: what a request's `tools`, `tool_choice` and
`response_format` mean for its prompt (messages as the template gets them), for its output
(one grammar, enforced by the engine) and for its answer (text turned back into OpenAI's
`tool_calls`, streamed). One format per chat-template family, chosen by `tool_format`.

The generic format serves templates that know nothing of tools (the bundled SmolLM2): the
tools are described in a system message and the output is a JSON envelope,
`{"tool_calls": [{"name": ..., "arguments": {...}}]}` or, where a plain answer is allowed,
`{"response": "..."}`. A named `tool_choice` generates that function's arguments alone.

Templates with tool support render `tools` themselves and are constrained to their model's
own call syntax; the Hermes format (`<tool_call>{"name": ..., "arguments": ...}</tool_call>`,
Qwen 2.5 and many others) is the first. A new family is a format here, its detection in
`tool_format`, and its parser.
"""

from __future__ import annotations

import json
import secrets
import string
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

from llmserve.serving import constraints
from llmserve.serving.schema_bounds import bounded, rebased

ChoiceMode = Literal["auto", "required", "none", "named"]


@dataclass(frozen=True, slots=True)
class Tool:
    name: str
    description: str | None = None
    parameters: dict[str, Any] = field(default_factory=lambda: {"type": "object"})
    strict: bool = False

    def describe(self) -> dict[str, Any]:
        out: dict[str, Any] = {"name": self.name}
        if self.description:
            out["description"] = self.description
        out["parameters"] = self.parameters
        return out


@dataclass(frozen=True, slots=True)
class ToolChoice:
    mode: ChoiceMode = "auto"
    name: str | None = None  # for "named"


@dataclass(frozen=True, slots=True)
class ToolCallDelta:
    """A piece of one call: its first carries `id` and `name`, the rest `arguments` text."""

    index: int
    id: str | None = None
    name: str | None = None
    arguments: str = ""


class OutputParser(Protocol):
    """Turns one choice's text, piece by piece, into content and tool-call pieces."""

    called: bool  # at least one call began

    def feed(self, text: str) -> tuple[str, list[ToolCallDelta]]: ...

    def flush(self) -> str:
        """Content held back at the end of the output."""


@dataclass(frozen=True, slots=True)
class OutputRequest:
    """What a chat request asks of its output's form."""

    tools: list[Tool] = field(default_factory=list)
    choice: ToolChoice = ToolChoice()
    parallel: bool | None = None  # None: not said (see `parallel_calls`)
    response_format: dict[str, Any] | None = None  # OpenAI's object


ToolFormat = Literal["generic", "hermes"]


def tool_format(template: str) -> ToolFormat:
    """The tool-call format a chat template speaks, from its source."""
    if "<tool_call>" in template and "tools" in template:
        return "hermes"
    return "generic"


@dataclass(frozen=True)
class OutputPlan:
    """What tools and response_format make of one chat request."""

    messages: list[dict[str, Any]]
    template_tools: list[dict[str, Any]] | None = None  # `tools` for a template that knows them
    grammar: str | None = None
    parser: Callable[[], OutputParser] | None = None  # one per choice
    calls_finish: Literal["tool_calls", "stop"] = "tool_calls"  # finish_reason after calls


def new_call_id() -> str:
    return "call_" + "".join(secrets.choice(_ID_CHARS) for _ in range(24))


_ID_CHARS = string.ascii_letters + string.digits


# -- the plan ---------------------------------------------------------------------------------


def parallel_calls(requested: bool | None, fmt: ToolFormat) -> bool:
    """Whether one answer may hold several calls: as asked, else where the template has them
    (Hermes). The generic envelope holds one unless asked, as llama.cpp's server does for
    templates without parallel calls: a small model that may add calls adds them until
    max_tokens."""
    return requested if requested is not None else fmt == "hermes"


def plan_output(
    messages: list[dict[str, Any]], request: OutputRequest, fmt: ToolFormat = "generic"
) -> OutputPlan:
    """The prompt, grammar and parser for a chat request in the template's format `fmt`;
    every schema is checked (a 400 naming the field), so call it off the event loop. With
    tools in play (`tool_choice` not `none`), the tools decide the output's form, not
    `response_format`."""
    tools = request.tools if request.choice.mode != "none" else []
    parallel = parallel_calls(request.parallel, fmt)
    arguments = {  # each tool's on its own, to name the one at fault
        tool.name: constraints.json_schema(tool.parameters, strict=tool.strict,
                                           param=f"tools.{i}.function.parameters")
        for i, tool in enumerate(tools)
    }
    if fmt == "hermes":
        messages = _native_history(messages)
        if tools:
            return _hermes_tools(messages, tools, request.choice, parallel)
        return _structured(messages, request.response_format)
    messages = _generic_history(messages)
    if tools:
        return _generic_tools(messages, tools, request.choice, parallel, arguments)
    return _structured(messages, request.response_format)


def _structured(messages: list[dict[str, Any]], fmt: dict[str, Any] | None) -> OutputPlan:
    kind = (fmt or {}).get("type", "text")
    if kind == "json_object":
        return OutputPlan(messages, grammar=constraints.json_object())
    if kind == "json_schema":
        spec = fmt["json_schema"]  # type: ignore[index]
        grammar = constraints.json_schema(
            spec.get("schema", {}), strict=bool(spec.get("strict")),
            param="response_format.json_schema.schema",
        )
        return OutputPlan(messages, grammar=grammar)
    return OutputPlan(messages)


def _generic_tools(
    messages: list[dict[str, Any]], tools: list[Tool], choice: ToolChoice, parallel: bool,
    arguments: dict[str, str],
) -> OutputPlan:
    """`arguments`: each tool's arguments grammar, by name."""
    if choice.mode == "named":
        [tool] = [t for t in tools if t.name == choice.name]
        prompt = (
            f"Call the function {tool.name} now: answer with its arguments alone, as one JSON "
            f"object valid against its parameters.\n\n{json.dumps(tool.describe())}"
        )
        return OutputPlan(_with_system(messages, prompt), grammar=arguments[tool.name],
                          parser=lambda: NamedCallParser(tool.name), calls_finish="stop")

    at = "/anyOf/0" if choice.mode == "auto" else ""  # where the call schemas will be
    calls = {"type": "array", "minItems": 1, "items": {"anyOf": [
        _call_schema(t, f"{at}/properties/tool_calls/items/anyOf/{i}")
        for i, t in enumerate(tools)]}}
    if not parallel:
        calls["maxItems"] = 1
    envelope = _object({"tool_calls": calls})
    shapes = '{"tool_calls": [{"name": <function name>, "arguments": <arguments object>}]}'
    if choice.mode == "auto":
        schema: dict[str, Any] = {"anyOf": [envelope, _object({"response": {"type": "string"}})]}
        how = (f"To call functions, answer with JSON only: {shapes}. To answer without a "
               'function, answer {"response": <your answer>}.')
    else:
        schema = envelope
        how = f"Answer by calling functions, with JSON only: {shapes}."
    listing = "\n".join(json.dumps(t.describe()) for t in tools)
    prompt = f"You can call these functions:\n{listing}\n\n{how}"
    grammar = constraints.json_schema(schema, strict=all(t.strict for t in tools), param="tools")
    return OutputPlan(_with_system(messages, prompt), grammar=grammar, parser=EnvelopeParser)


_HERMES_OPEN, _HERMES_CLOSE = "<tool_call>", "</tool_call>"


def _hermes_tools(
    messages: list[dict[str, Any]], tools: list[Tool], choice: ToolChoice, parallel: bool
) -> OutputPlan:
    """The template lists the tools; calls are `<tool_call>\n{json}\n</tool_call>`."""
    specs = [{"type": "function", "function": t.describe()} for t in tools]
    strict = all(t.strict for t in tools)
    if choice.mode == "auto":
        # Free text; where the model opens a call, the call's JSON is held to a schema.
        rules = [
            f"call_{i}: trigger {json.dumps(chr(10) + _call_prefix(t))} "
            f"%json {json.dumps(_styled(t.parameters, t.strict))} "
            f"{json.dumps('}' + chr(10) + _HERMES_CLOSE)}"
            for i, t in enumerate(tools)
        ]
        calls = " | ".join(f"call_{i}" for i in range(len(tools)))
        source = "\n".join([
            "%llguidance {}",
            f"start: ({calls})* TEXT" if parallel else f"start: ({calls})? TEXT",
            "TEXT: /(.|\n)*/",
            f"trigger[lazy]: TEXT {json.dumps(_HERMES_OPEN)}",
            *rules,
        ])
    else:
        allowed = [t for t in tools if choice.mode != "named" or t.name == choice.name]
        schema = _styled({"anyOf": [_call_schema(t, f"/anyOf/{i}")
                                    for i, t in enumerate(allowed)]}, strict)
        call = (f"{json.dumps(_HERMES_OPEN + chr(10))} %json {json.dumps(schema)} "
                f"{json.dumps(chr(10) + _HERMES_CLOSE)}")
        one = not parallel or choice.mode == "named"
        start = "call" if one else f"call ({json.dumps(chr(10))} call)*"
        source = "\n".join(["%llguidance {}", f"start: {start}", f"call: {call}"])
    grammar = constraints.lark(source, param="tools")
    return OutputPlan(messages, template_tools=specs, grammar=grammar, parser=HermesParser,
                      calls_finish="stop" if choice.mode == "named" else "tool_calls")


def _call_prefix(tool: Tool) -> str:
    return f'{{"name": {json.dumps(tool.name)}, "arguments": '


def _styled(schema: dict[str, Any], strict: bool) -> dict[str, Any]:
    """A schema for `%json` in a Lark grammar, carrying the JSON style and strictness, and
    bounded as `constraints.json_schema` bounds a schema."""
    return {**bounded(schema),
            "x-guidance": {**constraints.JSON_STYLE, "lenient": not strict}}


def _native_history(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Earlier calls as templates with tool support read them: arguments as objects."""
    out = []
    for m in messages:
        calls = m.get("tool_calls")
        if calls:
            m = {**m, "tool_calls": [
                {**c, "function": {**c["function"], "arguments": _arguments(c["function"])}}
                for c in calls
            ]}
        out.append(m)
    return out


def _object(properties: dict[str, Any]) -> dict[str, Any]:
    return {"type": "object", "properties": properties, "required": list(properties),
            "additionalProperties": False}


def _call_schema(tool: Tool, at: str) -> dict[str, Any]:
    """A call of `tool`, to be placed at JSON pointer `at` of the whole schema: the local
    `$ref`s of its parameters ("#/$defs/...", a pydantic model's nested ones) are rebased."""
    arguments = rebased(tool.parameters, f"{at}/properties/arguments")
    return _object({"name": {"const": tool.name}, "arguments": arguments})


def _with_system(messages: list[dict[str, Any]], text: str) -> list[dict[str, Any]]:
    """The tools' description in the system message, after what the client put there."""
    if messages and messages[0]["role"] == "system":
        first = messages[0]
        joined = f"{first['content']}\n\n{text}" if first["content"] else text
        return [{**first, "content": joined}, *messages[1:]]
    return [{"role": "system", "content": text}, *messages]


def _generic_history(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Earlier calls and their results as text any template renders: an assistant's calls
    as the envelope it would have written, a tool's result as a user message naming the
    function it answers. Call ids stay out of the prompt: the envelope has none to match, and
    a random id in the text makes the same conversation read differently each time (seen:
    the bundled model copying a fresh id into a loop one time in twenty)."""
    out = []
    names: dict[str, str] = {}  # call id -> function name
    for m in messages:
        calls = m.get("tool_calls")
        if m["role"] == "assistant" and calls:
            names.update((c["id"], c["function"]["name"]) for c in calls if c.get("id"))
            envelope = {"tool_calls": [
                {"name": c["function"]["name"], "arguments": _arguments(c["function"])}
                for c in calls
            ]}
            out.append({"role": "assistant", "content": json.dumps(envelope, ensure_ascii=False)})
        elif m["role"] == "tool":
            name = names.get(m.get("tool_call_id"))
            result = ({"name": name} if name else {}) | {"content": m["content"]}
            out.append({"role": "user",
                        "content": json.dumps({"tool_response": result}, ensure_ascii=False)})
        else:
            out.append({k: v for k, v in m.items() if k not in ("tool_calls", "tool_call_id")})
    return out


def _arguments(function: dict[str, Any]) -> Any:
    raw = function.get("arguments") or "{}"
    try:
        return json.loads(raw)
    except ValueError:
        return raw


# -- parsers ----------------------------------------------------------------------------------


class NamedCallParser:
    """A forced call of one function: the whole output is its arguments."""

    def __init__(self, name: str) -> None:
        self._name = name
        self.called = False

    def flush(self) -> str:
        return ""

    def feed(self, text: str) -> tuple[str, list[ToolCallDelta]]:
        calls = []
        if not self.called:
            self.called = True
            calls.append(ToolCallDelta(0, new_call_id(), self._name))
        if text:
            calls.append(ToolCallDelta(0, arguments=text))
        return "", calls


_RESPONSE_HEAD = '{"response": "'
_CALLS_HEAD = '{"tool_calls": ['
_ESCAPES = {'"': '"', "\\": "\\", "/": "/", "b": "\b", "f": "\f", "n": "\n", "r": "\r", "t": "\t"}


class _Reader:
    """A parser fed text piece by piece: `_read` takes one character per `yield`, and
    reports content and call pieces as it goes."""

    def __init__(self) -> None:
        self.called = False
        self._held = ""  # text held back in case it begins call syntax
        self._content: list[str] = []
        self._calls: list[ToolCallDelta] = []
        self._index = -1
        self._reader = self._read()
        next(self._reader)

    def feed(self, text: str) -> tuple[str, list[ToolCallDelta]]:
        for ch in text:
            self._reader.send(ch)
        content = "".join(self._content)
        self._content.clear()  # in place: readers hold its `append`
        calls, self._calls = _joined(self._calls), []
        return content, calls

    def flush(self) -> str:
        """At the end of the output, text held back that began no call after all."""
        held, self._held = self._held, ""
        return held

    def _read(self) -> Iterator[None]:
        raise NotImplementedError

    def _call(self) -> Iterator[None]:
        """One `{"name": "...", "arguments": ...` up to the end of the arguments."""
        yield from self._skip_to('"name": "')
        name: list[str] = []
        yield from self._string(name.append)
        self._index += 1
        self.called = True
        self._calls.append(ToolCallDelta(self._index, new_call_id(), "".join(name)))
        yield from self._skip_to('"arguments": ')
        yield from self._value(self._arguments)

    def _arguments(self, text: str) -> None:
        self._calls.append(ToolCallDelta(self._index, arguments=text))

    def _skip_to(self, marker: str) -> Iterator[None]:
        seen = ""
        while not seen.endswith(marker):
            seen += yield

    def _take(self, n: int) -> Iterator[None]:
        got = ""
        for _ in range(n):
            got += yield
        return got

    def _string(self, sink: Callable[[str], None]) -> Iterator[None]:
        """A JSON string's characters after its opening quote, decoded, up to its closing."""
        while True:
            ch = yield
            if ch == '"':
                return
            if ch != "\\":
                sink(ch)
                continue
            ch = yield
            if ch != "u":
                sink(_ESCAPES.get(ch, ch))
                continue
            code = int((yield from self._take(4)), 16)
            if 0xD800 <= code < 0xDC00:  # a surrogate pair: \uD83D\uDE00
                low = int((yield from self._take(6))[2:], 16)
                code = 0x10000 + ((code - 0xD800) << 10) + (low - 0xDC00)
            sink(chr(code))

    def _value(self, sink: Callable[[str], None]) -> Iterator[None]:
        """One JSON value's text as it comes, up to its end."""
        depth = 0
        in_string = escaped = False
        first = True
        while True:
            ch = yield
            if first and ch not in '{["':  # a number, true, false or null: up to what follows
                while ch not in ",}]":
                    sink(ch)
                    ch = yield
                return
            first = False
            sink(ch)
            if in_string:
                if escaped:
                    escaped = False
                elif ch == "\\":
                    escaped = True
                elif ch == '"':
                    in_string = False
                    if depth == 0:
                        return
            elif ch == '"':
                in_string = True
            elif ch in "{[":
                depth += 1
            elif ch in "}]":
                depth -= 1
                if depth == 0:
                    return


class EnvelopeParser(_Reader):
    """The generic envelope, read as it streams: the answer of `{"response": ...}` as
    content, each call of `{"tool_calls": [...]}` as a first delta (id, name) and then its
    arguments' text as it comes. Text that is not an envelope is content as it is."""

    def _read(self) -> Iterator[None]:
        while True:
            self._held += yield
            head = self._held
            if head in (_RESPONSE_HEAD, _CALLS_HEAD):
                self._held = ""
                if head == _RESPONSE_HEAD:
                    yield from self._string(self._content.append)
                else:
                    yield from self._tool_calls()
                break
            if not (_RESPONSE_HEAD.startswith(head) or _CALLS_HEAD.startswith(head)):
                self._content.append(self.flush())  # not an envelope (no grammar held it to one)
                while True:
                    self._content.append((yield))
        while True:  # the envelope's closing characters
            yield

    def _tool_calls(self) -> Iterator[None]:
        while True:
            yield from self._call()
            # `}` closes the call; then `, ` and another, or `]`.
            while (ch := (yield)) != "]":
                if ch == "{":
                    break
            else:
                return


class HermesParser(_Reader):
    """Text, and calls as `<tool_call>\n{"name": ..., "arguments": ...}\n</tool_call>`:
    the text is content (whitespace between calls is not), each call a tool call."""

    def _read(self) -> Iterator[None]:
        while True:
            while self._held != _HERMES_OPEN:
                self._held += yield
                if self.called and not self._held.strip():
                    self._held = ""  # whitespace after a call is no answer
                    continue
                keep = _prefix_held(self._held, _HERMES_OPEN)
                if len(self._held) > keep:
                    self._content.append(self._held[: len(self._held) - keep])
                    self._held = self._held[len(self._held) - keep:]
            self._held = ""
            yield from self._call()
            yield from self._skip_to(_HERMES_CLOSE)


def _prefix_held(text: str, marker: str) -> int:
    """The length of the longest suffix of `text` that begins `marker` (all of it counts)."""
    for k in range(min(len(text), len(marker)), 0, -1):
        if marker.startswith(text[-k:]):
            return k
    return 0


def _joined(calls: list[ToolCallDelta]) -> list[ToolCallDelta]:
    """Consecutive argument pieces of one call as one delta."""
    out: list[ToolCallDelta] = []
    for c in calls:
        last = out[-1] if out else None
        if last is not None and last.index == c.index and c.id is None and (
            last.id is None or not last.arguments
        ):
            out[-1] = ToolCallDelta(last.index, last.id, last.name, last.arguments + c.arguments)
        else:
            out.append(c)
    return out
