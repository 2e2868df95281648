"""The container image (Dockerfile) built and run with podman: `make test-container`.

The image is built as a user builds it, from this checkout, with two differences that keep it
to minutes on a machine that reaches only package registries: its base is Debian bookworm with
Debian's python3, made here by debootstrap (Docker Hub's python:3.11-slim-bookworm cannot be
pulled), and the llama-cpp-python wheel `make test` built is offered to it (docker/wheels/),
so llama.cpp is not compiled a second time (that wheel is built for this machine's CPU; the
Dockerfile's own build is for any AVX2 CPU).
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

pytestmark = pytest.mark.skipif(
    os.environ.get("LLMSERVE_TEST_CONTAINER") != "1",
    reason="builds and runs the image with podman: make test-container",
)

ROOT = Path(__file__).resolve().parents[1]
WORK = ROOT / "build" / "container"
BASE = "localhost/llmserve-test-base:bookworm"
IMAGE = "localhost/llmserve:test"
LLAMA = "llama-cpp-python==0.3.36"
HOST_CA = Path(os.environ.get("SSL_CERT_FILE", "/etc/ssl/certs/ca-certificates.crt"))
# vfs storage (no overlay mounts inside this machine's sandbox), runc (crun refuses the
# hybrid cgroup layout here), rlimits no higher than this machine's, host networking.
PODMAN = ["podman", "--storage-driver", "vfs"]
RUN_FLAGS = ["--runtime", "runc", "--network", "host",
             "--ulimit", "nofile=4096:4096", "--ulimit", "nproc=4096:4096"]


def podman(*args: str, timeout: float = 120, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run([*PODMAN, *args], capture_output=True, text=True, timeout=timeout,
                          check=check)


def _has_image(name: str) -> bool:
    return podman("image", "exists", name, check=False).returncode == 0


def _build_base() -> None:
    """Debian bookworm with python3 and its venv module: what python:3.11-slim-bookworm gives."""
    rootfs = WORK / "rootfs"
    if not (rootfs / "usr" / "bin" / "python3").exists():
        shutil.rmtree(rootfs, ignore_errors=True)
        subprocess.run(["debootstrap", "--variant=minbase", "--include=python3,python3-venv",
                        "bookworm", str(rootfs), "http://deb.debian.org/debian"],
                       check=True, capture_output=True, timeout=1200)
    # this machine's CA bundle: its egress may be a TLS proxy that the base must trust too
    certs = rootfs / "etc" / "ssl" / "certs"
    certs.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(HOST_CA, certs / "ca-certificates.crt")
    bundle = "/etc/ssl/certs/ca-certificates.crt"
    tar = subprocess.Popen(["tar", "-C", str(rootfs), "-c", "."], stdout=subprocess.PIPE)
    subprocess.run([*PODMAN, "import", "--change", f"ENV PIP_CERT={bundle}",
                    "--change", f"ENV SSL_CERT_FILE={bundle}", "-", BASE],
                   stdin=tar.stdout, check=True, capture_output=True, timeout=600)
    assert tar.wait() == 0


def _offer_llama_wheel() -> None:
    wheels = ROOT / "docker" / "wheels"
    if not list(wheels.glob("llama_cpp_python-*.whl")):
        subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w",
                        str(wheels), LLAMA], check=True, timeout=1800)


@pytest.fixture(scope="module")
def image() -> str:
    WORK.mkdir(parents=True, exist_ok=True)
    if not _has_image(BASE):
        _build_base()
    _offer_llama_wheel()
    log = WORK / "build.log"
    with log.open("w") as out:
        built = subprocess.run(
            [*PODMAN, "build", "--isolation", "chroot", "--format", "docker",
             "--build-arg", f"BASE={BASE}", "-t", IMAGE, str(ROOT)],
            stdout=out, stderr=subprocess.STDOUT, timeout=2400)
    assert built.returncode == 0, log.read_text()[-4000:]
    return IMAGE


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def container(image: str) -> Iterator[tuple[str, int]]:
    port = _free_port()
    name = f"llmserve-test-{port}"
    podman("run", "-d", "--name", name, *RUN_FLAGS, "-e", f"LLMSERVE_PORT={port}",
           "-e", "LLMSERVE_THREADS=2", image)
    try:
        deadline = time.monotonic() + 180
        while podman("healthcheck", "run", name, check=False).returncode != 0:
            state = podman("inspect", "-f", "{{.State.Status}}", name).stdout.strip()
            assert state == "running", podman("logs", name, check=False).stdout
            assert time.monotonic() < deadline, podman("logs", name, check=False).stdout
            time.sleep(1)
        yield name, port
    finally:
        podman("rm", "-f", "-t", "5", name, check=False)


def test_image_runs_as_a_user_with_a_healthcheck(image: str) -> None:
    inspected = json.loads(podman("image", "inspect", image).stdout)[0]
    config = inspected["Config"]
    assert config["User"] == "10001:10001"
    check = inspected.get("Healthcheck") or config.get("Healthcheck")  # where podman puts it
    assert check["Test"] == ["CMD", "llmserve-entrypoint", "health"]
    assert "8000/tcp" in config["ExposedPorts"]
    assert "LLMSERVE_HOST=0.0.0.0" in config["Env"]


def test_server_is_healthy_and_not_root(container: tuple[str, int]) -> None:
    name, _ = container
    assert podman("exec", name, "id", "-u").stdout.strip() != "0"
    # the bundled model is in the image, not fetched
    found = podman("exec", name, "python3", "-c",
                   "from llmserve.models import bundled_model_path as p; print(p().stat().st_size)")
    assert int(found.stdout) > 90_000_000


def test_streamed_chat_and_metrics(container: tuple[str, int]) -> None:
    import openai

    _, port = container
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none")
    model = client.models.list().data[0].id
    stream = client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": "Say hello."}],
        max_tokens=16, temperature=0, stream=True)
    text = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    assert text.strip()
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as reply:
        metrics = reply.read().decode()
    counted = [float(line.rsplit(" ", 1)[1]) for line in metrics.splitlines()
               if line.startswith("llmserve:generation_tokens_total{")]
    assert counted and sum(counted) > 0, metrics[:2000]


def test_stop_is_graceful(image: str) -> None:
    """SIGTERM (podman stop) ends the server cleanly, well before podman's SIGKILL."""
    port = _free_port()
    name = f"llmserve-stop-{port}"
    podman("run", "-d", "--name", name, *RUN_FLAGS, "-e", f"LLMSERVE_PORT={port}", image)
    try:
        deadline = time.monotonic() + 180
        while podman("healthcheck", "run", name, check=False).returncode != 0:
            assert time.monotonic() < deadline, podman("logs", name, check=False).stdout
            time.sleep(1)
        began = time.monotonic()
        podman("stop", "-t", "30", name)
        assert time.monotonic() - began < 20
        code = podman("inspect", "-f", "{{.State.ExitCode}}", name).stdout.strip()
        assert code == "0", podman("logs", name, check=False).stdout
    finally:
        podman("rm", "-f", "-t", "5", name, check=False)
