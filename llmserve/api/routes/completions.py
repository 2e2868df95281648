"""POST /v1/completions"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import aclosing
from typing import NamedTuple

import orjson
from fastapi import APIRouter, Request
from fastapi.responses import Response

from llmserve.api import sse
from llmserve.api.bodies import parse_body
from llmserve.api.loading import Started, chat_model_or_loading, stream_once_loaded
from llmserve.api.lookup import chat_model
from llmserve.api.protocol import CompletionRequest
from llmserve.api.requests import (
    cancel_on_disconnect,
    close_all,
    request_id,
    start_generations,
)
from llmserve.api.state import app_state
from llmserve.api.streams import event_stream
from llmserve.errors import LLMServeError
from llmserve.models import ServedModel
from llmserve.serving.collect import collect
from llmserve.serving.detokenizer import IncrementalDetokenizer
from llmserve.serving.generation import ChoiceDelta, Generation, TokenLogprob, Usage, merge
from llmserve.serving.shapes import logprob_value, usage_body

log = logging.getLogger(__name__)
router = APIRouter()


@router.post("/v1/completions")
async def create_completion(request: Request) -> Response:
    body = await parse_body(request, CompletionRequest)
    if body.stream:
        got = await chat_model_or_loading(request, body.model)
        if isinstance(got, asyncio.Task):  # still loading: the stream starts meanwhile
            async def start(served: ServedModel) -> Started:
                run = await _begin(request, served, body)
                return _stream(*run, body.include_usage), run.gens

            return stream_once_loaded(request, got, start)
        run = await _begin(request, got, body)
        return event_stream(request, sse.numbered(_stream(*run, body.include_usage)), run.gens)
    run = await _begin(request, await chat_model(request, body.model), body)
    gens, head, n, echoes, want_logprobs = run

    try:
        async with cancel_on_disconnect(request):
            choices = await collect(merge(gens), n * len(gens))
    finally:
        close_all(gens)
    result = {
        **head,
        "object": "text_completion",
        "choices": [
            {
                "index": i,
                "text": echoes[i // n] + "".join(c.text),
                "logprobs": (
                    _logprobs(c.logprobs, _Offsets(len(echoes[i // n]))) if want_logprobs else None
                ),
                "finish_reason": c.finish_reason,
            }
            for i, c in enumerate(choices)
        ],
        "usage": usage_body(_total(gens)),
    }
    return Response(orjson.dumps(result), media_type="application/json")


class _Run(NamedTuple):
    """A completion request's generations started, and what its answer is made with."""

    gens: list[Generation]
    head: dict
    n: int
    echoes: list[str]
    want_logprobs: bool


async def _begin(request: Request, served: ServedModel, body: CompletionRequest) -> _Run:
    sampling = body.to_sampling()
    prepared = await served.prepare.completion(body.prompts(), sampling, body.stop_list)
    echoes = [served.prepare.prompt_text(p.tokens) if body.echo else "" for p in prepared.prompts]
    gens = start_generations(
        served, prepared, request_id=request_id(request), metrics=app_state(request).metrics
    )
    head = {"id": f"cmpl-{uuid.uuid4().hex}", "created": int(time.time()), "model": served.name}
    return _Run(gens, head, sampling.n, echoes, sampling.logprobs is not None)


async def _stream(
    gens: list[Generation], head: dict, n: int, echoes: list[str], want_logprobs: bool,
    include_usage: bool,
) -> AsyncIterator[bytes]:
    enc = sse.ChunkEncoder(object="text_completion", include_usage=include_usage, **head)
    offsets = [_Offsets(len(echoes[i // n])) for i in range(n * len(gens))]
    try:
        if any(echoes):
            yield b"".join(
                enc.choice({"index": i, "text": echoes[i // n], "logprobs": None, "finish_reason": None})
                for i in range(len(offsets))
            )
        async with aclosing(merge(gens)) as deltas:
            async for batch in deltas:
                yield b"".join(_chunk(enc, d, offsets, want_logprobs) for d in batch)
        if include_usage:
            yield enc.usage(usage_body(_total(gens)))
    except LLMServeError as exc:
        log.warning("stream %s failed: %s", head["id"], exc.message)
        yield sse.error_event(exc)
    except Exception as exc:  # noqa: BLE001 - the client still gets a well-formed ending
        log.exception("stream %s failed", head["id"])
        yield sse.error_event(LLMServeError(f"Internal error: {exc}", code="internal_error"))
    yield sse.DONE


def _chunk(enc: sse.ChunkEncoder, d: ChoiceDelta, offsets: list[_Offsets], want_logprobs: bool) -> bytes:
    logprobs = _logprobs(d.logprobs, offsets[d.index]) if want_logprobs else None
    return enc.choice(
        {"index": d.index, "text": d.text, "logprobs": logprobs, "finish_reason": d.finish_reason}
    )


def _total(gens: list[Generation]) -> Usage:
    return Usage(
        prompt_tokens=sum(g.usage.prompt_tokens for g in gens),
        completion_tokens=sum(g.usage.completion_tokens for g in gens),
    )


class _Offsets:
    """`text_offset`: the characters of text before each token. A token ending inside a
    character adds nothing; the token completing it adds the whole character."""

    def __init__(self, start: int) -> None:
        self._chars = start
        self._text = IncrementalDetokenizer()

    def next(self, data: bytes) -> int:
        at = self._chars
        self._chars += len(self._text.feed(data))
        return at


def _logprobs(entries: list[TokenLogprob], offsets: _Offsets) -> dict:
    tokens, token_logprobs, top, text_offset = [], [], [], []
    for e in entries:
        tokens.append(e.token)
        token_logprobs.append(logprob_value(e.logprob))
        top.append({t: logprob_value(lp) for t, _, lp in e.top})
        text_offset.append(offsets.next(e.bytes))
    return {
        "tokens": tokens,
        "token_logprobs": token_logprobs,
        "top_logprobs": top,
        "text_offset": text_offset,
    }
