"""Load generators: streamed chat requests over HTTP, or the engine driven in-process.

Both record, per request, when it started, when each piece of text arrived and when it
ended, so every system is measured by the same arithmetic (`report.py`).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

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


async def http_stream(client: httpx.AsyncClient, body: dict) -> Timing:
    t = Timing(start=time.perf_counter())
    usage_tokens = None
    try:
        async with client.stream("POST", "/v1/chat/completions", json=body) as r:
            if r.status_code != 200:
                t.error = f"HTTP {r.status_code}: {(await r.aread())[:200]!r}"
                return t
            buf = b""
            async for data in r.aiter_bytes():
                now = time.perf_counter()
                buf += data
                *events, buf = buf.split(b"\n\n")
                for ev in events:
                    # its `data:` line (after an `id:` line); none in a keep-alive comment
                    payload = next((line[6:] for line in ev.split(b"\n")
                                    if line.startswith(b"data: ")), None)
                    if payload is None:
                        continue
                    if payload == b"[DONE]":
                        continue
                    chunk = orjson.loads(payload)
                    if "error" in chunk:
                        t.error = str(chunk["error"].get("message"))
                        continue
                    if chunk.get("usage"):
                        usage_tokens = chunk["usage"]["completion_tokens"]
                    for choice in chunk.get("choices", ()):
                        if choice.get("delta", {}).get("content"):
                            t.arrivals.append(now)
    except httpx.HTTPError as exc:
        t.error = f"{type(exc).__name__}: {exc}"
    finally:
        t.end = time.perf_counter()
    t.tokens = usage_tokens if usage_tokens is not None else len(t.arrivals)
    return t


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
