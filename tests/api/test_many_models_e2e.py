"""Several models in one server, loaded on demand: each answers by name, the limit and
keep-alive unload what is idle (never a stream in flight), a broken model fails only its
own requests, and the memory rule refuses what would not fit. Real engines, the bundled
models."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time

import httpx
import openai
from conftest import Server, engines, hf_model_dir, run_server
from openai_schema import validate
from sse import stream_post

from llmserve.api.sse import KEEPALIVE
from llmserve.models import bundled_model_path
from llmserve.models.procmem import tree_pids, tree_rss

GGUF = bundled_model_path()
EMBEDDER = "all-minilm-l6-v2"
ASK = [{"role": "user", "content": "Name three colours."}]


def status(server: Server) -> dict[str, dict]:
    r = httpx.get(server.url + "/v1/models/status", headers=server.headers(), timeout=30)
    assert r.status_code == 200, r.text
    return {m["id"]: m for m in r.json()["data"]}


def wait_state(server: Server, name: str, state: str, timeout: float = 30) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = status(server)[name]
        if got["state"] == state:
            return got
        time.sleep(0.1)
    raise AssertionError(f"{name} never {state}: {status(server)[name]}")


def async_client(server: Server) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=server.base_url, api_key=server.api_key,
                              max_retries=0, timeout=300)


async def answer_both_ways(client: openai.AsyncOpenAI, model: str) -> tuple[str, str]:
    """The same greedy question streamed and not: (whole, streamed)."""
    kwargs = dict(model=model, messages=ASK, max_tokens=24, temperature=0)
    whole = await client.chat.completions.create(**kwargs)
    assert whole.model == model
    parts = []
    async for chunk in await client.chat.completions.create(**kwargs, stream=True):
        assert chunk.model == model
        if chunk.choices and chunk.choices[0].delta.content:
            parts.append(chunk.choices[0].delta.content)
    return whole.choices[0].message.content, "".join(parts)


def test_two_names_an_hf_model_and_the_embedder_answer_by_name_concurrently(tmp_path):
    flags = ["--model", f"a={GGUF}", "--model", f"b={GGUF}", "--max-sequences", "4"]
    with_hf = "transformers" in engines()
    if with_hf:  # the bundled GGUF converted to a Hugging Face directory (cached per machine)
        flags += ["--model", f"hf={hf_model_dir()}"]
    with run_server(tmp_path, *flags) as server:
        names = ["a", "b", *(["hf"] if with_hf else []), EMBEDDER]
        listed = httpx.get(server.base_url + "/models", headers=server.headers()).json()
        validate("ListModelsResponse", listed)
        assert [m["id"] for m in listed["data"]] == names
        one = httpx.get(server.base_url + "/models/b", headers=server.headers()).json()
        validate("Model", one)
        # nothing loaded yet: every model is listed, none is running
        assert {n: s["state"] for n, s in status(server).items()} == dict.fromkeys(
            names, "unloaded")

        async def main() -> list:
            client = async_client(server)
            return await asyncio.gather(
                *(answer_both_ways(client, n) for n in names if n != EMBEDDER),
                client.embeddings.create(model=EMBEDDER, input=["red", "green"]))

        *answers, vectors = asyncio.run(main())
        for whole, streamed in answers:
            assert whole and whole == streamed
        assert answers[0] == answers[1]  # one file under two names: the same greedy answer
        assert vectors.model == EMBEDDER and len(vectors.data) == 2
        table = status(server)
        assert {n: s["state"] for n, s in table.items()} == dict.fromkeys(names, "running")
        for name in names:
            row = table[name]
            assert row["loads"] == 1 and row["pid"] and row["memory_bytes"] > 10 * 2**20
            assert row["load_seconds"] > 0
        assert table["a"]["pid"] != table["b"]["pid"]  # each in an engine process of its own
        assert table["a"]["slots"] == 4 and table["a"]["slots_in_use"] == 0

        health = httpx.get(server.url + "/health").json()
        assert health["status"] == "ok" and set(health["engines"]) == set(names)
        metrics = httpx.get(server.url + "/metrics").text
        for name in names:
            assert f'llmserve:model_loads_total{{model_name="{name}"}} 1.0' in metrics
        assert 'llmserve:num_requests_running{model_name="b"} 0.0' in metrics

        # `llmserve models` prints the same table from the status endpoint
        out = subprocess.run(
            [sys.executable, "-m", "llmserve.cli", "models", "--base-url", server.base_url,
             "--api-key", server.api_key], capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, out.stderr
        lines = out.stdout.splitlines()
        assert lines[0].split()[:3] == ["MODEL", "KIND", "STATE"]
        assert [line.split()[:3] for line in lines[1:3]] == [["a", "chat", "running"],
                                                             ["b", "chat", "running"]]


def test_unknown_model_is_a_404_naming_no_path(tmp_path):
    with run_server(tmp_path, "--model", f"a={GGUF}", "--embedding-model", "none") as server:
        for r in (
            httpx.post(server.base_url + "/chat/completions", headers=server.headers(),
                       json={"model": "nope", "messages": ASK}),
            httpx.get(server.base_url + "/models/nope", headers=server.headers()),
        ):
            assert r.status_code == 404
            error = r.json()["error"]
            assert error["code"] == "model_not_found" and "/" not in error["message"]
        # the wrong kind of model: a 400 before anything loads
        r = httpx.post(server.base_url + "/embeddings", headers=server.headers(),
                       json={"model": "a", "input": "x"})
        assert r.status_code == 400
        assert status(server)["a"]["state"] == "unloaded"


def test_max_loaded_one_switches_without_leaks(tmp_path):
    """50 switches between two models under --max-loaded-models 1: each request loads its
    model and unloads the other; no process is left behind and memory does not grow."""
    with run_server(tmp_path, "--model", f"a={GGUF}", "--model", f"b={GGUF}",
                    "--max-loaded-models", "1", "--max-sequences", "2",
                    "--embedding-model", "none") as server:
        pid = server.process.pid
        client = openai.OpenAI(base_url=server.base_url, api_key=server.api_key,
                               max_retries=0, timeout=120)
        counts, rss = [], []
        for i in range(50):
            name = "ab"[i % 2]
            r = client.chat.completions.create(model=name, messages=ASK, max_tokens=2)
            assert r.model == name
            table = status(server)
            assert table[name]["state"] == "running"
            assert table["ab"[1 - i % 2]]["state"] == "unloaded"
            counts.append(len(tree_pids(pid)))
            rss.append(tree_rss(pid))
        table = status(server)
        assert table["a"]["loads"] == 25 and table["b"]["loads"] == 25
        assert table["a"]["unloads"] == 25 and table["b"]["unloads"] == 24
        # the server, one engine, and at most multiprocessing's resource tracker
        assert max(counts) <= counts[0] and counts[-1] == counts[0] <= 3, counts
        # the tree's memory after 50 switches is that after 10, give or take a few MiB
        # (measured: the server's own RSS flat at 113-115 MiB over 60 switches)
        assert rss[-1] - rss[9] < 24 * 2**20, [r // 2**20 for r in rss]
        log = server.log()
        assert log.count("model a loaded") == 25 and log.count("model a unloaded") == 25


def test_a_stream_in_flight_is_not_cut_by_an_eviction(tmp_path):
    with run_server(tmp_path, "--model", f"a={GGUF}", "--model", f"b={GGUF}",
                    "--max-loaded-models", "1", "--embedding-model", "none") as server:

        async def main() -> None:
            client = async_client(server)
            stream = await client.chat.completions.create(
                model="a", messages=ASK, max_tokens=120, stream=True,
                extra_body={"ignore_eos": True})
            texts, finish = [], None
            other: asyncio.Task | None = None
            async for chunk in stream:
                if chunk.choices and chunk.choices[0].delta.content:
                    texts.append(chunk.choices[0].delta.content)
                    if other is None:  # a request for b while a streams: it waits for a
                        other = asyncio.create_task(client.chat.completions.create(
                            model="b", messages=ASK, max_tokens=2))
                        await asyncio.sleep(0.5)
                        assert not other.done()
                if chunk.choices and chunk.choices[0].finish_reason:
                    finish = chunk.choices[0].finish_reason
            streamed_until = time.monotonic()
            assert finish == "length" and len(texts) > 50
            assert other is not None
            answer = await other
            assert answer.model == "b" and time.monotonic() >= streamed_until

        asyncio.run(main())
        table = status(server)
        assert table["a"]["state"] == "unloaded" and table["b"]["state"] == "running"
        assert table["a"]["unloads"] == 1
        assert "model a unloaded: evicted for 'b'" in server.log()


def test_a_broken_model_fails_only_its_own_requests(tmp_path):
    models = tmp_path / "models"
    models.mkdir()
    (models / "broken.gguf").write_bytes(b"GGUF" + b"\x00" * 64)  # a header, then nothing
    (models / "smol.gguf").symlink_to(GGUF)
    with run_server(tmp_path, "--models-dir", str(models), "--embedding-model", "none") as server:
        body = {"model": "broken", "messages": ASK, "max_tokens": 2}
        for _ in range(2):  # the reason, every time, without loading again
            r = httpx.post(server.base_url + "/chat/completions", headers=server.headers(),
                           json=body, timeout=60)
            assert r.status_code == 503, r.text
            error = r.json()["error"]
            assert error["code"] == "model_not_loaded"
            assert error["message"].startswith("The model 'broken' failed to load: ")
        r = httpx.post(server.base_url + "/chat/completions", headers=server.headers(),
                       json={**body, "model": "smol"}, timeout=60)
        assert r.status_code == 200, r.text
        table = status(server)
        assert table["broken"]["state"] == "failed" and table["broken"]["reason"]
        assert table["broken"]["loads"] == 0 and table["smol"]["state"] == "running"
        assert httpx.get(server.url + "/health").status_code == 200
        assert server.log().count("model broken failed to load") == 1


def test_memory_rule_and_keep_alive(tmp_path):
    """Under --memory-limit 600M a small model fits and a 16-sequence one is refused with
    the numbers; with --keep-alive 1s the small one is unloaded once idle."""
    file = tmp_path / "models.toml"
    file.write_text(f"""
[models.small]
path = "{GGUF}"
aliases = ["tiny"]
context_length = 512
max_sequences = 1

[models.big]
path = "{GGUF}"
context_length = 2048
max_sequences = 16
""")
    with run_server(tmp_path, "--models-file", str(file), "--memory-limit", "600M",
                    "--keep-alive", "1s", "--embedding-model", "none") as server:
        r = httpx.post(server.base_url + "/chat/completions", headers=server.headers(),
                       json={"model": "big", "messages": ASK, "max_tokens": 2}, timeout=60)
        assert r.status_code == 503, r.text
        error = r.json()["error"]
        assert error["code"] == "model_not_loaded"
        assert "needs about" in error["message"] and "--memory-limit 600 MiB" in error["message"]
        assert status(server)["big"]["state"] == "unloaded"

        r = httpx.post(server.base_url + "/chat/completions", headers=server.headers(),
                       json={"model": "tiny", "messages": ASK, "max_tokens": 2}, timeout=60)
        assert r.status_code == 200 and r.json()["model"] == "small"
        assert status(server)["small"]["estimate_bytes"] < 600 * 2**20
        row = wait_state(server, "small", "unloaded", timeout=15)
        assert row["unloads"] == 1
        assert "model small unloaded: idle for" in server.log()


def test_a_stream_waiting_for_a_load_gets_keep_alives_and_then_its_answer_or_the_reason(
        tmp_path):
    flags = ["--model", f"a={GGUF}", "--model", f"c={GGUF}", "--sse-keepalive", "0.1",
             "--embedding-model", "none"]
    # keep-alives every 0.1 s: longer than any load takes (an engine process starts first)
    broken = None
    if "transformers" in engines():
        # Its tokenizer whole, its weights not: only the engine process, once started
        # (seconds), finds out.
        broken = tmp_path / "broken"
        broken.mkdir()
        for f in hf_model_dir().iterdir():
            if f.name != "model.safetensors":
                (broken / f.name).symlink_to(f)
        (broken / "model.safetensors").write_bytes(b"not safetensors")
        flags += ["--model", f"broken={broken}"]
    with run_server(tmp_path, *flags) as server, \
            httpx.Client(base_url=server.url, headers=server.headers(), timeout=120) as http:
        body = {"model": "a", "messages": ASK, "max_tokens": 8, "temperature": 0, "stream": True}
        events = stream_post(http, "/v1/chat/completions", body)
        assert events.status == 200 and events.done
        assert events.raw.startswith(KEEPALIVE), events.raw[:80]  # while it loaded
        chunks = events.chunks()
        for c in chunks:
            validate("CreateChatCompletionStreamResponse", c)
        whole = http.post("/v1/chat/completions", json={**body, "stream": False}).json()
        text = "".join(c["choices"][0]["delta"].get("content") or ""
                       for c in chunks if c["choices"])
        assert text == whole["choices"][0]["message"]["content"] and chunks[0]["model"] == "a"
        # loaded now: a stream answers at once, as ever
        again = stream_post(http, "/v1/chat/completions", body)
        assert again.status == 200 and not again.raw.startswith(KEEPALIVE) and again.done
        # completions alike
        prompt = {"model": "c", "prompt": "Once upon a time", "max_tokens": 8, "temperature": 0}
        events = stream_post(http, "/v1/completions", {**prompt, "stream": True})
        assert events.status == 200 and events.done and events.raw.startswith(KEEPALIVE)
        text = "".join(c["choices"][0]["text"] for c in events.chunks() if c["choices"])
        assert text == http.post("/v1/completions", json=prompt).json()["choices"][0]["text"]
        if broken is None:
            return
        # a load that fails after the stream began: the reason as its error event, then [DONE]
        events = stream_post(http, "/v1/chat/completions", {"model": "broken", "messages": ASK,
                                                             "max_tokens": 4, "stream": True})
        assert events.status == 200 and events.done and events.raw.startswith(KEEPALIVE)
        [error] = events.chunks()
        validate("ErrorResponse", error)
        assert error["error"]["code"] == "model_not_loaded"
        assert error["error"]["message"].startswith("The model 'broken' failed to load: ")
        # failed, known at once: a status, as for any request
        for path, ask in [("/v1/chat/completions", {"messages": ASK}),
                          ("/v1/completions", {"prompt": "Hi"})]:
            r = http.post(path, json={"model": "broken", **ask, "stream": True})
            assert r.status_code == 503 and r.json()["error"]["code"] == "model_not_loaded"
        assert status(server)["a"]["state"] == "running"
