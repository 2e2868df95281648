"""POST /v1/chat/completions"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import aclosing
from dataclasses import dataclass

import orjson
from fastapi import APIRouter, Request
from fastapi.responses import Response

from llmserve.api import sse
from llmserve.api.bodies import parse_body
from llmserve.api.loading import Started, chat_model_or_loading, stream_once_loaded
from llmserve.api.lookup import chat_model
from llmserve.api.protocol import ChatCompletionRequest
from llmserve.api.requests import (
    cancel_on_disconnect,
    logprob_value,
    request_id,
    request_key_hash,
    start_generations,
    usage_body,
)
from llmserve.api.state import AppState, app_state
from llmserve.api.streams import event_stream, follow_run
from llmserve.errors import EngineUnavailable, InvalidRequest, LLMServeError
from llmserve.models import ServedModel
from llmserve.serving.collect import CollectedChoice, collect, collect_batch
from llmserve.serving.generation import Generation, TokenLogprob, Usage
from llmserve.serving.runs import CHAT_COMPLETION, Run
from llmserve.serving.sampling import SamplingRequest
from llmserve.serving.tool_calls import ToolCallDelta
from llmserve.store import Store

log = logging.getLogger(__name__)
router = APIRouter()


@router.post("/v1/chat/completions")
async def create_chat_completion(request: Request) -> Response:
    body = await parse_body(request, ChatCompletionRequest)
    state = app_state(request)
    store = state.store
    if body.store and store is None:
        raise InvalidRequest("store needs the store, and this server runs with --store none.",
                             param="store")
    if body.stream and not body.store:
        got = await chat_model_or_loading(request, body.model)
        if isinstance(got, asyncio.Task):  # still loading: the stream starts meanwhile
            async def start(served: ServedModel) -> Started:
                gen, head, sampling, tools = await _begin(request, served, body)
                chunks = _stream(gen, head, sampling.n, body.include_usage, tools)
                return _with_done(chunks), [gen]

            return stream_once_loaded(request, got, start)
        served = got
    else:
        served = await chat_model(request, body.model)
    gen, head, sampling, tools = await _begin(request, served, body)
    want_logprobs = sampling.logprobs is not None
    saver = (_Saver(store, body, head, want_logprobs, request_key_hash(request))
             if body.store and store is not None else None)
    if body.stream:
        chunks = _stream(gen, head, sampling.n, body.include_usage, tools,
                         saver.answer if saver is not None else None)
        if saver is not None:
            return _keep_running(request, state, gen, chunks, saver)
        return event_stream(request, sse.numbered(_with_done(chunks)), [gen])

    try:
        async with cancel_on_disconnect(request):
            choices = await collect(gen.deltas(), sampling.n)
    finally:
        gen.close()
    result = _completion(head, choices, gen.usage, want_logprobs)
    if saver is not None:
        await saver.save(result)
    return Response(orjson.dumps(result), media_type="application/json")


async def _begin(request: Request, served: ServedModel, body: ChatCompletionRequest
                 ) -> tuple[Generation, dict, SamplingRequest, bool]:
    """The request's generation started on `served`: it, the chunks' common fields, the
    sampling asked for, and whether tools may be called."""
    sampling = body.to_sampling()
    prepared = await served.prepare.chat(
        body.template_messages(), sampling, body.stop_list, body.output_request(),
        template_kwargs=body.chat_template_kwargs, reasoning_effort=body.reasoning_effort,
    )
    [gen] = start_generations(
        served, prepared, request_id=request_id(request), metrics=app_state(request).metrics
    )
    head = {
        # Time first: stored completions of one second list in the order they were made.
        "id": f"chatcmpl-{time.time_ns():016x}{uuid.uuid4().hex[:16]}",
        "created": int(time.time()),
        "model": served.name,
    }
    return gen, head, sampling, prepared.parser is not None


def _completion(head: dict, choices: list[CollectedChoice], usage: Usage,
                want_logprobs: bool, error: LLMServeError | None = None) -> dict:
    """The chat.completion object. A stored stream that ended early (`error`) says why in
    `error` (as a Response does), and its unfinished choices' finish_reason is "error"."""
    completion = {
        **head,
        "object": "chat.completion",
        "choices": [
            {
                "index": i,
                "message": _message(c),
                "logprobs": _logprobs(c.logprobs) if want_logprobs else None,
                "finish_reason": c.finish_reason or ("error" if error else None),
            }
            for i, c in enumerate(choices)
        ],
        "usage": usage_body(usage),
    }
    if error is not None:
        completion["error"] = {"message": error.message, "type": error.type,
                               "code": error.code}
    return completion


@dataclass
class _Answer:
    """A stored stream's answer as it stands."""

    choices: list[CollectedChoice]
    error: LLMServeError | None = None  # why it ended before its end


class _Saver:
    """A completion with `store: true`: kept with its request's messages and metadata."""

    def __init__(self, store: Store, body: ChatCompletionRequest, head: dict,
                 want_logprobs: bool, key_hash: str) -> None:
        self._store = store
        self.key_hash = key_hash  # whose it is
        self._body = body
        self._head = head
        self._want_logprobs = want_logprobs
        self.answer = _Answer([CollectedChoice() for _ in range(body.n)])  # filled by a stream

    @property
    def id(self) -> str:
        return self._head["id"]

    async def save(self, completion: dict | None = None, usage: Usage | None = None) -> None:
        if completion is None:
            assert usage is not None
            completion = _completion(self._head, self.answer.choices, usage,
                                     self._want_logprobs, self.answer.error)
        metadata = self._body.metadata or {}
        messages = [
            {"id": f"{self.id}-{i}", "role": m.role, "refusal": None,
             "content": m.text(f"messages.{i}"), "name": (m.model_extra or {}).get("name"),
             "content_parts": m.content if isinstance(m.content, list) else None}
            for i, m in enumerate(self._body.messages)
        ]
        await self._store.save_chat({**completion, "metadata": metadata},
                                    messages=messages, metadata=metadata,
                                    key_hash=self.key_hash)


async def _with_done(chunks: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
    async with aclosing(chunks) as it:
        async for block in it:
            yield block
    yield sse.DONE


def _keep_running(request: Request, state: AppState, gen: Generation,
                  chunks: AsyncIterator[bytes], saver: _Saver) -> Response:
    """A stored stream runs on its own: a client that hangs up leaves it running, and
    resumes it with GET /v1/chat/completions/{id}?stream=true and Last-Event-ID."""
    id = saver.id

    async def work(run: Run) -> None:
        def write(event: bytes) -> None:  # one entry per event: its id is its place
            run.log.write(b"id: %d\n%s\n\n" % (len(run.log), event))

        try:
            try:
                async with aclosing(chunks) as it:
                    async for block in it:
                        for event in block.split(b"\n\n")[:-1]:
                            write(event)
            finally:
                gen.close()
        except asyncio.CancelledError:
            # Stopped (server shutdown, or deleted): kept with what it has and why it ended.
            saver.answer.error = (
                EngineUnavailable("The server shut down before this completion finished.")
                if run.stopping else
                LLMServeError("This completion was cancelled before it finished.",
                              code="cancelled"))
            write(sse.error_event(saver.answer.error)[:-2])
        # Kept before [DONE] goes out: a client that reads it finds the completion.
        await saver.save(usage=gen.usage)
        write(sse.DONE[:-2])
        await state.store.append_events(id, run.log.events())  # type: ignore[union-attr]

    run = state.runs.start(id, CHAT_COMPLETION, work, key_hash=saver.key_hash)
    return follow_run(request, run, -1)


def _message(c: CollectedChoice) -> dict:
    text = "".join(c.text)
    message = {"role": "assistant", "content": text if text or not c.tool_calls else None,
               "refusal": None}
    if c.reasoning:  # vLLM's and llama-server's name for a thinking model's reasoning
        message["reasoning_content"] = "".join(c.reasoning)
    if c.tool_calls:
        message["tool_calls"] = c.tool_calls
    return message


async def _stream(
    gen: Generation, head: dict, n: int, include_usage: bool, tools: bool,
    answer: _Answer | None = None,
) -> AsyncIterator[bytes]:
    """The stream's chunks, one block per step (without `[DONE]`); `answer` gathers the
    whole answer on the way (and an error that ends it), for a completion that is stored."""
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
                if answer is not None:
                    collect_batch(answer.choices, batch)
                parts = []
                for d in batch:
                    logprobs = _logprobs(d.logprobs) if d.logprobs else None
                    if d.reasoning:  # before the answer's text of the same step
                        parts.append(enc.choice({
                            "index": d.index,
                            "delta": {"reasoning_content": d.reasoning},
                            "logprobs": logprobs,
                            "finish_reason": None,
                        }))
                        logprobs = None
                    if d.text or logprobs:
                        parts.append(enc.choice({
                            "index": d.index,
                            "delta": {"content": d.text},
                            "logprobs": logprobs,
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
        error = exc
    except Exception as exc:  # noqa: BLE001 - the client still gets a well-formed ending
        log.exception("stream %s failed", head["id"])
        error = LLMServeError(f"Internal error: {exc}", code="internal_error")
    else:
        return
    if answer is not None:
        answer.error = error
    yield sse.error_event(error)


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
