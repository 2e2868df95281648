"""llama.cpp's own `llama-server`, the bench's peer baseline for the llama.cpp engine.

It is built from the llama.cpp vendored in the sdist of the llama-cpp-python version installed
here (the one the project pins), so that it and our engine run the same llama.cpp; the sdist
comes from the package registry, nothing else is downloaded. llama.cpp builds for the CPU it
is built on (GGML_NATIVE), so the binary is cached per version and per CPU:
`~/.cache/llmserve/llama-server-<version>-<hash of the CPU's flags>/llama-server`, built once
(about 12 minutes on 2 cores) and reused after.

    python -m llmserve.bench.llama_server   # build it (or find it), print its path
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import platform
import shutil
import subprocess
import sys
import tarfile
from collections.abc import Sequence
from importlib import metadata
from pathlib import Path

from llmserve.engines.cpu import cpu_flags

BINARY = "llama-server"
# Only the server target; no network at build or run time (no curl, no OpenSSL, no web UI
# fetched from a hub); static, so that the cached binary stands alone.
CMAKE_OPTIONS = (
    "-DCMAKE_BUILD_TYPE=Release",
    "-DBUILD_SHARED_LIBS=OFF",
    "-DGGML_NATIVE=ON",  # as llama-cpp-python's own build; explicit: SOURCE_DATE_EPOCH turns it off
    "-DGGML_CCACHE=OFF",
    "-DLLAMA_CURL=OFF",
    "-DLLAMA_OPENSSL=OFF",
    "-DLLAMA_BUILD_COMMON=ON",
    "-DLLAMA_BUILD_TOOLS=ON",
    "-DLLAMA_BUILD_SERVER=ON",
    "-DLLAMA_BUILD_TESTS=OFF",
    "-DLLAMA_BUILD_EXAMPLES=OFF",
    "-DLLAMA_BUILD_APP=OFF",
    "-DLLAMA_BUILD_UI=OFF",
    "-DLLAMA_USE_PREBUILT_UI=OFF",
)


class BuildError(RuntimeError):
    """llama-server could not be built here; the message says why and where the log is."""


def llama_cpp_python_version() -> str:
    return metadata.version("llama_cpp_python")


def cpu_key(flags: frozenset[str] | None = None, machine: str | None = None) -> str:
    """A short hash of what a native build depends on: the architecture and the CPU's flags."""
    flags = cpu_flags() if flags is None else flags
    text = f"{machine or platform.machine()} {' '.join(sorted(flags))}"
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def cache_dir(version: str | None = None) -> Path:
    root = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "llmserve"
    return root / f"llama-server-{version or llama_cpp_python_version()}-{cpu_key()}"


def cached_binary() -> Path | None:
    """The binary built for this version and CPU, if it is there."""
    path = cache_dir() / BINARY
    return path if path.is_file() and os.access(path, os.X_OK) else None


def _tool(name: str) -> str | None:
    """A build tool from this environment's bin (pip's cmake, ninja) or else the PATH."""
    here = Path(sys.executable).parent / name
    return str(here) if here.is_file() else shutil.which(name)


def _run(args: Sequence[str], log, cwd: Path | None = None) -> None:
    log.write(f"\n$ {' '.join(args)}\n".encode())
    log.flush()
    env = {k: v for k, v in os.environ.items() if k != "SOURCE_DATE_EPOCH"}
    code = subprocess.run(args, stdout=log, stderr=subprocess.STDOUT, cwd=cwd, env=env,
                          check=False).returncode
    if code:
        raise BuildError(f"`{' '.join(args[:3])} ...` failed (exit {code})")


def build(jobs: int | None = None) -> Path:
    """The cached binary, built first if it is not there yet (one build at a time per cache
    directory: a second caller waits for the first). Raises BuildError on any failure; the
    build's output is in `build.log` beside the binary, its sources under `work/` (kept after
    a failure, so that a retry resumes; removed after a success)."""
    version = llama_cpp_python_version()
    out = cache_dir(version)
    out.mkdir(parents=True, exist_ok=True)
    with open(out / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (found := cached_binary()) is not None:
            return found
        log_path = out / "build.log"
        try:
            with open(log_path, "ab") as log:
                _build_into(out, version, log, jobs or os.cpu_count() or 1)
        except BuildError as exc:
            raise BuildError(f"{exc}; see {log_path}") from None
        except OSError as exc:
            raise BuildError(f"{exc}; see {log_path}") from None
        return out / BINARY


def _build_into(out: Path, version: str, log, jobs: int) -> None:
    cmake = _tool("cmake")
    if cmake is None:
        raise BuildError("cmake not found (pip install cmake, or the system's)")
    work = out / "work"
    sdist_dir = work / "sdist"
    source = work / f"llama_cpp_python-{version}"
    if not (source / "vendor" / "llama.cpp" / "CMakeLists.txt").is_file():
        _run([sys.executable, "-m", "pip", "download", "--no-binary", ":all:", "--no-deps",
              "--disable-pip-version-check", f"llama-cpp-python=={version}", "-d", str(sdist_dir)],
             log)
        sdists = sorted(sdist_dir.glob(f"llama_cpp_python-{version}.tar.gz"))
        if not sdists:
            raise BuildError(f"pip download left no llama_cpp_python-{version}.tar.gz")
        with tarfile.open(sdists[0]) as tar:
            if hasattr(tarfile, "data_filter"):  # Python >= 3.11.4: no paths out of `work`
                tar.extractall(work, filter="data")
            else:
                tar.extractall(work)
    build_dir = work / "build"
    ninja = _tool("ninja")
    generator = ["-G", "Ninja", f"-DCMAKE_MAKE_PROGRAM={ninja}"] if ninja else []
    if not (build_dir / "CMakeCache.txt").is_file():
        _run([cmake, "-S", str(source / "vendor" / "llama.cpp"), "-B", str(build_dir),
              *generator, *CMAKE_OPTIONS], log)
    _run([cmake, "--build", str(build_dir), "--target", BINARY, "-j", str(jobs)], log)
    built = build_dir / "bin" / BINARY
    if not built.is_file():
        raise BuildError(f"the build left no {built}")
    tmp = out / f"{BINARY}.tmp"
    shutil.copy2(built, tmp)
    os.replace(tmp, out / BINARY)  # whole or absent: a reader never sees half a binary
    shutil.rmtree(work, ignore_errors=True)


def serve_command(binary: Path, model_path: Path, *, name: str, context_length: int,
                  max_sequences: int, threads: int, batch_size: int,
                  weight_repack: bool) -> list[str]:
    """The baseline's command line (with a `{port}` placeholder), configured as llmserve's
    llama.cpp engine configures llama.cpp: one slot per stream with our per-sequence context
    (`-c` is the whole KV cache, split evenly among the `-np` slots), a KV stream per slot
    (our `kv_unified=False`), our batch sizes and threads, and weight repacking as ours."""
    args = [str(binary), "--model", str(model_path), "--alias", name,
            "--host", "127.0.0.1", "--port", "{port}",
            "--parallel", str(max_sequences), "--ctx-size", str(context_length * max_sequences),
            "--no-kv-unified", "--batch-size", str(batch_size), "--ubatch-size", str(batch_size),
            "--threads", str(threads), "--threads-batch", str(threads)]
    if not weight_repack:
        args.append("--no-repack")
    return args


def main() -> int:
    try:
        path = cached_binary()
        if path is None:
            print(f"building {BINARY} (log: {cache_dir() / 'build.log'})", file=sys.stderr)
            path = build()
    except BuildError as exc:
        print(f"{BINARY}: build failed: {exc}", file=sys.stderr)
        return 1
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
