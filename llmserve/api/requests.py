"""What generation routes do alike around a request: who sent it, whether it hung up,
starting its generations (taking their places in line), and the JSON bodies they answer
with. Bodies are read in api/bodies.py, streams sent in api/streams.py."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any, Literal

import orjson
from starlette.requests import Request
from starlette.responses import Response

from llmserve.api.state import app_state
from llmserve.errors import ClientGone, InvalidRequest, LLMServeError
from llmserve.models import ServedModel
from llmserve.serving.availability import ensure_up
from llmserve.serving.generation import Generation
from llmserve.serving.metrics import Metrics
from llmserve.serving.prepare import Prepared


def json_response(body: Any) -> Response:
    return Response(orjson.dumps(body), media_type="application/json")


def list_page(
    items: list[dict], *, after: str | None, limit: int, order: Literal["asc", "desc"],
    what: str,
) -> dict:
    """OpenAI's list object over `items` (oldest first, each with an `id`): `limit` of them
    in `order`, after the one with id `after`."""
    items = items[::-1] if order == "desc" else items
    if after is not None:
        ids = [i["id"] for i in items]
        if after not in ids:
            raise InvalidRequest(f"No {what} with id '{after}'.", param="after")
        items = items[ids.index(after) + 1:]
    return page_body(items[:limit], len(items) > limit)


def page_body(data: list[dict], has_more: bool) -> dict:
    return {"object": "list", "data": data, "has_more": has_more,
            "first_id": data[0]["id"] if data else "", "last_id": data[-1]["id"] if data else ""}


def request_key_hash(request: Request) -> str:
    """Whose stored items this request may see: set by the API key check, which every /v1
    route has (a route without it fails here rather than seeing anyone's)."""
    return request.state.key_hash


def request_id(request: Request) -> str | None:
    """The id the request-id middleware gave this request (echoed as X-Request-ID)."""
    return getattr(request.state, "request_id", None)


@asynccontextmanager
async def cancel_on_disconnect(request: Request) -> AsyncIterator[None]:
    """Cancel the enclosed work when the client hangs up (for answers not streamed yet:
    a streaming response notices on its own when a write fails), or end it with an error
    when a shutting-down server's drain time is up."""
    task = asyncio.current_task()
    assert task is not None
    disconnected = False
    aborted: LLMServeError | None = None

    async def watch() -> None:
        nonlocal disconnected
        while True:
            message = await request.receive()
            if message["type"] == "http.disconnect":
                disconnected = True
                task.cancel()
                return

    def abort(exc: LLMServeError) -> None:
        nonlocal aborted
        aborted = exc
        task.cancel()

    watcher = asyncio.create_task(watch())
    try:
        with app_state(request).inflight.track(abort):
            yield
    except asyncio.CancelledError:
        if disconnected:
            raise ClientGone() from None
        if aborted is not None:
            raise aborted from None
        raise
    finally:
        watcher.cancel()


def close_all(gens: list[Generation]) -> None:
    for gen in gens:
        gen.close()


def start_generations(
    served: ServedModel,
    prepared: Prepared,
    *,
    request_id: str | None = None,
    metrics: Metrics | None = None,
) -> list[Generation]:
    """One generation per prepared prompt, n choices each, numbered prompt by prompt, each
    holding its place in line from now on (429 now if the line is full), reporting to the
    model's `metrics`. The caller must see that every one is run or closed (`close_all`)."""
    ensure_up(served.name, served.engine.health())
    model_metrics = metrics.model(served.name) if metrics is not None else None
    gens: list[Generation] = []
    try:
        for i, prompt in enumerate(prepared.prompts):
            gens.append(Generation(
                served.engine, prompt.tokens, prompt.params, stop=prepared.stop,
                index_offset=i * prepared.n, reservation=served.scheduler.reserve(prepared.n),
                request_id=request_id, metrics=model_metrics, parser=prepared.parser,
                calls_finish=prepared.calls_finish, reasoning=prepared.reasoning,
            ))
    except BaseException:
        close_all(gens)
        raise
    return gens
