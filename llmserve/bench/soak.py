"""`llmserve bench --soak`: a long run against a real server with healthy and hostile
clients at once, looking for what only time shows: leaked sequence slots, memory growth,
errors, and healthy streams slowed by the hostile ones.

Phases, on one server started for the run:
1. baseline: `--healthy` concurrent healthy streams alone (`--baseline` seconds);
2. soak: the same healthy streams for `--duration` seconds, plus `--abandoned` streams
   hung up right after their first token and `--slow` readers that send a request and then
   read nothing, both spread evenly over the soak;
3. settle: every hostile client is gone; /metrics must show no request running or waiting.

It prints the p99 gap between two chunks of a healthy stream in each phase, healthy
errors, slots still held after settling, and the process tree's RSS after the baseline and
at the end.
"""

from __future__ import annotations

import asyncio
import json
import socket
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from llmserve.bench.load import Timing, chat_body, http_stream, metric_totals
from llmserve.bench.report import percentile


@dataclass
class Phase:
    name: str
    timings: list[Timing] = field(default_factory=list)

    def gaps(self) -> list[float]:
        out = []
        for t in self.timings:
            out += [b - a for a, b in zip(t.arrivals, t.arrivals[1:], strict=False)]
        return out

    def errors(self) -> list[str]:
        return [t.error for t in self.timings if t.error]


async def _healthy(client: httpx.AsyncClient, body: dict, until: float, phase: Phase) -> None:
    while time.monotonic() < until:
        phase.timings.append(await http_stream(client, body))


async def _abandon(client: httpx.AsyncClient, body: dict) -> str | None:
    """A stream hung up after its first token; returns an error, if it got one."""
    try:
        async with client.stream("POST", "/v1/chat/completions", json=body) as r:
            if r.status_code != 200:
                return f"HTTP {r.status_code}"
            async for data in r.aiter_bytes():
                if b'"content":"' in data.replace(b'"content":""', b""):
                    return None
    except httpx.HTTPError as exc:
        return f"{type(exc).__name__}"
    return None


def _slow_reader(url: str, body: dict, api_key: str | None) -> socket.socket:
    host, port = url.removeprefix("http://").split(":")
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect((host, int(port)))
    payload = json.dumps(body).encode()
    auth = f"Authorization: Bearer {api_key}\r\n" if api_key else ""
    sock.sendall(f"POST /v1/chat/completions HTTP/1.1\r\nHost: {host}:{port}\r\n"
                 f"Content-Type: application/json\r\n{auth}Content-Length: {len(payload)}\r\n\r\n"
                 .encode() + payload)
    return sock


async def _spread(n: int, seconds: float, action) -> None:
    """`n` calls of `action`, evenly over `seconds`, each in a task of its own."""
    tasks = []
    for i in range(n):
        tasks.append(asyncio.create_task(action(i)))
        await asyncio.sleep(seconds / max(n, 1))
    await asyncio.gather(*tasks)


async def _slots_in_use(client: httpx.AsyncClient) -> tuple[float, float]:
    text = (await client.get("/metrics")).text
    values = metric_totals(text, ("llmserve:num_requests_running",
                                  "llmserve:num_requests_waiting"))
    return (values.get("llmserve:num_requests_running", float("nan")),
            values.get("llmserve:num_requests_waiting", float("nan")))


async def soak(url: str, model: str, prompts: list[str], *, healthy: int, baseline: float,
               duration: float, abandoned: int, slow: int, slow_hold: float,
               rss_mb, api_key: str | None = None) -> dict:
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    limits = httpx.Limits(max_connections=healthy + 64, max_keepalive_connections=healthy + 64)
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=limits,
                                 headers=headers) as client:
        def body(i: int, max_tokens: int, **extra) -> dict:
            return chat_body(model, prompts[i % len(prompts)], max_tokens,
                             {"ignore_eos": True, **extra})

        await http_stream(client, body(0, 4))  # warm
        base = Phase("baseline")
        until = time.monotonic() + baseline
        await asyncio.gather(*(_healthy(client, body(i, 64), until, base) for i in range(healthy)))
        rss_start = rss_mb()

        hostile = Phase("soak")
        abandon_errors: list[str] = []
        socks: list[socket.socket] = []

        async def abandon(i: int) -> None:
            err = await _abandon(client, body(i, 256))
            if err:
                abandon_errors.append(err)

        async def stall(i: int) -> None:
            sock = await asyncio.to_thread(
                _slow_reader, url, {**body(i, 512), "logprobs": True, "top_logprobs": 20},
                api_key)
            socks.append(sock)
            await asyncio.sleep(slow_hold)
            sock.close()

        until = time.monotonic() + duration
        await asyncio.gather(
            *(_healthy(client, body(i, 64), until, hostile) for i in range(healthy)),
            _spread(abandoned, duration * 0.9, abandon),
            _spread(slow, duration * 0.9, stall),
        )
        for sock in socks:
            sock.close()

        deadline = time.monotonic() + 120
        running, waiting = await _slots_in_use(client)
        while (running or waiting) and time.monotonic() < deadline:
            await asyncio.sleep(1)
            running, waiting = await _slots_in_use(client)
        rss_end = rss_mb()

    result = {
        "healthy_streams": healthy, "baseline_s": baseline, "soak_s": duration,
        "abandoned": abandoned, "slow_readers": slow,
        "healthy_requests": {p.name: len(p.timings) for p in (base, hostile)},
        "healthy_errors": {p.name: len(p.errors()) for p in (base, hostile)},
        "healthy_error_samples": (base.errors() + hostile.errors())[:5],
        "abandoned_errors": len(abandon_errors),
        "p99_gap_ms": {p.name: _ms(percentile(p.gaps(), 0.99)) for p in (base, hostile)},
        "p50_gap_ms": {p.name: _ms(percentile(p.gaps(), 0.50)) for p in (base, hostile)},
        "leaked_running": running, "leaked_waiting": waiting,
        "rss_mb_after_baseline": rss_start, "rss_mb_end": rss_end,
    }
    return result


def _ms(seconds: float | None) -> float:
    return float("nan") if seconds is None else seconds * 1000


def print_report(r: dict, out: Path) -> None:
    growth = (r["rss_mb_end"] / r["rss_mb_after_baseline"] - 1) * 100
    rows = [
        ("healthy streams (concurrent)", r["healthy_streams"], ""),
        ("healthy requests: baseline / soak", r["healthy_requests"]["baseline"],
         r["healthy_requests"]["soak"]),
        ("healthy errors: baseline / soak", r["healthy_errors"]["baseline"],
         r["healthy_errors"]["soak"]),
        ("p50 gap ms: baseline / soak", f'{r["p50_gap_ms"]["baseline"]:.0f}',
         f'{r["p50_gap_ms"]["soak"]:.0f}'),
        ("p99 gap ms: baseline / soak", f'{r["p99_gap_ms"]["baseline"]:.0f}',
         f'{r["p99_gap_ms"]["soak"]:.0f}'),
        ("abandoned streams / errors", r["abandoned"], r["abandoned_errors"]),
        ("slow readers", r["slow_readers"], ""),
        ("leaked slots: running / waiting", r["leaked_running"], r["leaked_waiting"]),
        ("RSS MB (process tree): after baseline / end", f'{r["rss_mb_after_baseline"]:.0f}',
         f'{r["rss_mb_end"]:.0f} ({growth:+.1f}%)'),
    ]
    for name, a, b in rows:
        print(f"{name:46} {a!s:>10} {b!s:>16}")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(r, indent=1))
    print(f"\nJSON: {out}", file=sys.stderr)
