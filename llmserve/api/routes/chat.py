"""POST /v1/chat/completions"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import aclosing

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
    request_id,
    request_key_hash,
    start_generations,
)
from llmserve.api.state import AppState, app_state
from llmserve.api.streams import event_stream, follow_run
from llmserve.errors import EngineUnavailable, InvalidRequest, LLMServeError
from llmserve.models import ServedModel
from llmserve.serving.chat_completions import (
    Answer,
    StoredCompletion,
    completion,
    first_choices,
    step_choices,
)
from llmserve.serving.collect import collect, collect_batch
from llmserve.serving.generation import Generation
from llmserve.serving.runs import CHAT_COMPLETION, Run
from llmserve.serving.sampling import SamplingRequest
from llmserve.serving.shapes import usage_body

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
    saver = (StoredCompletion(store, head, n=body.n, want_logprobs=want_logprobs,
                              messages=_stored_messages(body, head["id"]),
                              metadata=body.metadata or {}, key_hash=request_key_hash(request))
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
    result = completion(head, choices, gen.usage, want_logprobs)
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


async def _with_done(chunks: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
    async with aclosing(chunks) as it:
        async for block in it:
            yield block
    yield sse.DONE


def _keep_running(request: Request, state: AppState, gen: Generation,
                  chunks: AsyncIterator[bytes], saver: StoredCompletion) -> Response:
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


async def _stream(
    gen: Generation, head: dict, n: int, include_usage: bool, tools: bool,
    answer: Answer | None = None,
) -> AsyncIterator[bytes]:
    """The stream's chunks, one block per step (without `[DONE]`); `answer` gathers the
    whole answer on the way (and an error that ends it), for a completion that is stored."""
    enc = sse.ChunkEncoder(object="chat.completion.chunk", include_usage=include_usage, **head)
    yield b"".join([enc.choice(c) for c in first_choices(n, tools)])
    try:
        async with aclosing(gen.deltas()) as deltas:
            async for batch in deltas:
                if answer is not None:
                    collect_batch(answer.choices, batch)
                yield b"".join([enc.choice(c) for c in step_choices(batch)])
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


def _stored_messages(body: ChatCompletionRequest, id: str) -> list[dict]:
    """The request's messages as a stored completion keeps them."""
    return [
        {"id": f"{id}-{i}", "role": m.role, "refusal": None,
         "content": m.text(f"messages.{i}"), "name": (m.model_extra or {}).get("name"),
         "content_parts": m.content if isinstance(m.content, list) else None}
        for i, m in enumerate(body.messages)
    ]


