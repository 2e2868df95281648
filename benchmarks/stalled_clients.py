"""Clients that stop reading (issue 19): four streams whose clients read nothing, then a normal
request. Prints how long the normal request took idle (the baseline, same run) and behind the
stuck clients, how many tokens were generated for them, and how many were dropped.

    .venv/bin/python benchmarks/stalled_clients.py [--write-timeout 5] [--max-tokens 2000]
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
from prometheus_client.parser import text_string_to_metric_families

MODEL = "smollm2-135m-instruct"
SHORT = {"model": MODEL, "temperature": 0, "max_tokens": 16,
         "messages": [{"role": "user", "content": "Name three fruits."}]}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def scrape(url: str) -> dict[str, float]:
    text = httpx.get(url + "/metrics", timeout=30).text
    return {s.name: s.value for f in text_string_to_metric_families(text) for s in f.samples}


def stuck_client(port: int, max_tokens: int) -> socket.socket:
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 2048)
    sock.connect(("127.0.0.1", port))
    body = json.dumps({**SHORT, "max_tokens": max_tokens, "ignore_eos": True, "stream": True,
                       "messages": [{"role": "user", "content": "Tell me a long story."}]})
    sock.sendall(f"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
                 f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
                 f"{body}".encode())
    return sock


def timed_short(url: str) -> float:
    start = time.monotonic()
    httpx.post(url + "/v1/chat/completions", json=SHORT, timeout=600).raise_for_status()
    return time.monotonic() - start


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--write-timeout", type=float, default=5)
    ap.add_argument("--max-tokens", type=int, default=2000)
    ap.add_argument("--clients", type=int, default=4)
    args = ap.parse_args()
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log = Path(tempfile.mkdtemp()) / "server.log"
    server = subprocess.Popen(
        [sys.executable, "-m", "llmserve.cli", "serve", "--port", str(port), "--max-sequences", "2",
         "--write-timeout", str(args.write_timeout), "--embedding-model", "none"],
        stdout=log.open("w"), stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        while True:
            try:
                if httpx.get(url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert server.poll() is None, log.read_text()
            time.sleep(0.5)
        idle = timed_short(url)
        before = scrape(url)
        start = time.monotonic()
        socks = [stuck_client(port, args.max_tokens) for _ in range(args.clients)]
        time.sleep(3)
        behind = timed_short(url)
        # Until nothing runs: every stuck stream dropped, or generated to its end.
        while True:
            m = scrape(url)
            if m["llmserve:num_requests_running"] == 0 and m["llmserve:num_requests_waiting"] == 0:
                break
            time.sleep(0.5)
        busy = time.monotonic() - start
        generated = m["llmserve:generation_tokens_total"] - before["llmserve:generation_tokens_total"]
        generated -= 16  # the normal request's
        dropped = m.get("llmserve:streams_dropped_stalled_total", 0.0)
        for s in socks:
            s.close()
    finally:
        server.terminate()
        server.wait(30)
    print(f"| {args.clients} stuck clients, --write-timeout {args.write_timeout:g} | value |")
    print("|---|---|")
    print(f"| normal 16-token request, idle server (baseline) | {idle:.2f} s |")
    print(f"| the same, sent 3 s after the stuck clients | {behind:.2f} s ({behind / idle:.1f}x) |")
    print(f"| tokens generated for the stuck clients | {generated:.0f} of "
          f"{args.clients * args.max_tokens} |")
    print(f"| streams dropped for stalling | {dropped:.0f} |")
    print(f"| until no slot was held | {busy:.1f} s |")


if __name__ == "__main__":
    main()
