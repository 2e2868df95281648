"""Server-Sent Events framing for OpenAI streams."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable

import orjson
from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from llmserve.api.connection import Delivery
from llmserve.api.drain import Inflight
from llmserve.errors import EngineFailure, LLMServeError

log = logging.getLogger(__name__)

DONE = b"data: [DONE]\n\n"

HEADERS = {
    "Cache-Control": "no-cache",
    "X-Accel-Buffering": "no",  # proxies must not buffer tokens
}


def event(payload: bytes) -> bytes:
    return b"data: " + payload + b"\n\n"


def error_event(exc: LLMServeError) -> bytes:
    # The shape the official client raises on: {"error": {...}} in a data event.
    body = {"error": {"message": exc.message, "type": exc.type, "param": exc.param, "code": exc.code}}
    return event(orjson.dumps(body))


async def numbered(blocks: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
    """Each event of `blocks` (SSE events, several to a block) with its `id:`, numbered from
    0: the number a client resumes after (`Last-Event-ID`)."""
    n = 0
    async with contextlib.aclosing(blocks) as it:  # type: ignore[type-var]
        async for block in it:
            out = []
            for event in block.split(b"\n\n")[:-1]:  # JSON never holds a raw newline
                out.append(b"id: %d\n%s\n\n" % (n, event))
                n += 1
            if out:
                yield b"".join(out)


# An SSE comment line, which every client skips. No blank line after it: a blank line ends an
# event, and the official client then hands on an empty event whenever the stream has had an
# `id:` (it keeps the last id, as the SSE spec says, and takes that for an event).
KEEPALIVE = b": keep-alive\n"

_END = object()


class _Aborted:
    def __init__(self, error: LLMServeError) -> None:
        self.error = error


class _Watchdog:
    """One timer per stream for both of its clocks: a keep-alive into `queue` after
    `keepalive` seconds without a write, and `task` cancelled (`stalled`) once the client
    has taken nothing for `write_timeout` seconds. Per token it only notes the time: two
    timers armed per token were about a tenth of the API process's CPU at 64 streams.

    With the connection's `delivery` known, "taken nothing" means: bytes wait for the client
    and it has acknowledged none of them, checked a few times per timeout. So a client whose
    window is closed, or that vanished, is found although the kernel still accepts writes,
    and a slow reader whose acknowledgements move is never dropped. Without it, it means one
    write that waited the whole timeout."""

    __slots__ = (
        "_acked",
        "_acked_since",
        "_delivery",
        "_handle",
        "_idle_since",
        "_keepalive",
        "_loop",
        "_queue",
        "_sending_since",
        "_task",
        "_write_timeout",
        "stalled",
    )

    def __init__(self, task: asyncio.Task, queue: asyncio.Queue[object], *,
                 keepalive: float | None, write_timeout: float | None,
                 delivery: Delivery | None = None) -> None:
        self._task = task
        self._queue = queue
        self._keepalive = keepalive
        self._write_timeout = write_timeout
        self._delivery = delivery if write_timeout is not None else None
        self._loop = asyncio.get_running_loop()
        self._handle: asyncio.TimerHandle | None = None
        self._idle_since = self._loop.time()
        self._sending_since: float | None = None
        self._acked = -1
        self._acked_since = self._idle_since
        self.stalled = False
        self._fire()

    def sending(self) -> None:
        self._sending_since = self._loop.time()

    def sent(self) -> None:
        self._sending_since = None
        self._idle_since = self._loop.time()

    def quiet(self) -> None:
        """No more keep-alives (the last event is going out); the write timeout stays."""
        self._keepalive = None

    def stop(self) -> None:
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None

    def _fire(self) -> None:
        # The timer is never late for either clock: it is armed for the current clock's
        # deadline, or for the earliest the other clock could run out, whichever comes first.
        now = self._loop.time() + 0.001  # the loop may fire a timer this early
        keepalive, write_timeout = self._keepalive, self._write_timeout
        if write_timeout is not None and self._stalled(now, write_timeout):
            self.stalled = True
            self._handle = None
            if self._delivery is not None:
                self._delivery.abort()
            self._task.cancel()
            return
        if self._sending_since is None and keepalive is not None \
                and now >= self._idle_since + keepalive:
            self._queue.put_nowait(KEEPALIVE)
            self._idle_since = now
        sending = self._sending_since
        due: list[float] = []
        if keepalive is not None:
            due.append(now + keepalive if sending is not None else self._idle_since + keepalive)
        if write_timeout is not None:
            if self._delivery is not None:  # acknowledgements are polled
                due.append(now + min(1.0, write_timeout / 4))
            else:
                due.append((sending if sending is not None else now) + write_timeout)
        self._handle = self._loop.call_at(min(due), self._fire) if due else None

    def _stalled(self, now: float, write_timeout: float) -> bool:
        if self._delivery is None:
            return self._sending_since is not None and now >= self._sending_since + write_timeout
        try:
            acked, waiting = self._delivery.progress()
        except OSError:  # the connection is gone: the disconnect is seen elsewhere
            return False
        if acked != self._acked or not (waiting or self._sending_since is not None):
            self._acked, self._acked_since = acked, now
            return False
        return now >= self._acked_since + write_timeout


class EventStreamResponse(StreamingResponse):
    """A stream of SSE events that no client can stall.

    The body is produced ahead of the client by a task of its own, so generation (and the
    sequence slot it holds) never waits for a slow reader; what runs ahead is at most the
    request's own answer. A client that takes no bytes for `write_timeout` seconds (see
    `_Watchdog`) is dropped, which cancels its generation and calls `on_stall`. While
    nothing is produced (queued, a long prompt being read) a keep-alive comment goes out
    every `keepalive` seconds, so proxies with an idle timeout keep the connection. A client
    that hangs up cancels generation at once.
    """

    media_type = "text/event-stream"

    def __init__(
        self,
        content: AsyncIterator[bytes],
        *,
        keepalive: float | None = None,
        write_timeout: float | None = None,
        on_close: Callable[[], None] | None = None,
        on_stall: Callable[[], None] | None = None,
        inflight: Inflight | None = None,
        request_id: str | None = None,
    ) -> None:
        super().__init__(content, headers=HEADERS, media_type=self.media_type)
        self._source = content
        self._on_close = on_close
        self._on_stall = on_stall
        self._inflight = inflight
        self._request_id = request_id
        self._delivery: Delivery | None = None
        self._queue: asyncio.Queue[object] = asyncio.Queue()
        self._producer: asyncio.Task[None] | None = None
        self._keepalive = keepalive or None
        self._write_timeout = write_timeout or None

    async def stream_response(self, send: Send) -> None:
        await send({"type": "http.response.start", "status": self.status_code,
                    "headers": self.raw_headers})
        queue = self._queue
        producer = self._producer = asyncio.get_running_loop().create_task(self._produce(queue))
        tracking = (self._inflight.track(self.abort) if self._inflight is not None
                    else contextlib.nullcontext())
        try:
            with tracking:
                await self._forward(queue, send)
        finally:
            producer.cancel()
            await asyncio.gather(producer, return_exceptions=True)

    def abort(self, exc: LLMServeError) -> None:
        """End the stream now with `exc` as its error event, then `[DONE]`."""
        if self._producer is not None:
            self._producer.cancel()
        self._queue.put_nowait(_Aborted(exc))

    async def _forward(self, queue: asyncio.Queue[object], send: Send) -> None:
        task = asyncio.current_task()
        assert task is not None
        watch = _Watchdog(task, queue, keepalive=self._keepalive,
                          write_timeout=self._write_timeout, delivery=self._delivery)
        try:
            while True:
                # while tokens flow the queue is rarely empty: no coroutine made per token
                item = queue.get_nowait() if not queue.empty() else await queue.get()
                if item is _END:
                    break
                if isinstance(item, _Aborted):
                    watch.quiet()  # nothing after [DONE], not even a comment
                    item = error_event(item.error) + DONE
                    queue.put_nowait(_END)
                elif isinstance(item, BaseException):
                    # a bug, not a generation's failure (those are error events already):
                    # logged with its traceback, and the stream still ends as streams do
                    log.error("request %s: stream failed", self._request_id or "-",
                              exc_info=item)
                    watch.quiet()
                    item = error_event(EngineFailure(
                        "The server failed while streaming this answer (see its log).")) + DONE
                    queue.put_nowait(_END)
                watch.sending()
                await send({"type": "http.response.body", "body": item, "more_body": True})
                watch.sent()
        except asyncio.CancelledError:
            if not watch.stalled or task.uncancel() > 0:
                raise
            log.info("request %s: stream dropped, the client accepted no bytes for %g s",
                     self._request_id or "-", self._write_timeout)
            if self._on_stall is not None:
                self._on_stall()
            return  # the server closes the connection; the caller cancels generation
        finally:
            watch.stop()
        await send({"type": "http.response.body", "body": b"", "more_body": False})

    async def _produce(self, queue: asyncio.Queue[object]) -> None:
        try:
            async for chunk in self._source:
                queue.put_nowait(chunk)
        except Exception as exc:  # noqa: BLE001 - the consumer raises it
            queue.put_nowait(exc)
        else:
            queue.put_nowait(_END)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if self._write_timeout is not None:
            self._delivery = Delivery.of(scope)
            if self._delivery is not None:
                self._delivery.bound_send_buffer()
        try:
            await super().__call__(scope, receive, send)
        finally:
            # Close the generator now, rather than whenever it is garbage collected.
            aclose = getattr(self._source, "aclose", None)
            if aclose is not None:
                await aclose()
            if self._on_close is not None:
                self._on_close()


class ChunkEncoder:
    """Chunks of one stream differ only in their choice: the rest is encoded once."""

    def __init__(self, *, id: str, object: str, created: int, model: str, include_usage: bool):
        head = orjson.dumps({"id": id, "object": object, "created": created, "model": model})
        self._prefix = b"data: " + head[:-1] + b',"choices":['
        self._suffix = b'],"usage":null}\n\n' if include_usage else b"]}\n\n"

    def choice(self, choice: dict) -> bytes:
        return self._prefix + orjson.dumps(choice) + self._suffix

    def usage(self, usage: dict) -> bytes:
        return self._prefix + b'],"usage":' + orjson.dumps(usage) + b"}\n\n"
