"""The `llmserve` command line: help, `models`, flags and environment reaching the server,
and a clear failure for a missing model file."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
from conftest import MODEL, run_server

SERVE_FLAGS = [
    "--host", "--port", "--model", "--served-model-name", "--api-key", "--max-request-bytes",
    "--allowed-hosts", "--cors-origins", "--context-length",
    "--max-sequences", "--threads", "--store", "--store-ttl", "--engine-stall-timeout",
    "--log-level", "--no-playground",
    "--tensor-parallel-size", "--pipeline-parallel-size", "--distributed-executor-backend",
    "--gpu-memory-utilization", "--max-model-len", "--quantization", "--enable-prefix-caching",
]


def cli(*args: str, env: dict | None = None, cwd: Path | None = None, timeout: float = 60):
    return subprocess.run(
        [sys.executable, "-m", "llmserve.cli", *args],
        capture_output=True, text=True, timeout=timeout, env=env or _clean_env(), cwd=cwd,
    )


def _clean_env(**extra: str) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("LLMSERVE_")}
    env.update(extra)
    return env


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_help():
    r = cli("--help")
    assert r.returncode == 0, r.stderr
    assert "usage:" in r.stdout
    for command in ("serve", "models"):
        assert command in r.stdout


def test_help_says_what_llmserve_is_and_lists_every_command_with_its_purpose():
    out = cli("--help").stdout
    assert "open language models behind the OpenAI HTTP API" in out
    assert "builds Settings" not in out  # no developer's note
    commands = out.split("commands:")[1].split("examples:")[0]
    for command in ("serve", "chat", "models", "bench"):
        line = next(ln for ln in commands.splitlines() if ln.split()[:1] == [command])
        assert len(line.split()) > 3, line  # a purpose beside the name
    assert "  llmserve chat" in out.split("examples:")[1]


@pytest.mark.parametrize("command", ["serve", "chat", "models", "bench"])
def test_every_command_help_ends_with_examples(command):
    r = cli(command, "--help")
    assert r.returncode == 0, r.stderr
    examples = r.stdout.rstrip().split("\nexamples:\n")
    assert len(examples) == 2, r.stdout[-400:]
    lines = examples[1].splitlines()
    assert lines and all(ln.startswith(f"  llmserve {command}") or ln.startswith("  echo ")
                         for ln in lines), lines


def test_serve_help_lists_every_flag():
    r = cli("serve", "--help")
    assert r.returncode == 0, r.stderr
    for flag in SERVE_FLAGS:
        assert flag in r.stdout, flag


def test_version():
    r = cli("--version")
    assert r.returncode == 0
    assert "llmserve" in (r.stdout + r.stderr)


def test_no_command_is_a_usage_error():
    r = cli()
    assert r.returncode != 0
    assert "usage:" in r.stderr


def test_models_prints_bundled_path():
    r = cli("models")
    assert r.returncode == 0, r.stderr
    out = r.stdout.strip()
    assert MODEL in out
    path = Path(out.split("\t")[-1])
    assert path.is_absolute() and path.suffix == ".gguf" and path.is_file(), out

    from llmserve.models import bundled_model_path

    assert path == bundled_model_path()


def test_missing_model_file_fails_clearly(tmp_path):
    missing = tmp_path / "nope.gguf"
    r = cli("serve", "--model", str(missing), "--port", str(_free_port()), cwd=tmp_path,
            timeout=60)
    assert r.returncode != 0
    out = r.stdout + r.stderr
    assert str(missing) in out
    assert "not found" in out.lower() or "no such file" in out.lower()
    assert "Traceback" not in out


@pytest.mark.parametrize("args,word", [
    (["--port", "notaport"], "--port"),
    (["--log-level", "loud"], "log"),
    (["--max-sequences", "0"], "max_sequences"),
    (["--context-length", "4"], "context_length"),
    (["--bogus-flag"], "--bogus-flag"),
    (["--store-ttl", "soon"], "store_ttl"),
    (["--engine-stall-timeout", "-1"], "engine_stall_timeout"),
    (["--gpu-memory-utilization", "1.5"], "gpu_memory_utilization"),
    (["--distributed-executor-backend", "slurm"], "--distributed-executor-backend"),
    (["--speculative", "eagle"], "--speculative"),
    (["--speculative-tokens", "0"], "speculative_tokens"),
    (["--speculative-config", "{method: ngram}"], "speculative_config"),
    (["--speculative-config", "[1]"], "speculative_config"),
])
def test_bad_flags_are_usage_errors(tmp_path, args, word):
    r = cli("serve", *args, cwd=tmp_path)
    assert r.returncode == 2, (r.returncode, r.stdout, r.stderr)
    assert word in r.stderr
    assert "Traceback" not in r.stderr


@pytest.fixture
def parsed(tmp_path, monkeypatch) -> list:
    """The Settings each `cli.main(["serve", ...])` builds, with `serve` replaced (no server
    starts) and no LLMSERVE_* variable but those a test sets."""
    from llmserve import cli as cli_module

    for name in list(os.environ):
        if name.startswith("LLMSERVE_"):
            monkeypatch.delenv(name)
    monkeypatch.chdir(tmp_path)
    got: list = []
    monkeypatch.setattr(cli_module, "serve", lambda settings: got.append(settings) or 0)
    return got


def test_store_flags_over_environment(parsed, monkeypatch):
    """--store and --store-ttl reach Settings, over LLMSERVE_STORE*."""
    from llmserve import cli as cli_module

    monkeypatch.setenv("LLMSERVE_STORE", "env.db")
    monkeypatch.setenv("LLMSERVE_STORE_TTL", "60")
    assert cli_module.main(["serve"]) == 0
    assert cli_module.main(["serve", "--store", "none", "--store-ttl", "12h"]) == 0
    assert [(s.store, s.store_ttl) for s in parsed] == [("env.db", 60), ("none", 43200)]


def test_engine_stall_timeout_flag_over_environment(parsed, monkeypatch):
    from llmserve import cli as cli_module

    assert cli_module.main(["serve"]) == 0
    monkeypatch.setenv("LLMSERVE_ENGINE_STALL_TIMEOUT", "5")
    assert cli_module.main(["serve"]) == 0
    assert cli_module.main(["serve", "--engine-stall-timeout", "0"]) == 0
    assert [s.engine_stall_timeout for s in parsed] == [60.0, 5.0, 0.0]


def test_speculative_flags_over_environment(parsed, monkeypatch):
    from llmserve import cli as cli_module

    assert cli_module.main(["serve"]) == 0
    monkeypatch.setenv("LLMSERVE_SPECULATIVE", "ngram")
    assert cli_module.main(["serve", "--speculative-tokens", "8"]) == 0
    assert cli_module.main(["serve", "--speculative", "off", "--speculative-ngram", "2"]) == 0
    assert [(s.speculative, s.speculative_tokens, s.speculative_ngram) for s in parsed] == [
        ("auto", 5, 3), ("ngram", 8, 3), ("off", 5, 2)]


def test_lora_flags_over_environment(parsed, monkeypatch):
    from llmserve import cli as cli_module

    assert cli_module.main(["serve"]) == 0
    monkeypatch.setenv("LLMSERVE_LORAS", "a=a.gguf,b=b.gguf")
    assert cli_module.main(["serve"]) == 0
    assert cli_module.main(["serve", "--lora", "x=x.gguf", "--lora", "y=/y.gguf"]) == 0
    assert [s.loras for s in parsed] == [[], ["a=a.gguf", "b=b.gguf"], ["x=x.gguf", "y=/y.gguf"]]


def test_playground_flag_over_environment(parsed, monkeypatch):
    from llmserve import cli as cli_module

    assert cli_module.main(["serve"]) == 0
    assert cli_module.main(["serve", "--no-playground"]) == 0
    monkeypatch.setenv("LLMSERVE_PLAYGROUND", "false")
    assert cli_module.main(["serve"]) == 0
    assert cli_module.main(["serve", "--playground"]) == 0
    assert [s.playground for s in parsed] == [True, False, False, True]


def test_speculative_config_flag_over_environment(parsed, monkeypatch):
    """--speculative-config JSON reaches Settings as a dict, over LLMSERVE_SPECULATIVE_CONFIG."""
    from llmserve import cli as cli_module

    assert cli_module.main(["serve"]) == 0
    monkeypatch.setenv("LLMSERVE_SPECULATIVE_CONFIG", '{"method": "ngram"}')
    assert cli_module.main(["serve"]) == 0
    assert cli_module.main(["serve", "--speculative-config",
                            '{"method": "ngram", "num_speculative_tokens": 2}']) == 0
    assert [s.speculative_config for s in parsed] == [
        None, {"method": "ngram"}, {"method": "ngram", "num_speculative_tokens": 2}]


def test_vllm_flags_reach_settings(tmp_path, monkeypatch):
    """vLLM's own flags under vLLM's names; --max-model-len is --context-length."""
    from llmserve import cli as cli_module

    monkeypatch.chdir(tmp_path)
    got = []
    monkeypatch.setattr(cli_module, "serve", lambda settings: got.append(settings) or 0)
    assert cli_module.main([
        "serve", "--engine", "vllm", "--tensor-parallel-size", "4", "--pipeline-parallel-size",
        "2", "--distributed-executor-backend", "ray", "--gpu-memory-utilization", "0.8",
        "--max-model-len", "8192", "--quantization", "awq", "--no-enable-prefix-caching",
        "--nnodes", "2", "--node-rank", "1", "--master-addr", "10.0.0.1", "--master-port", "29555",
    ]) == 0
    s = got[0]
    assert (s.tensor_parallel_size, s.pipeline_parallel_size, s.distributed_executor_backend,
            s.gpu_memory_utilization, s.context_length, s.quantization,
            s.enable_prefix_caching) == (4, 2, "ray", 0.8, 8192, "awq", False)
    assert (s.nnodes, s.node_rank, s.master_addr, s.master_port) == (2, 1, "10.0.0.1", 29555)


def test_a_node_rank_on_another_engine_fails_clearly(tmp_path):
    from llmserve.models import bundled_model_path

    r = cli("serve", "--model", str(bundled_model_path()), "--node-rank", "1", "--nnodes", "2",
            cwd=tmp_path, timeout=60)
    assert r.returncode == 2
    assert "--nnodes, --node-rank: for --engine vllm only" in r.stderr
    assert "Traceback" not in r.stderr


def test_vllm_flags_on_another_engine_fail_clearly(tmp_path):
    r = cli("serve", "--tensor-parallel-size", "2", "--port", str(_free_port()), cwd=tmp_path,
            timeout=60)
    assert r.returncode == 2
    assert "--tensor-parallel-size: for --engine vllm only" in r.stderr
    assert "Traceback" not in r.stderr


def test_served_model_name_and_no_key(tmp_path):
    with run_server(tmp_path, "--served-model-name", "foo", api_key=None) as srv:
        with httpx.Client(base_url=srv.url, timeout=60) as h:  # no key needed
            models = h.get("/v1/models")
            assert models.status_code == 200
            assert [m["id"] for m in models.json()["data"]] == ["foo", "all-minilm-l6-v2"]
            assert h.get("/v1/models/foo").status_code == 200
            r = h.post("/v1/completions", json={"model": "foo", "prompt": "Hi", "max_tokens": 2})
            assert r.status_code == 200, r.text
            assert r.json()["model"] == "foo"
            # The file's own name is not served any more.
            r = h.post("/v1/chat/completions", json={
                "model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2})
            assert r.status_code == 404
            assert r.json()["error"]["code"] == "model_not_found"
            assert h.get("/health").json()["models"] == ["foo", "all-minilm-l6-v2"]


def test_api_keys_from_environment(tmp_path):
    """LLMSERVE_API_KEYS with two comma-separated keys: both are accepted, others are not.
    Other settings come from the environment too, and a flag wins over its variable."""
    env = {"LLMSERVE_API_KEYS": "key-one, key-two", "LLMSERVE_SERVED_MODEL_NAME": "envname",
           "LLMSERVE_CONTEXT_LENGTH": "64"}  # overridden by --context-length 512
    with run_server(tmp_path, "--context-length", "512", "--max-sequences", "2",
                    api_key=None, env=env) as server:
        url = server.url
        for key in ("key-one", "key-two"):
            r = httpx.get(url + "/v1/models", headers={"Authorization": f"Bearer {key}"})
            assert r.status_code == 200, (key, r.text)
            assert [m["id"] for m in r.json()["data"]] == ["envname", "all-minilm-l6-v2"]
        r = httpx.post(url + "/v1/completions", headers={"Authorization": "Bearer key-two"},
                       json={"model": "envname", "prompt": "Hi", "max_tokens": 1})
        assert r.status_code == 200, r.text
        # --context-length 512 (flag) beat LLMSERVE_CONTEXT_LENGTH=64.
        r = httpx.post(url + "/v1/completions", headers={"Authorization": "Bearer key-one"},
                       json={"model": "envname", "prompt": "Hi", "max_tokens": 1000})
        assert r.status_code == 400
        assert r.json()["error"]["code"] == "context_length_exceeded"
        assert "512" in r.json()["error"]["message"]
        for headers in ({}, {"Authorization": "Bearer key-three"},
                        {"Authorization": "Bearer key-one, key-two"}):
            r = httpx.get(url + "/v1/models", headers=headers)
            assert r.status_code == 401
            assert r.json()["error"]["code"] in ("invalid_api_key", "missing_api_key")
    log = server.log()
    assert "key-one" not in log and "key-two" not in log
