"""Several models in one server: time to first token of a cold model (its load included) and of
a warm one, and the server's process-tree RSS with 0 to 3 models loaded. Three names for the
bundled GGUF (`--max-sequences 4`, context 2048), each loaded on its first request.

    PYTHONPATH=.:tests .venv/bin/python benchmarks/many_models.py
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import httpx
from conftest import Server, run_server

from llmserve.models import bundled_model_path
from llmserve.models.procmem import tree_rss

MIB = 2**20


def first_token_seconds(server: Server, model: str) -> float:
    body = {"model": model, "messages": [{"role": "user", "content": "Say hi."}],
            "max_tokens": 8, "temperature": 0, "stream": True}
    start, first = time.perf_counter(), None
    with httpx.stream("POST", server.base_url + "/chat/completions", json=body,
                      headers=server.headers(), timeout=300) as r:
        for line in r.iter_lines():
            if first is None and '"content":"' in line and '"content":""' not in line:
                first = time.perf_counter() - start
    assert first is not None, "no text came"
    return first


def main() -> None:
    gguf = bundled_model_path()
    names = ["a", "b", "c"]
    flags = [arg for n in names for arg in ("--model", f"{n}={gguf}")]
    with run_server(Path(tempfile.mkdtemp()), *flags, "--max-sequences", "4",
                    "--embedding-model", "none") as server:
        time.sleep(1)
        print(f"{'loaded':>6} {'cold TTFT s':>12} {'warm TTFT s':>12} {'tree RSS MiB':>13}")
        print(f"{0:>6} {'':>12} {'':>12} {tree_rss(server.process.pid) / MIB:>13.0f}")
        for i, name in enumerate(names, 1):
            cold = first_token_seconds(server, name)
            warm = sorted(first_token_seconds(server, name) for _ in range(3))
            print(f"{i:>6} {cold:>12.2f} {warm[1]:>12.2f} "
                  f"{tree_rss(server.process.pid) / MIB:>13.0f}")


if __name__ == "__main__":
    main()
