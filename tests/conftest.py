"""Shared fixtures: a real server process on the bundled model, and clients for it."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
import openai
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))  # helper modules beside the tests

API_KEY = "test-key"
MODEL = "smollm2-135m-instruct"


@dataclass
class Server:
    url: str  # http://127.0.0.1:PORT
    api_key: str | None
    process: subprocess.Popen
    log_path: Path

    @property
    def base_url(self) -> str:
        return self.url + "/v1"

    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def run_server(
    tmp_dir: Path, *flags: str, api_key: str | None = API_KEY, env: dict[str, str] | None = None
) -> Iterator[Server]:
    """Start `llmserve serve` with `flags` (and LLMSERVE_* variables from `env` only), in
    `tmp_dir` so no stray .env is read; wait until /health answers, stop it afterwards."""
    port = _free_port()
    args = [sys.executable, "-m", "llmserve.cli", "serve", "--port", str(port),
            "--context-length", "2048", "--threads", "2", *flags]
    if api_key:
        args += ["--api-key", api_key]
    log_path = tmp_dir / f"server-{port}.log"
    environ = {k: v for k, v in os.environ.items() if not k.startswith("LLMSERVE_")}
    environ["XDG_DATA_HOME"] = str(tmp_dir / "data")  # the default store: the test's own
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT,
                                env={**environ, **(env or {})}, cwd=tmp_dir)
    server = Server(f"http://127.0.0.1:{port}", api_key, proc, log_path)
    try:
        deadline = time.monotonic() + 120
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"server exited with {proc.returncode}:\n{server.log()}")
            try:
                if httpx.get(server.url + "/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"server did not come up:\n{server.log()}")
            time.sleep(0.2)
        yield server
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def engines() -> list[str]:
    """The engines the suites that cover every engine run on: the transformers one where
    its extra (torch, transformers) is installed, as `make test` does; vLLM when asked for
    (LLMSERVE_TEST_VLLM=1) and installed."""
    try:
        import torch  # noqa: F401
        import transformers  # noqa: F401
    except ImportError:
        return ["llamacpp"]
    found = ["llamacpp", "transformers"]
    if os.environ.get("LLMSERVE_TEST_VLLM") == "1":
        import importlib.util

        if importlib.util.find_spec("vllm") is not None:
            found.append("vllm")
    return found


def hf_model_dir() -> Path:
    """The bundled GGUF as a Hugging Face directory (fp32 safetensors, its tokenizer and chat
    template), converted once per machine (beside the temp files, keyed on the GGUF's size;
    `convert_gguf` writes beside it and renames). vLLM cannot read the GGUF, and the
    transformers engine starts from it in a few seconds, against half a minute from the GGUF
    (whose loading its own tests cover)."""
    import tempfile

    from llmserve.engines.vllm import convert_gguf
    from llmserve.models import bundled_model_path

    gguf = bundled_model_path()
    out = Path(tempfile.gettempdir()) / f"llmserve-hf-smollm2-{gguf.stat().st_size}"
    if not out.is_dir():
        convert_gguf(gguf, out)
    return out


def engine_flags(engine: str) -> tuple[str, ...]:
    """Server flags for `engine` on the bundled model (the GGUF on llama.cpp, the Hugging
    Face directory converted from it on the others)."""
    if engine == "llamacpp":
        return ()
    return ("--engine", engine, "--model", str(hf_model_dir()), "--served-model-name", MODEL,
            "--embedding-model", "none")


@pytest.fixture(scope="session")
def session_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """The shared server: bundled model on llama.cpp, 16 sequences, API key required."""
    with run_server(tmp_path_factory.mktemp("server")) as s:
        yield s


@pytest.fixture(scope="session")
def server(session_server: Server) -> Server:
    return session_server


@pytest.fixture(scope="session")
def client(server: Server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.base_url, api_key=server.api_key, max_retries=0, timeout=120)


@pytest.fixture(scope="session")
def async_client(server: Server) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=server.base_url, api_key=server.api_key, max_retries=0, timeout=120)


@pytest.fixture(scope="session")
def http(server: Server) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.url, headers=server.headers(), timeout=120) as c:
        yield c


@pytest.fixture(scope="session")
def engine_servers(tmp_path_factory) -> Iterator[Callable[[str], Server]]:
    """A server per engine other than llama.cpp, started when a suite first asks for it and
    kept for the session, as the llama.cpp one is: a vLLM server takes most of a minute to
    start, and every suite would start its own. (Here, not in engine_fixtures: a fixture
    imported into several modules is one fixture per module.)"""
    servers: dict[str, Server] = {}
    with ExitStack() as stack:
        def get(engine: str) -> Server:
            if engine not in servers:
                servers[engine] = stack.enter_context(
                    run_server(tmp_path_factory.mktemp(engine), *engine_flags(engine)))
            return servers[engine]

        yield get
