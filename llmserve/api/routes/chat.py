"""POST /v1/chat/completions"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import aclosing

import orjson
from fastapi import APIRouter, Request
from fastapi.responses import Response

from llmserve.api import sse
from llmserve.api.protocol import ChatCompletionRequest
from llmserve.api.requests import (
    CollectedChoice,
    cancel_on_disconnect,
    collect,
    event_stream,
    logprob_value,
    parse_body,
    request_id,
    start_generations,
    usage_body,
)
from llmserve.api.state import app_state
from llmserve.errors import LLMServeError
from llmserve.serving.generation import Generation, TokenLogprob
from llmserve.serving.tool_calls import ToolCallDelta

log = logging.getLogger(__name__)
router = APIRouter()


@router.post("/v1/chat/completions")
async def create_chat_completion(request: Request) -> Response:
    body = await parse_body(request, ChatCompletionRequest)
    served = app_state(request).registry.get(body.model)
    sampling = body.to_sampling()
    prepared = await served.prepare.chat(
        body.template_messages(), sampling, body.stop_list, body.output_request()
    )
    [gen] = start_generations(
        served, prepared, request_id=request_id(request), metrics=app_state(request).metrics
    )
    head = {
        "id": f"chatcmpl-{uuid.uuid4().hex}",
        "created": int(time.time()),
        "model": served.name,
    }
    tools = prepared.parser is not None
    if body.stream:
        return event_stream(
            request, _stream(gen, head, sampling.n, body.include_usage, tools), [gen]
        )

    try:
        async with cancel_on_disconnect(request):
            choices = await collect(gen.deltas(), sampling.n)
    finally:
        gen.close()
    want_logprobs = sampling.logprobs is not None
    result = {
        **head,
        "object": "chat.completion",
        "choices": [
            {
                "index": i,
                "message": _message(c),
                "logprobs": _logprobs(c.logprobs) if want_logprobs else None,
                "finish_reason": c.finish_reason,
            }
            for i, c in enumerate(choices)
        ],
        "usage": usage_body(gen.usage),
    }
    return Response(orjson.dumps(result), media_type="application/json")


def _message(c: CollectedChoice) -> dict:
    text = "".join(c.text)
    message = {"role": "assistant", "content": text if text or not c.tool_calls else None,
               "refusal": None}
    if c.tool_calls:
        message["tool_calls"] = c.tool_calls
    return message


async def _stream(
    gen: Generation, head: dict, n: int, include_usage: bool, tools: bool
) -> AsyncIterator[bytes]:
    enc = sse.ChunkEncoder(object="chat.completion.chunk", include_usage=include_usage, **head)
    # With tools the answer may be calls alone: no content until there is some, as at OpenAI.
    first = {"role": "assistant", "content": None if tools else ""}
    yield b"".join(
        enc.choice({"index": i, "delta": first, "logprobs": None, "finish_reason": None})
        for i in range(n)
    )
    try:
        async with aclosing(gen.deltas()) as deltas:
            async for batch in deltas:
                parts = []
                for d in batch:
                    if d.text or d.logprobs:
                        parts.append(enc.choice({
                            "index": d.index,
                            "delta": {"content": d.text},
                            "logprobs": _logprobs(d.logprobs) if d.logprobs else None,
                            "finish_reason": None,
                        }))
                    if d.tool_calls:
                        parts.append(enc.choice({
                            "index": d.index,
                            "delta": {"tool_calls": [_call_delta(c) for c in d.tool_calls]},
                            "logprobs": None,
                            "finish_reason": None,
                        }))
                    if d.finish_reason:
                        parts.append(enc.choice({
                            "index": d.index, "delta": {}, "logprobs": None,
                            "finish_reason": d.finish_reason,
                        }))
                yield b"".join(parts)
        if include_usage:
            yield enc.usage(usage_body(gen.usage))
    except LLMServeError as exc:
        log.warning("stream %s failed: %s", head["id"], exc.message)
        yield sse.error_event(exc)
    except Exception as exc:  # noqa: BLE001 - the client still gets a well-formed ending
        log.exception("stream %s failed", head["id"])
        yield sse.error_event(LLMServeError(f"Internal error: {exc}", code="internal_error"))
    yield sse.DONE


def _call_delta(c: ToolCallDelta) -> dict:
    if c.id is None:
        return {"index": c.index, "function": {"arguments": c.arguments}}
    return {"index": c.index, "id": c.id, "type": "function",
            "function": {"name": c.name, "arguments": c.arguments}}


def _logprobs(entries: list[TokenLogprob]) -> dict:
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
