"""llama.cpp's llama-server as the bench's baseline: where its build is cached, the command it
runs with, a failed build skipped, and (where the binary is built) one streamed chat answered.

The binary is never built here (about 12 minutes on 2 cores): `make llama-server` or a first
`llmserve bench` builds and caches it; until then the test that runs it is skipped."""

from __future__ import annotations

import asyncio
import itertools
import tomllib
from pathlib import Path

import pytest

from llmserve.bench import llama_server, run
from llmserve.bench.load import StreamClient, chat_body
from llmserve.models import bundled_model_path

NOT_BUILT = ("llama-server is not built for this llama-cpp-python and CPU: `make llama-server` "
             "builds and caches it (about 12 minutes on 2 cores); the bench builds it on first use")


def test_cache_is_keyed_by_version_and_cpu(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    flags = frozenset({"avx2", "fma", "sse4_2"})
    key = llama_server.cpu_key(flags, "x86_64")
    assert key == llama_server.cpu_key(frozenset(sorted(flags, reverse=True)), "x86_64")
    assert key != llama_server.cpu_key(flags | {"avx512f"}, "x86_64")  # a native build differs
    assert key != llama_server.cpu_key(flags, "aarch64")
    version = llama_server.llama_cpp_python_version()
    pyproject = tomllib.loads((Path(__file__).parents[2] / "pyproject.toml").read_text())
    # the installed llama-cpp-python is the pinned one: its sdist is the llama.cpp ours runs
    assert f"llama-cpp-python=={version}" in [
        d.split("#")[0].strip() for d in pyproject["project"]["dependencies"]]
    assert llama_server.cache_dir() == (
        tmp_path / "llmserve" / f"llama-server-{version}-{llama_server.cpu_key()}")
    assert llama_server.cached_binary() is None


def test_command_matches_our_engine_configuration(tmp_path):
    model = tmp_path / "m.gguf"
    args = llama_server.serve_command(Path("/bin/llama-server"), model, name="m",
                                      context_length=1024, max_sequences=16, threads=2,
                                      batch_size=512, weight_repack=False)
    flag = dict(itertools.pairwise(args))
    assert args[0] == "/bin/llama-server" and flag["--model"] == str(model)
    assert flag["--parallel"] == "16" and flag["--ctx-size"] == str(1024 * 16)  # per slot: ours
    assert flag["--threads"] == flag["--threads-batch"] == "2"
    assert flag["--batch-size"] == flag["--ubatch-size"] == "512"
    assert flag["--port"] == "{port}" and flag["--host"] == "127.0.0.1"
    assert "--no-kv-unified" in args and "--no-repack" in args
    repacked = llama_server.serve_command(Path("/bin/llama-server"), model, name="m",
                                          context_length=1024, max_sequences=16, threads=2,
                                          batch_size=512, weight_repack=True)
    assert "--no-repack" not in repacked  # llama-server repacks by default, as ours then does


def test_a_failed_build_is_a_build_error_and_the_bench_skips_the_baseline(
        monkeypatch, tmp_path, capsys):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setattr(llama_server, "_tool", lambda name: None)  # no cmake anywhere
    with pytest.raises(llama_server.BuildError, match="cmake not found"):
        llama_server.build()
    assert run._llama_server_binary(None) is None
    err = capsys.readouterr().err
    assert "building llama-server" in err and "skipping that baseline" in err
    assert "build.log" in err  # where to look


def test_an_unknown_binary_is_skipped_not_fatal(tmp_path, capsys):
    from contextlib import ExitStack

    from llmserve.config import Settings

    settings = Settings(context_length=256, max_sequences=1, threads=1)
    with ExitStack() as stack:
        proc = run._start_llama_server(stack, tmp_path / "missing", bundled_model_path(), "m",
                                       settings, tmp_path / "ls.log")
    assert proc is None
    assert "skipping that baseline" in capsys.readouterr().err


def test_built_llama_server_starts_and_streams_chats(tmp_path):
    binary = llama_server.cached_binary()
    if binary is None:
        pytest.skip(NOT_BUILT)
    model = bundled_model_path()
    command = llama_server.serve_command(binary, model, name="smollm2", context_length=256,
                                         max_sequences=2, threads=2, batch_size=512,
                                         weight_repack=False)
    with run.start_process(command, "/health", tmp_path / "llama-server.log") as proc:
        async def some(n: int):
            # the bench's own client: a connection per request, which llama-server closes
            # after each streamed response
            client = StreamClient(proc.url, timeout=120)
            body = chat_body("smollm2", "Say hello.", 12,
                             {"ignore_eos": True, "stream_options": {"include_usage": True}})
            return [await client.stream(body) for _ in range(n)]

        timings = asyncio.run(some(3))
        assert proc.cpu_s() > 0
    for timing in timings:
        assert timing.error is None, timing.error
        assert timing.tokens == 12  # usage's completion_tokens: every token, EOS ignored
        assert len(timing.arrivals) >= 2 and timing.ttft > 0
