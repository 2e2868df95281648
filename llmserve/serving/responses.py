"""The Responses API's text side, for every engine: input items as the chat template takes
them, and a generation's deltas as a response's output items and OpenAI's typed stream
events (`ResponseStream`). The route only frames what this module produces.

Items are kept in OpenAI's stored shapes (each with an `id`), so a stored response's input
and output are listed as they are and a later `previous_response_id` replays them.
"""

from __future__ import annotations

import time
import uuid
from typing import Any, Literal

from llmserve.errors import InvalidRequest, UnsupportedParameter
from llmserve.serving.generation import ChoiceDelta, Usage

Item = dict[str, Any]

_TEXT_PARTS = {"input_text", "output_text", "text", "refusal", "reasoning_text"}


def new_id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex}"


def normalize_input(value: str | list[dict[str, Any]]) -> list[Item]:
    """A request's `input` as stored items: messages, function calls and their outputs."""
    if isinstance(value, str):
        return [_message("user", value, None)]
    if not value:
        raise InvalidRequest("input must not be empty.", param="input")
    return [_item(raw, f"input.{i}") for i, raw in enumerate(value)]


def _item(raw: dict[str, Any], where: str) -> Item:
    kind = raw.get("type", "message")
    if kind == "message":
        role = raw.get("role")
        if role not in ("user", "system", "developer", "assistant"):
            raise InvalidRequest(f"Unknown message role {role!r}.", param=f"{where}.role")
        return _message(role, _text(raw.get("content"), f"{where}.content"), raw.get("id"))
    if kind == "function_call":
        for key in ("call_id", "name", "arguments"):
            if not isinstance(raw.get(key), str):
                raise InvalidRequest(f"A function_call item needs a string '{key}'.",
                                     param=f"{where}.{key}")
        return {"type": "function_call", "id": raw.get("id") or new_id("fc"),
                "call_id": raw["call_id"], "name": raw["name"], "arguments": raw["arguments"],
                "status": "completed"}
    if kind == "function_call_output":
        if not isinstance(raw.get("call_id"), str):
            raise InvalidRequest("A function_call_output item needs a string 'call_id'.",
                                 param=f"{where}.call_id")
        output = raw.get("output")
        if not isinstance(output, str):
            output = _text(output, f"{where}.output")
        return {"type": "function_call_output", "id": raw.get("id") or new_id("fco"),
                "call_id": raw["call_id"], "output": output, "status": "completed"}
    if kind == "reasoning":  # an earlier turn's, sent back as OpenAI asks
        content = raw.get("content") or []
        if not isinstance(content, list):
            raise InvalidRequest("A reasoning item's content must be a list of parts.",
                                 param=f"{where}.content")
        return _reasoning(_text(content, f"{where}.content"), raw.get("id"))
    raise UnsupportedParameter(
        f"Input items of type {kind!r} are not supported; this server takes messages, "
        "function_call, function_call_output and reasoning items.", param=f"{where}.type",
    )


def _text(content: Any, where: str) -> str:
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise InvalidRequest("Content must be a string or a list of parts.", param=where)
    parts = []
    for i, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind not in _TEXT_PARTS:
            raise UnsupportedParameter(
                f"Content parts of type {kind!r} are not supported; this model reads text only.",
                param=f"{where}.{i}.type",
            )
        text = part.get("refusal" if kind == "refusal" else "text")
        if not isinstance(text, str):
            raise InvalidRequest(f"A {kind} part needs a string text.", param=f"{where}.{i}")
        parts.append(text)
    return "".join(parts)


def _message(role: str, text: str, id: str | None) -> Item:
    if role == "assistant":
        return {"type": "message", "id": id or new_id("msg"), "role": "assistant",
                "status": "completed", "content": [_output_text(text)]}
    return {"type": "message", "id": id or new_id("msg"), "role": role,
            "content": [{"type": "input_text", "text": text}]}


def _reasoning(text: str, id: str | None, status: str = "completed") -> Item:
    return {"type": "reasoning", "id": id or new_id("rs"), "summary": [],
            "content": [_reasoning_text(text)] if text else [], "status": status}


def _reasoning_text(text: str) -> dict[str, Any]:
    return {"type": "reasoning_text", "text": text}


def _output_text(text: str) -> dict[str, Any]:
    return {"type": "output_text", "text": text, "annotations": [], "logprobs": []}


def chat_messages(items: list[Item], instructions: str | None) -> list[dict[str, Any]]:
    """Stored items as the chat template takes messages: consecutive function calls become
    one assistant message's `tool_calls`, their outputs `tool` messages; reasoning becomes
    the next assistant message's `reasoning_content`, which the template keeps or drops (as
    chat clients send it back)."""
    out: list[dict[str, Any]] = []
    if instructions:
        out.append({"role": "system", "content": instructions})
    thought: list[str] = []  # reasoning not yet given to an assistant message
    for item in items:
        if item["type"] == "reasoning":
            thought += [p["text"] for p in item["content"]]
            continue
        if item["type"] == "message":
            role = "system" if item["role"] == "developer" else item["role"]
            out.append({"role": role, "content": "".join(
                p.get("text", p.get("refusal", "")) for p in item["content"])})
        elif item["type"] == "function_call":
            call = {"id": item["call_id"], "type": "function",
                    "function": {"name": item["name"], "arguments": item["arguments"]}}
            last = out[-1] if out else None
            if last is not None and last["role"] == "assistant" and (
                    "tool_calls" in last or not last["content"]):
                last.setdefault("tool_calls", []).append(call)
            else:
                out.append({"role": "assistant", "content": "", "tool_calls": [call]})
        else:
            out.append({"role": "tool", "tool_call_id": item["call_id"], "content": item["output"]})
        if thought and out[-1]["role"] == "assistant":
            out[-1]["reasoning_content"] = "".join(thought)
            thought = []
    return out


Status = Literal["queued", "in_progress", "completed", "incomplete", "failed", "cancelled"]


class ResponseStream:
    """One response being generated: folds its deltas into output items and yields OpenAI's
    events for them, numbered by `sequence_number`, in OpenAI's order. `response` is the
    Response object as it stands (its final form once `finish`, `fail` or `cancel` ran)."""

    def __init__(self, response: dict[str, Any]) -> None:
        self.response = response
        self._seq = 0
        self._item: Item | None = None  # the output item being written
        self._text: list[str] = []  # of the open message or reasoning
        self._finish_reason: str | None = None  # the generation's, once it has one

    @property
    def output(self) -> list[Item]:
        return self.response["output"]

    def _event(self, kind: str, **fields: Any) -> dict[str, Any]:
        event = {"type": kind, "sequence_number": self._seq, **fields}
        self._seq += 1
        return event

    def _snapshot(self) -> dict[str, Any]:
        # Events carry the response as it was then, not a live reference.
        return {**self.response, "output": [dict(i) for i in self.output]}

    def start(self, status: Status = "in_progress") -> list[dict[str, Any]]:
        """`response.created` (and `response.queued` or `.in_progress`)."""
        self.response["status"] = status
        created = self._event("response.created", response=self._snapshot())
        kind = "response.queued" if status == "queued" else "response.in_progress"
        return [created, self._event(kind, response=self._snapshot())]

    def running(self) -> list[dict[str, Any]]:
        """A queued response begins."""
        if self.response["status"] != "queued":
            return []
        self.response["status"] = "in_progress"
        return [self._event("response.in_progress", response=self._snapshot())]

    def feed(self, batch: list[ChoiceDelta]) -> list[dict[str, Any]]:
        """The events of one step's deltas."""
        events: list[dict[str, Any]] = []
        for delta in batch:
            events += self._feed(delta)
            self._finish_reason = delta.finish_reason or self._finish_reason
        return events

    def _feed(self, delta: ChoiceDelta) -> list[dict[str, Any]]:
        events: list[dict[str, Any]] = []
        if delta.reasoning:
            events += self._append("reasoning", delta.reasoning, "response.reasoning_text.delta")
        if delta.text:
            events += self._append("message", delta.text, "response.output_text.delta",
                                   logprobs=[])
        for call in delta.tool_calls:
            if call.id is not None:
                events += self._close("completed")
                self._item = {"type": "function_call", "id": new_id("fc"), "call_id": call.id,
                              "name": call.name or "", "arguments": "", "status": "in_progress"}
                self.output.append(self._item)
                events.append(self._event("response.output_item.added",
                                          output_index=len(self.output) - 1, item=dict(self._item)))
            if call.arguments and self._item is not None:
                self._item["arguments"] += call.arguments
                events.append(self._event(
                    "response.function_call_arguments.delta", item_id=self._item["id"],
                    output_index=len(self.output) - 1, delta=call.arguments,
                ))
        return events

    def _append(self, kind: str, text: str, event: str, **fields: Any) -> list[dict[str, Any]]:
        """`text` added to the open item of `kind` (a message, or reasoning), which is opened
        first where another item is open."""
        events: list[dict[str, Any]] = []
        if self._item is None or self._item["type"] != kind:
            events += self._close("completed")
            events += self._open(kind)
        self._text.append(text)
        events.append(self._event(
            event, item_id=self._item["id"],  # type: ignore[index]
            output_index=len(self.output) - 1, content_index=0, delta=text, **fields,
        ))
        return events

    def _open(self, kind: str) -> list[dict[str, Any]]:
        if kind == "reasoning":
            self._item, part = _reasoning("", None, "in_progress"), _reasoning_text("")
        else:
            self._item = {"type": "message", "id": new_id("msg"), "role": "assistant",
                          "status": "in_progress", "content": []}
            part = _output_text("")
        self._text = []
        self.output.append(self._item)
        index = len(self.output) - 1
        return [
            self._event("response.output_item.added", output_index=index, item=dict(self._item)),
            self._event("response.content_part.added", item_id=self._item["id"],
                        output_index=index, content_index=0, part=part),
        ]

    def _close(self, status: Literal["completed", "incomplete"]) -> list[dict[str, Any]]:
        item, self._item = self._item, None
        if item is None:
            return []
        index = self.output.index(item)
        events = []
        if item["type"] == "message":
            text = "".join(self._text)
            part = _output_text(text)
            item["content"] = [part]
            events += [
                self._event("response.output_text.done", item_id=item["id"], output_index=index,
                            content_index=0, text=text, logprobs=[]),
                self._event("response.content_part.done", item_id=item["id"],
                            output_index=index, content_index=0, part=dict(part)),
            ]
        elif item["type"] == "reasoning":
            text = "".join(self._text)
            part = _reasoning_text(text)
            item["content"] = [part]
            events += [
                self._event("response.reasoning_text.done", item_id=item["id"],
                            output_index=index, content_index=0, text=text),
                self._event("response.content_part.done", item_id=item["id"],
                            output_index=index, content_index=0, part=dict(part)),
            ]
        else:
            events.append(self._event(
                "response.function_call_arguments.done", item_id=item["id"], name=item["name"],
                output_index=index, arguments=item["arguments"],
            ))
        item["status"] = status
        events.append(self._event("response.output_item.done", output_index=index,
                                  item=dict(item)))
        return events

    def finish(self, usage: Usage) -> list[dict[str, Any]]:
        """The generation ended (with finish reason "length": cut off)."""
        cut = self._finish_reason == "length"
        events = self._close("incomplete" if cut else "completed")
        self.response["usage"] = usage_body(usage)
        if cut:
            self.response["status"] = "incomplete"
            self.response["incomplete_details"] = {"reason": "max_output_tokens"}
            return [*events, self._event("response.incomplete", response=self._snapshot())]
        self.response["status"] = "completed"
        self.response["completed_at"] = int(time.time())
        return [*events, self._event("response.completed", response=self._snapshot())]

    def fail(self, message: str, usage: Usage | None = None) -> list[dict[str, Any]]:
        events = self._close("incomplete")
        self.response["status"] = "failed"
        self.response["error"] = {"code": "server_error", "message": message}
        if usage is not None:
            self.response["usage"] = usage_body(usage)
        return [*events, self._event("response.failed", response=self._snapshot())]

    def cancel(self, usage: Usage | None = None) -> list[dict[str, Any]]:
        """Cancelled on request: the items so far end incomplete; no closing event exists for
        this in OpenAI's stream, so the stream simply ends."""
        events = self._close("incomplete")
        self.response["status"] = "cancelled"
        if usage is not None:
            self.response["usage"] = usage_body(usage)
        return events


def usage_body(usage: Usage) -> dict[str, Any]:
    return {
        "input_tokens": usage.prompt_tokens,
        "input_tokens_details": {"cached_tokens": 0, "cache_write_tokens": 0},
        "output_tokens": usage.completion_tokens,
        "output_tokens_details": {"reasoning_tokens": usage.reasoning_tokens or 0},
        "total_tokens": usage.total_tokens,
    }
