"""A streamed request for a model that is still loading.

A model loaded on demand can take longer to load than a proxy or client waits in silence
(nginx: 60 s). So a stream does not wait for the load before it answers: once the keep-alive
interval has passed with the model still loading, the stream starts, its keep-alive comments
flow while the load goes on, and what would have been an error status (the load failed, or
took longer than the queue timeout) comes as the stream's error event. A model that is loaded,
or loads or fails within that interval, answers as any other request, with its status.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import aclosing

from starlette.requests import Request

from llmserve.api import sse
from llmserve.api.lookup import chat_model
from llmserve.api.state import app_state
from llmserve.api.streams import event_stream
from llmserve.errors import LLMServeError
from llmserve.models import ServedModel
from llmserve.serving.generation import Generation

# What a stream's start gives: its events (ending with [DONE]) and the generations they read.
Started = tuple[AsyncIterator[bytes], list[Generation]]


async def chat_model_or_loading(request: Request, name: str) -> ServedModel | asyncio.Task:
    """The chat model `name` once loaded, if that takes at most the keep-alive interval;
    else the task that is still loading it (for `stream_once_loaded`)."""
    patience = app_state(request).settings.sse_keepalive
    if patience <= 0:  # no keep-alives to send: wait as any request does
        return await chat_model(request, name)
    task = asyncio.ensure_future(chat_model(request, name))
    try:
        await asyncio.wait({task}, timeout=patience)
    except BaseException:
        task.cancel()
        raise
    return await task if task.done() else task


def stream_once_loaded(
    request: Request, loading: asyncio.Task,
    start: Callable[[ServedModel], Awaitable[Started]],
) -> sse.EventStreamResponse:
    """A stream that answers at once, with keep-alive comments until `loading` gives the
    model, then the events `start` makes of it; a client that hangs up meanwhile stops the
    wait (the registry gives its place in line back)."""
    gens: list[Generation] = []

    async def events() -> AsyncIterator[bytes]:
        try:
            chunks, started = await start(await loading)
        except LLMServeError as exc:
            yield sse.error_event(exc)
            yield sse.DONE
            return
        finally:
            loading.cancel()  # nothing once it is done
        gens.extend(started)
        async with aclosing(chunks) as it:
            async for block in it:
                yield block

    return event_stream(request, sse.numbered(events()), gens)
