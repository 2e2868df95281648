"""Load generators: streamed chat requests over HTTP, or the engine driven in-process.

Both record, per request, when it started, when each piece of text arrived and when it
ended, so every system is measured by the same arithmetic (`report.py`).
"""

from __future__ import annotations

import asyncio
import ssl
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from urllib.parse import urlsplit

import httptools
import httpx
import orjson

from llmserve.engines.base import Engine, SamplingParams


@dataclass
class Timing:
    start: float
    end: float = 0.0
    arrivals: list[float] = field(default_factory=list)  # one per streamed piece of text
    tokens: int = 0
    error: str | None = None

    @property
    def ttft(self) -> float | None:
        return self.arrivals[0] - self.start if self.arrivals else None


async def run_level(
    one: Callable[[int], Awaitable[Timing]], concurrency: int, requests: int
) -> tuple[list[Timing], float]:
    """`requests` requests, `concurrency` of them in flight at any time."""
    next_index = 0
    results: list[Timing] = []

    async def worker() -> None:
        nonlocal next_index
        while next_index < requests:
            i = next_index
            next_index += 1
            results.append(await one(i))

    t0 = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return results, time.perf_counter() - t0


def chat_body(model: str, prompt: str | list[dict], max_tokens: int, extra: dict) -> dict:
    """A streamed greedy chat request: `prompt` is one user message, or the whole
    conversation."""
    messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
    return {
        "model": model,
        "messages": messages,
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": True,
        **extra,
    }


class _Arrivals:
    """A streamed chat response's body, read as it comes: when each piece of text arrived,
    and the token count (usage's, else one per piece)."""

    __slots__ = ("timing", "_buf", "_usage")

    def __init__(self, timing: Timing) -> None:
        self.timing = timing
        self._buf = b""
        self._usage: int | None = None

    def feed(self, data: bytes, now: float) -> None:
        t = self.timing
        *events, self._buf = (self._buf + data).split(b"\n\n")
        for ev in events:
            # its `data:` line (after an `id:` line); none in a keep-alive comment
            payload = next((line[6:] for line in ev.split(b"\n")
                            if line.startswith(b"data: ")), None)
            if payload is None or payload == b"[DONE]":
                continue
            chunk = orjson.loads(payload)
            if "error" in chunk:
                t.error = str(chunk["error"].get("message"))
                continue
            if chunk.get("usage"):
                self._usage = chunk["usage"]["completion_tokens"]
            for choice in chunk.get("choices", ()):
                if choice.get("delta", {}).get("content"):
                    t.arrivals.append(now)

    def finish(self) -> Timing:
        t = self.timing
        t.end = time.perf_counter()
        t.tokens = self._usage if self._usage is not None else len(t.arrivals)
        return t


async def http_stream(client: httpx.AsyncClient, body: dict) -> Timing:
    """One streamed request through httpx (the soak's clients, which also hang up)."""
    reader = _Arrivals(Timing(start=time.perf_counter()))
    try:
        async with client.stream("POST", "/v1/chat/completions", json=body) as r:
            if r.status_code != 200:
                reader.timing.error = f"HTTP {r.status_code}: {(await r.aread())[:200]!r}"
            else:
                async for data in r.aiter_bytes():
                    reader.feed(data, time.perf_counter())
    except httpx.HTTPError as exc:
        reader.timing.error = f"{type(exc).__name__}: {exc}"
    return reader.finish()


class _Response(asyncio.Protocol):
    """One HTTP/1.1 response, parsed by httptools (llhttp, in C) as it arrives."""

    def __init__(self, reader: _Arrivals) -> None:
        self.reader = reader
        self.parser = httptools.HttpResponseParser(self)
        self.done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.status = 0
        self.error_body = b""

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as exc:
            self._end(ConnectionError(f"bad HTTP response: {exc}"))

    def connection_lost(self, exc: Exception | None) -> None:
        self._end(ConnectionError("the server closed the connection mid-response"))

    # httptools' callbacks
    def on_headers_complete(self) -> None:
        self.status = self.parser.get_status_code()

    def on_body(self, body: bytes) -> None:
        if self.status == 200:
            self.reader.feed(body, time.perf_counter())
        else:
            self.error_body += body

    def on_message_complete(self) -> None:
        self._end(None)

    def _end(self, error: Exception | None) -> None:
        if not self.done.done():
            if error is None:
                self.done.set_result(None)
            else:
                self.done.set_exception(error)


class StreamClient:
    """Streamed chat requests to one server, each on a connection of its own (llama-server
    closes one after each streamed response anyway): the bench's load generator.

    It shares the machine with the server it measures, so it is kept lean: 0.11 ms of CPU a
    streamed token (uvloop) where httpx (h11 in Python, httpcore, anyio) took 0.32-0.39, which
    counted against every HTTP system and not against the in-process limit."""

    def __init__(self, url: str, timeout: float = 600) -> None:
        parts = urlsplit(url)
        self.host = parts.hostname or "127.0.0.1"
        self.tls = ssl.create_default_context() if parts.scheme == "https" else None
        self.port = parts.port or (443 if self.tls else 80)
        self.path = parts.path.rstrip("/") + "/v1/chat/completions"
        self.timeout = timeout
        head = {"Host": parts.netloc, "Content-Type": "application/json",
                "Accept": "text/event-stream", "Connection": "close"}
        self._head = "".join(f"{k}: {v}\r\n" for k, v in head.items()).encode()

    async def stream(self, body: dict) -> Timing:
        reader = _Arrivals(Timing(start=time.perf_counter()))
        data = orjson.dumps(body)
        request = b"POST %s HTTP/1.1\r\n%sContent-Length: %d\r\n\r\n%s" % (
            self.path.encode(), self._head, len(data), data)
        loop = asyncio.get_running_loop()
        transport: asyncio.Transport | None = None
        try:
            async with asyncio.timeout(self.timeout):
                transport, response = await loop.create_connection(
                    lambda: _Response(reader), self.host, self.port, ssl=self.tls)
                transport.write(request)
                await response.done
            if response.status != 200:
                reader.timing.error = f"HTTP {response.status}: {response.error_body[:200]!r}"
        except (OSError, TimeoutError) as exc:
            reader.timing.error = f"{type(exc).__name__}: {exc}"
        finally:  # done, failed or timed out: the connection is this request's alone
            if transport is not None:
                transport.close()
        return reader.finish()


async def engine_stream(engine: Engine, prompt: list[int], max_tokens: int) -> Timing:
    """The limit: the same engine, no HTTP, no text handling."""
    t = Timing(start=time.perf_counter())
    params = [SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)]
    async for step in engine.generate(prompt, params):
        now = time.perf_counter()
        for _ in step:
            t.arrivals.append(now)
            t.tokens += 1
    t.end = time.perf_counter()
    return t


def metric_totals(text: str, names: tuple[str, ...]) -> dict[str, float]:
    """Each of `names` in a Prometheus text page, summed over its label sets; absent names
    are left out."""
    totals: dict[str, float] = {}
    for line in text.splitlines():
        name = line.split("{", 1)[0].split(" ", 1)[0]
        if name in names:
            totals[name] = totals.get(name, 0.0) + float(line.rsplit(" ", 1)[1])
    return totals
