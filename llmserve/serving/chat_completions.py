"""Chat completions' text side, for every engine: a generation's deltas as the choices of
OpenAI's stream chunks, a whole answer as the `chat.completion` object, and a completion
with `store: true` kept with its request. The route only frames what this module produces.
"""

from __future__ import annotations

from dataclasses import dataclass

from llmserve.errors import LLMServeError
from llmserve.serving.collect import CollectedChoice
from llmserve.serving.generation import ChoiceDelta, TokenLogprob, Usage
from llmserve.serving.shapes import logprob_value, usage_body
from llmserve.serving.tool_calls import ToolCallDelta
from llmserve.store import Store


def first_choices(n: int, tools: bool) -> list[dict]:
    """The first chunk's choices: the assistant's role. With tools the answer may be calls
    alone: no content until there is some, as at OpenAI."""
    first = {"role": "assistant", "content": None if tools else ""}
    return [{"index": i, "delta": first, "logprobs": None, "finish_reason": None}
            for i in range(n)]


def step_choices(batch: list[ChoiceDelta]) -> list[dict]:
    """The choices of one step's chunks, in order: per choice its reasoning, its text (with
    its logprobs), its tool calls, then its ending, each in a chunk of its own."""
    parts = []
    for d in batch:
        logprobs = _logprobs_body(d.logprobs) if d.logprobs else None
        if d.reasoning:  # before the answer's text of the same step
            parts.append({"index": d.index, "delta": {"reasoning_content": d.reasoning},
                          "logprobs": logprobs, "finish_reason": None})
            logprobs = None
        if d.text or logprobs:
            parts.append({"index": d.index, "delta": {"content": d.text},
                          "logprobs": logprobs, "finish_reason": None})
        if d.tool_calls:
            parts.append({"index": d.index,
                          "delta": {"tool_calls": [_call_delta(c) for c in d.tool_calls]},
                          "logprobs": None, "finish_reason": None})
        if d.finish_reason:
            parts.append({"index": d.index, "delta": {}, "logprobs": None,
                          "finish_reason": d.finish_reason})
    return parts


def completion(head: dict, choices: list[CollectedChoice], usage: Usage,
               want_logprobs: bool, error: LLMServeError | None = None) -> dict:
    """The chat.completion object. A stored stream that ended early (`error`) says why in
    `error` (as a Response does), and its unfinished choices' finish_reason is "error"."""
    body = {
        **head,
        "object": "chat.completion",
        "choices": [
            {
                "index": i,
                "message": _message(c),
                "logprobs": _logprobs_body(c.logprobs) if want_logprobs else None,
                "finish_reason": c.finish_reason or ("error" if error else None),
            }
            for i, c in enumerate(choices)
        ],
        "usage": usage_body(usage),
    }
    if error is not None:
        body["error"] = {"message": error.message, "type": error.type, "code": error.code}
    return body


@dataclass
class Answer:
    """A stored stream's answer as it stands."""

    choices: list[CollectedChoice]
    error: LLMServeError | None = None  # why it ended before its end


class StoredCompletion:
    """A completion with `store: true`: kept with its request's messages (as stored) and
    metadata. A stream fills `answer` as it goes; an answer not streamed is given whole."""

    def __init__(self, store: Store, head: dict, *, n: int, want_logprobs: bool,
                 messages: list[dict], metadata: dict[str, str], key_hash: str) -> None:
        self._store = store
        self.key_hash = key_hash  # whose it is
        self._head = head
        self._want_logprobs = want_logprobs
        self._messages = messages
        self._metadata = metadata
        self.answer = Answer([CollectedChoice() for _ in range(n)])

    @property
    def id(self) -> str:
        return self._head["id"]

    async def save(self, whole: dict | None = None, usage: Usage | None = None) -> None:
        if whole is None:
            assert usage is not None
            whole = completion(self._head, self.answer.choices, usage, self._want_logprobs,
                               self.answer.error)
        await self._store.save_chat({**whole, "metadata": self._metadata},
                                    messages=self._messages, metadata=self._metadata,
                                    key_hash=self.key_hash)


def _message(c: CollectedChoice) -> dict:
    text = "".join(c.text)
    message = {"role": "assistant", "content": text if text or not c.tool_calls else None,
               "refusal": None}
    if c.reasoning:  # vLLM's and llama-server's name for a thinking model's reasoning
        message["reasoning_content"] = "".join(c.reasoning)
    if c.tool_calls:
        message["tool_calls"] = c.tool_calls
    return message


def _call_delta(c: ToolCallDelta) -> dict:
    if c.id is None:
        return {"index": c.index, "function": {"arguments": c.arguments}}
    return {"index": c.index, "id": c.id, "type": "function",
            "function": {"name": c.name, "arguments": c.arguments}}


def _logprobs_body(entries: list[TokenLogprob]) -> dict:
    return {
        "content": [
            {
                "token": e.token,
                "logprob": logprob_value(e.logprob),
                "bytes": list(e.bytes),
                "top_logprobs": [
                    {"token": t, "logprob": logprob_value(lp), "bytes": list(b)}
                    for t, b, lp in e.top
                ],
            }
            for e in entries
        ],
        "refusal": None,
    }
