"""What every generation route does alike: read the body, watch for a client that hangs
up, take sequence slots, and collect the deltas of a whole (non-streamed) answer."""

from __future__ import annotations

import asyncio
import json
import math
from collections.abc import AsyncIterator
from contextlib import aclosing, asynccontextmanager
from dataclasses import dataclass, field
from typing import Any, Literal, TypeVar

import anyio.to_thread
import orjson
from pydantic import BaseModel, ValidationError
from starlette.requests import Request
from starlette.responses import Response

from llmserve.api.errors import validation_error
from llmserve.api.sse import EventStreamResponse
from llmserve.api.state import app_state
from llmserve.errors import ClientGone, InvalidRequest, LLMServeError
from llmserve.models import ServedModel
from llmserve.serving.availability import ensure_up
from llmserve.serving.generation import ChoiceDelta, Generation, TokenLogprob, Usage
from llmserve.serving.metrics import Metrics
from llmserve.serving.prepare import Prepared
from llmserve.serving.runs import Run
from llmserve.serving.tool_calls import ToolCallDelta

M = TypeVar("M", bound=BaseModel)


# Bodies larger than this are parsed and validated on a worker thread: a multi-megabyte body
# costs its own request, not the event loop's streams.
PARSE_INLINE_BYTES = 256 * 1024


async def parse_body(request: Request, model: type[M]) -> M:
    raw = await request.body()
    if len(raw) > PARSE_INLINE_BYTES:
        return await anyio.to_thread.run_sync(_parse, raw, model)
    return _parse(raw, model)


def _parse(raw: bytes, model: type[M]) -> M:
    try:
        data = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        _refuse_non_finite(raw, model)
        raise InvalidRequest(f"The request body is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise InvalidRequest("The request body must be a JSON object.")
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise validation_error(exc.errors(include_url=False)) from None


def _refuse_non_finite(raw: bytes, model: type[BaseModel]) -> None:
    """orjson refuses NaN, Infinity, -Infinity and numbers too large for a double, which are
    not JSON but which Python's json module writes (and reads). For a body that is JSON but
    for such numbers, raise a 400 naming the field that holds one rather than "not valid JSON":
    the model's own validation says what is wrong where; a number in a field it does not check
    is named by its path. Such a body is never served. Returns for any other invalid body."""
    try:
        data = json.loads(raw)
    except (ValueError, RecursionError):  # not JSON even for Python (or nested too deeply)
        return
    path = _first_non_finite(data)
    if path is None:  # refused for another reason (a lone surrogate, ...): orjson's error
        return
    if isinstance(data, dict):
        try:
            model.model_validate(data)
        except ValidationError as exc:
            raise validation_error(exc.errors(include_url=False)) from None
    param = ".".join(path) or None
    raise InvalidRequest(
        f"Invalid value for '{param}': NaN and infinite numbers are not valid JSON."
        if param else "NaN and infinite numbers are not valid JSON.",
        param=param,
    )


def _first_non_finite(data: object) -> list[str] | None:
    """The path (keys and list indices) of the first NaN or infinite float in `data`."""
    todo: list[tuple[object, list[str]]] = [(data, [])]
    while todo:
        value, path = todo.pop()
        if isinstance(value, float) and not math.isfinite(value):
            return path
        if isinstance(value, dict):
            todo.extend((v, [*path, str(k)]) for k, v in reversed(value.items()))
        elif isinstance(value, list):
            todo.extend((v, [*path, str(i)]) for i, v in reversed(list(enumerate(value))))
    return None


def event_stream(
    request: Request, content: AsyncIterator[bytes], gens: list[Generation]
) -> EventStreamResponse:
    """A streamed answer with this server's keep-alive and write timeout; the generations'
    places in line are given back when it ends, even if it never started."""
    state = app_state(request)
    return EventStreamResponse(
        content, keepalive=state.settings.sse_keepalive,
        write_timeout=state.settings.write_timeout, on_close=lambda: close_all(gens),
        on_stall=state.metrics.streams_dropped_stalled.inc, inflight=state.inflight,
        request_id=request_id(request),
    )


def follow_run(request: Request, run: Run, after: int) -> EventStreamResponse:
    """A run's events numbered above `after`, then live; a client that hangs up leaves the
    run going."""

    async def events() -> AsyncIterator[bytes]:
        async with aclosing(run.log.follow(after)) as it:
            async for _, data in it:
                yield data

    return event_stream(request, events(), [])


def replay_events(request: Request, events: list[tuple[int, bytes]]) -> EventStreamResponse:
    """Stored events (of a run that ended) as a stream."""

    async def replay() -> AsyncIterator[bytes]:
        for _, data in events:
            yield data

    return event_stream(request, replay(), [])


def resume_after(raw: str | None, count: int, param: str) -> int:
    """The event a resumed stream starts after, from the client's `raw` position (a header
    or query parameter named `param`): absent or empty means from the start (-1); else it
    must be the id of an event already written, an integer from 0 to `count - 1`, or the
    request is a 400. The same rule whether the run is live or replayed from the store."""
    if raw is None or not raw.strip():
        return -1
    text = raw.strip()
    # Digits only: no sign, no exponent; too many digits is out of range before int() runs.
    if text.isascii() and text.isdigit() and len(text) <= 18 and int(text) < count:
        return int(text)
    what = f"an integer from 0 to {count - 1}" if count else "and it has none yet"
    raise InvalidRequest(f"{param} must be the id of an event of this stream, {what}.",
                         param=param)


def resume_run(request: Request, run: Run, raw: str | None, param: str) -> EventStreamResponse:
    """A live (or just ended) run's events after the client's position `raw`."""
    return follow_run(request, run, resume_after(raw, len(run.log), param))


def resume_stored(
    request: Request, events: list[tuple[int, bytes]], raw: str | None, param: str
) -> EventStreamResponse:
    """A stored stream's events after the client's position `raw`."""
    after = resume_after(raw, len(events), param)
    return replay_events(request, [(i, e) for i, e in events if i > after])


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


@dataclass
class CollectedChoice:
    text: list[str] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)
    finish_reason: str | None = None
    tool_calls: list[dict] = field(default_factory=list)  # OpenAI's, assembled
    reasoning: list[str] = field(default_factory=list)

    def add_calls(self, deltas: list[ToolCallDelta]) -> None:
        for d in deltas:
            if d.id is not None:
                self.tool_calls.append({"id": d.id, "type": "function",
                                        "function": {"name": d.name, "arguments": d.arguments}})
            else:
                self.tool_calls[-1]["function"]["arguments"] += d.arguments


def collect_batch(choices: list[CollectedChoice], batch: list[ChoiceDelta]) -> None:
    for d in batch:
        c = choices[d.index]
        c.text.append(d.text)
        if d.reasoning:
            c.reasoning.append(d.reasoning)
        c.logprobs.extend(d.logprobs)
        if d.tool_calls:
            c.add_calls(d.tool_calls)
        if d.finish_reason:
            c.finish_reason = d.finish_reason


async def collect(deltas: AsyncIterator[list[ChoiceDelta]], n: int) -> list[CollectedChoice]:
    choices = [CollectedChoice() for _ in range(n)]
    async with aclosing(deltas) as it:
        async for batch in it:
            collect_batch(choices, batch)
    return choices


def usage_body(usage: Usage) -> dict:
    body: dict = {
        "prompt_tokens": usage.prompt_tokens,
        "completion_tokens": usage.completion_tokens,
        "total_tokens": usage.total_tokens,
    }
    if usage.reasoning_tokens is not None:
        body["completion_tokens_details"] = {"reasoning_tokens": usage.reasoning_tokens}
    return body


def logprob_value(value: float) -> float:
    # JSON has no -inf; OpenAI reports impossible tokens as -9999.0.
    return max(value, -9999.0)


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
