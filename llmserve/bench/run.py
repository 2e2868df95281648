"""`llmserve bench`: a concurrency sweep of streamed chat requests against llmserve, with
baselines measured in the same run, level by level so that machine drift cancels: the same
engine in-process with no HTTP (the limit), the engine's own OpenAI server on the same model
(llama.cpp's `llama-server` and llama-cpp-python's for llama.cpp, `vllm serve` for vLLM), and
for the transformers engine Hugging Face `model.generate` on static batches of the same
prompts."""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import json
import os
import platform
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING

import httpx

from llmserve.bench.load import Timing, chat_body, engine_stream, http_stream, run_level
from llmserve.bench.report import LevelResult, ratios, summarize, table

if TYPE_CHECKING:
    from llmserve.config import Settings

LLMSERVE = "llmserve"
LIMIT = "in-process"
LCP = "llama-cpp-python"
LLAMA_SERVER = "llama-server"
# llama-server closes the connection after every streamed response (its chunk provider returns
# false after `sink.done()`, which cpp-httplib takes for a cancel), so a request sent on the
# kept-alive connection races that close and fails ("Server disconnected without sending a
# response"). Asking for the close up front opens a connection per request, as it does anyway.
LLAMA_SERVER_HEADERS = {"Connection": "close"}
VLLM = "vllm serve"
CONSTRAINED = "llmserve json_schema"
# Free text inside a structure, never complete within the bench's answers: every stream
# runs to max_tokens under its grammar, as the unconstrained ones do.
NOTES_SCHEMA = {
    "type": "object",
    "properties": {"notes": {"type": "array", "items": {"type": "string"}, "minItems": 256}},
    "required": ["notes"],
    "additionalProperties": False,
}
NOTES_FORMAT = {"type": "json_schema", "json_schema": {"name": "notes", "schema": NOTES_SCHEMA}}


def shipped_prompts() -> list[str]:
    return json.loads(resources.files("llmserve.bench").joinpath("prompts.json").read_text())


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Proc:
    """A server process we started: its URL, and the CPU time and peak memory of it and its
    children (llmserve's engine runs in a child process)."""

    def __init__(self, popen: subprocess.Popen, url: str) -> None:
        self.popen = popen
        self.url = url

    def _pids(self) -> list[int]:
        pids, i = [self.popen.pid], 0
        while i < len(pids):
            try:
                for task in Path(f"/proc/{pids[i]}/task").iterdir():
                    pids += [int(c) for c in (task / "children").read_text().split()]
            except OSError:
                pass
            i += 1
        return pids

    def cpu_s(self, *, tree: bool = True) -> float | None:
        """CPU seconds of the whole tree, or (`tree=False`) of the server's own process only:
        the API layer, where the engine runs in children (llmserve's engines, vLLM's core)."""
        total = 0
        for pid in self._pids() if tree else [self.popen.pid]:
            try:
                fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
                total += int(fields[11]) + int(fields[12])
            except (OSError, IndexError, ValueError):
                if pid == self.popen.pid:
                    return None
        return total / os.sysconf("SC_CLK_TCK")

    def rss_mb(self) -> float | None:
        """Resident memory now, summed over the process tree."""
        return self._status_mb("VmRSS:")

    def peak_rss_mb(self) -> float | None:
        """Peak resident memory, summed over the process tree."""
        return self._status_mb("VmHWM:")

    def _status_mb(self, field: str) -> float | None:
        total = 0
        for pid in self._pids():
            try:
                for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                    if line.startswith(field):
                        total += int(line.split()[1])
            except OSError:
                if pid == self.popen.pid:
                    return None
        return total / 1024 if total else None


@contextmanager
def start_process(args: list[str], ready_path: str, log_path: Path,
                  env: dict[str, str] | None = None) -> Iterator[Proc]:
    port = _free_port()
    args = [a.replace("{port}", str(port)) for a in args]
    with open(log_path, "wb") as log:
        popen = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        while True:
            if popen.poll() is not None:
                raise RuntimeError(f"{args[:4]} exited; see {log_path}")
            try:
                if httpx.get(url + ready_path, timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"{args[:4]} did not come up; see {log_path}")
            time.sleep(0.25)
        yield Proc(popen, url)
    finally:
        popen.terminate()
        try:
            popen.wait(timeout=15)
        except subprocess.TimeoutExpired:
            popen.kill()


@dataclass
class _Run:
    """One block of requests against a server: what `summarize` needs, and what the server's
    process tree spent on it."""

    timings: list[Timing]
    wall: float
    cpu_s: float | None
    api_cpu_s: float | None
    peak_rss_mb: float | None


async def _run_http(
    url: str, model: str, prompts: list[str], conc: int, requests: int, max_tokens: int,
    extra: dict, proc: Proc | None, headers: dict[str, str] | None = None,
) -> _Run:
    limits = httpx.Limits(max_connections=conc + 4, max_keepalive_connections=conc + 4)
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=limits,
                                 headers=headers) as client:
        # One short request first: connections and caches warm, nothing measured.
        await http_stream(client, chat_body(model, prompts[0], 4, extra))
        cpu0 = proc.cpu_s() if proc else None
        api0 = proc.cpu_s(tree=False) if proc else None

        async def one(i: int):
            return await http_stream(
                client, chat_body(model, prompts[i % len(prompts)], max_tokens, extra)
            )

        timings, wall = await run_level(one, conc, requests)
    cpu1 = proc.cpu_s() if proc else None
    api1 = proc.cpu_s(tree=False) if proc else None
    return _Run(timings, wall, cpu1 - cpu0 if cpu0 is not None and cpu1 is not None else None,
                api1 - api0 if api0 is not None and api1 is not None else None,
                proc.peak_rss_mb() if proc else None)


def _result(name: str, conc: int, runs: list[_Run]) -> LevelResult:
    """One row of several blocks of the same system: their requests over their summed time."""
    result = summarize(name, conc, [t for r in runs for t in r.timings], sum(r.wall for r in runs))
    cpus = [r.cpu_s for r in runs]
    result.cpu_s = None if None in cpus else sum(cpus)  # type: ignore[arg-type]
    api = [r.api_cpu_s for r in runs]
    result.api_cpu_s = None if None in api else sum(api)  # type: ignore[arg-type]
    result.peak_rss_mb = max((r.peak_rss_mb for r in runs if r.peak_rss_mb is not None), default=None)
    return result


@dataclass
class _Http:
    """A system measured over HTTP: a row's name, its server, the body fields it gets."""

    name: str
    url: str
    extra: dict
    proc: Proc | None
    engine_apart: bool = True  # the engine runs in child processes: the top one is the API
    headers: dict[str, str] | None = None  # sent with every request


async def _measure_interleaved(
    systems: list[_Http], model: str, prompts: list[str], conc: int, requests: int,
    max_tokens: int, rounds: int = 1,
) -> list[LevelResult]:
    """Every system in `2 * rounds` blocks (the requests split evenly, at least one per
    stream), in the order A, B, ..., ..., B, A (`rounds` times), after one unmeasured block
    of the first. The machine's speed drifts by a third within a minute here, and runs just
    after a quiet spell (a server's start) are faster: the warm-up block and this order keep
    both out of the ratios; more rounds average out what drifts faster than a block."""
    block = max(conc, -(-requests // (2 * rounds)))
    first = systems[0]
    await _run_http(first.url, model, prompts, conc, conc, max_tokens, first.extra, first.proc,
                    first.headers)
    runs: dict[str, list[_Run]] = {s.name: [] for s in systems}
    for s in (systems + systems[::-1]) * rounds:
        runs[s.name].append(await _run_http(s.url, model, prompts, conc, block, max_tokens,
                                            s.extra, s.proc, s.headers))
    results = [_result(s.name, conc, runs[s.name]) for s in systems]
    for s, result in zip(systems, results, strict=True):
        if not s.engine_apart:
            result.api_cpu_s = None
    return results


async def _measure_engine(engine, prompts: list[list[int]], conc: int, requests: int,
                          max_tokens: int) -> LevelResult:
    await engine_stream(engine, prompts[0], 4)

    async def one(i: int):
        return await engine_stream(engine, prompts[i % len(prompts)], max_tokens)

    cpu0 = time.process_time()
    timings, wall = await run_level(one, conc, requests)
    result = summarize(LIMIT, conc, timings, wall)
    result.cpu_s = time.process_time() - cpu0
    return result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="llmserve bench", description=__doc__)
    p.add_argument("--model", help="GGUF file or model directory (default: the bundled model)")
    p.add_argument("--engine", default="auto",
                   choices=["auto", "llamacpp", "transformers", "vllm"],
                   help="llmserve's engine, also used for the in-process limit (vllm: --model "
                        "is a Hugging Face directory; `vllm serve` on it is a baseline)")
    p.add_argument("--url", help="measure a running llmserve at this URL instead of starting one")
    p.add_argument("--served-model-name", help="model name to send with --url")
    p.add_argument("--levels", default="1,4,16,64", help="concurrency sweep (default 1,4,16,64)")
    p.add_argument("--max-tokens", type=int, default=128, help="output tokens per request")
    p.add_argument("--rounds", type=int, default=1,
                   help="A,B,..,B,A rounds of the HTTP systems; the requests split among them")
    p.add_argument("--requests", type=int, default=0,
                   help="requests per level (default: max(4, concurrency))")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    p.add_argument("--context-length", type=int, default=1024)
    p.add_argument("--no-limit", action="store_true", help="skip the in-process baseline")
    p.add_argument("--no-constrained", action="store_true",
                   help="skip the case of llmserve with every stream under a JSON schema")
    p.add_argument("--no-llama-cpp-python", action="store_true",
                   help="skip llama-cpp-python's server baseline")
    p.add_argument("--no-llama-server", action="store_true",
                   help="skip llama.cpp's llama-server baseline (llama.cpp engine)")
    p.add_argument("--llama-server", metavar="PATH",
                   help="llama-server binary to use (default: the one built from the pinned "
                        "llama-cpp-python's sdist, cached; built on first use)")
    p.add_argument("--no-vllm-serve", action="store_true",
                   help="skip vLLM's own server baseline (--engine vllm)")
    p.add_argument("--no-hf-generate", action="store_true",
                   help="skip Hugging Face model.generate's baseline (transformers engine)")
    p.add_argument("--json", default="benchmarks/results/bench.json", help="where to write JSON")
    p.add_argument("--logs", default="benchmarks/results", help="folder for server logs")
    soak = p.add_argument_group("soak (--soak): healthy and hostile clients for minutes")
    soak.add_argument("--soak", action="store_true", help="run the soak instead of the sweep")
    soak.add_argument("--duration", type=float, default=300, help="soak seconds (default 300)")
    soak.add_argument("--baseline", type=float, default=60,
                      help="seconds of healthy streams alone first (default 60)")
    soak.add_argument("--healthy", type=int, default=64, help="concurrent healthy streams")
    soak.add_argument("--abandoned", type=int, default=1000,
                      help="streams hung up after their first token (default 1000)")
    soak.add_argument("--slow", type=int, default=100,
                      help="readers that send a request and read nothing (default 100)")
    soak.add_argument("--slow-hold", type=float, default=45,
                      help="seconds each slow reader keeps its connection (default 45)")
    args = p.parse_args(argv)
    return asyncio.run(_soak(args) if args.soak else _main(args))


async def _soak(args: argparse.Namespace) -> int:
    from llmserve.bench.soak import print_report, soak
    from llmserve.models import bundled_model_path, served_name_for

    model_path = Path(args.model) if args.model else bundled_model_path()
    logs = Path(args.logs)
    logs.mkdir(parents=True, exist_ok=True)
    with start_process(
        [sys.executable, "-m", "llmserve.cli", "serve", "--port", "{port}",
         "--model", str(model_path), "--engine", args.engine, "--embedding-model", "none",
         "--store", "none",
         "--max-sequences", str(args.healthy), "--context-length", str(args.context_length),
         "--threads", str(args.threads), "--log-level", "warning"],
        "/health", logs / "soak-server.log",
    ) as proc:
        result = await soak(
            proc.url, served_name_for(model_path), shipped_prompts(), healthy=args.healthy,
            baseline=args.baseline, duration=args.duration, abandoned=args.abandoned,
            slow=args.slow, slow_hold=args.slow_hold, rss_mb=proc.rss_mb,
        )
    print(f"\nsoak: model {model_path.name}, {args.threads} threads, {os.cpu_count()} cores")
    out = Path(args.json).with_name("soak.json")
    print_report(result, out)
    healthy_errors = sum(result["healthy_errors"].values())
    leaked = result["leaked_running"] or result["leaked_waiting"]
    return 1 if healthy_errors or leaked else 0


async def _main(args: argparse.Namespace) -> int:
    from llmserve.models import bundled_model_path, served_name_for

    levels = [int(x) for x in args.levels.split(",") if x.strip()]
    model_path = Path(args.model) if args.model else bundled_model_path()
    prompts = shipped_prompts()
    logs = Path(args.logs)
    logs.mkdir(parents=True, exist_ok=True)
    max_seq = max(levels)
    engine_kind = args.engine
    if engine_kind == "auto":
        engine_kind = "transformers" if model_path.is_dir() else "llamacpp"
    # llama-cpp-python serves GGUF files only: it is the baseline for the llama.cpp engine.
    want_lcp = not args.no_llama_cpp_python and engine_kind == "llamacpp"
    if want_lcp and importlib.util.find_spec("llama_cpp.server") is None:
        print("llama-cpp-python's server is not installed (pip install -e '.[bench]'): "
              "skipping that baseline", file=sys.stderr)
        want_lcp = False

    # Built (or found) before any server starts: a build competes with nothing measured.
    llama_server = (_llama_server_binary(args.llama_server)
                    if engine_kind == "llamacpp" and not args.no_llama_server else None)
    hf = None
    if engine_kind == "transformers" and not args.no_hf_generate:
        from llmserve.bench.hf_generate import HFGenerate

        hf = HFGenerate(model_path, threads=args.threads)
        hf_prompts = _token_prompts(hf, prompts)
    engine = None
    results: list[LevelResult] = []
    from llmserve.config import Settings

    # What our server runs with (same flags, same LLMSERVE_* environment and .env), for the
    # in-process engine and llama-server's configuration.
    settings = (Settings(engine=engine_kind, context_length=args.context_length,
                         max_sequences=max_seq, threads=args.threads)
                if llama_server is not None or not args.no_limit else None)
    with ExitStack() as stack:
        if args.url:
            ours_url, ours_proc = args.url.rstrip("/"), None
            model = args.served_model_name or served_name_for(model_path)
        else:
            ours_proc = stack.enter_context(start_process(
                [sys.executable, "-m", "llmserve.cli", "serve", "--port", "{port}",
                 "--model", str(model_path), "--engine", engine_kind,
                 "--embedding-model", "none", "--store", "none", "--max-sequences", str(max_seq),
                 "--context-length", str(args.context_length), "--threads", str(args.threads),
                 "--log-level", "warning"],
                "/health", logs / "llmserve.log"))
            ours_url, model = ours_proc.url, served_name_for(model_path)
        vllm_proc = None
        if engine_kind == "vllm" and not args.no_vllm_serve:
            from llmserve.bench.vllm_serve import serve_command

            command, env = serve_command(model_path, name=model,
                                         context_length=args.context_length,
                                         max_sequences=max_seq, threads=args.threads)
            vllm_proc = stack.enter_context(start_process(
                command, "/v1/models", logs / "vllm-serve.log", env=env))
        ls_proc = None
        if llama_server is not None and settings is not None:
            ls_proc = _start_llama_server(stack, llama_server, model_path, model, settings,
                                          logs / "llama-server.log")
        lcp_proc = None
        if want_lcp:
            lcp_proc = stack.enter_context(start_process(
                [sys.executable, "-m", "llmserve.bench.lcp_server", "--model", str(model_path),
                 "--port", "{port}", "--n_ctx", str(args.context_length),
                 "--n_threads", str(args.threads), "--n_threads_batch", str(args.threads),
                 "--interrupt_requests", "False", "--verbose", "False"],
                "/v1/models", logs / "llama-cpp-python.log"))
        if settings is not None and not args.no_limit:
            from llmserve.models import load_engine

            engine = load_engine(settings, model_path, show_progress=False)
            await engine.start()
            token_prompts = _token_prompts(engine, prompts)
        # llama-cpp-python knows no ignore_eos: a -100 bias on end tokens keeps lengths equal.
        lcp_extra = (
            {"logit_bias": {str(t): -100 for t in _end_tokens(engine, model_path)}}
            if lcp_proc is not None else {}
        )
        ours_extra = {"ignore_eos": True, "stream_options": {"include_usage": True}}
        try:
            for conc in levels:
                n_req = args.requests or max(4, conc)
                print(f"-- concurrency {conc}: {n_req} requests x {args.max_tokens} tokens",
                      file=sys.stderr, flush=True)
                systems = [_Http(LLMSERVE, ours_url, ours_extra, ours_proc)]
                if not args.no_constrained:
                    systems.append(_Http(CONSTRAINED, ours_url,
                                         {**ours_extra, "response_format": NOTES_FORMAT},
                                         ours_proc))
                if vllm_proc is not None:  # it takes ignore_eos too: the same bodies
                    systems.append(_Http(VLLM, vllm_proc.url, ours_extra, vllm_proc))
                if ls_proc is not None:  # ignore_eos and include_usage too
                    systems.append(_Http(LLAMA_SERVER, ls_proc.url, ours_extra, ls_proc,
                                         engine_apart=False, headers=LLAMA_SERVER_HEADERS))
                if lcp_proc is not None:
                    systems.append(_Http(LCP, lcp_proc.url, lcp_extra, lcp_proc, engine_apart=False))
                results += await _measure_interleaved(systems, model, prompts, conc, n_req,
                                                      args.max_tokens, args.rounds)
                if engine is not None:
                    results.append(await _measure_engine(engine, token_prompts, conc, n_req,
                                                         args.max_tokens))
                if hf is not None:
                    results.append(hf.measure(hf_prompts, conc, n_req, args.max_tokens))
                shown = len(systems) + (engine is not None) + (hf is not None)
                print(table(results[-shown:]),
                      file=sys.stderr, flush=True)
        finally:
            if engine is not None:
                await engine.stop()

    hf_name = [hf.system] if hf is not None else []
    baselines = [b for b in (LIMIT, LLAMA_SERVER, LCP, VLLM, *hf_name)
                 if any(r.system == b for r in results)]
    ratio_text, ratio_rows = ratios(results, LLMSERVE, baselines)
    if hf is not None and engine is not None:  # the engine alone against plain generate
        text, _ = ratios(results, LIMIT, hf_name)
        ratio_text += "\n" + text
    constrained_rows: list[dict] = []
    if any(r.system == CONSTRAINED for r in results):
        text, constrained_rows = ratios(results, CONSTRAINED, [LLMSERVE])
        ratio_text += "\n" + text
    print()
    print(f"model {model_path.name}, {engine_kind} engine, {args.max_tokens} output tokens per request, greedy, "
          f"{args.threads} threads, {os.cpu_count()} cores, {platform.processor() or platform.machine()}")
    print(table(results))
    print()
    print(ratio_text)
    out = Path(args.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({
        "model": str(model_path), "engine": engine_kind, "max_tokens": args.max_tokens, "threads": args.threads,
        "cores": os.cpu_count(), "levels": levels,
        "results": [r.to_json() for r in results], "ratios": ratio_rows,
        "constrained_ratios": constrained_rows,
    }, indent=1))
    print(f"\nJSON: {out}")
    return 1 if any(r.errors for r in results if r.system == LLMSERVE) else 0


def _llama_server_binary(path: str | None) -> Path | None:
    """The llama-server to measure: `path`, or the cached build, built now if need be. None
    (with a note) where it cannot be had: the bench goes on without that baseline."""
    from llmserve.bench import llama_server

    if path is not None:
        return Path(path)
    found = llama_server.cached_binary()
    if found is not None:
        return found
    version = llama_server.llama_cpp_python_version()
    print(f"building llama-server from llama-cpp-python {version}'s sdist, once (about 12 "
          f"minutes on 2 cores; log: {llama_server.cache_dir() / 'build.log'}; "
          "--no-llama-server skips it)", file=sys.stderr, flush=True)
    try:
        return llama_server.build()
    except llama_server.BuildError as exc:
        print(f"llama-server could not be built ({exc}): skipping that baseline",
              file=sys.stderr, flush=True)
        return None


def _start_llama_server(stack: ExitStack, binary: Path, model_path: Path, name: str,
                        settings: Settings, log_path: Path) -> Proc | None:
    from llmserve.bench.llama_server import serve_command
    from llmserve.engines.cpu import weight_repack_enabled

    command = serve_command(
        binary, model_path, name=name, context_length=settings.context_length,
        max_sequences=settings.max_sequences, threads=settings.threads,
        batch_size=settings.batch_size, weight_repack=weight_repack_enabled(settings.weight_repack))
    try:
        return stack.enter_context(start_process(command, "/health", log_path))
    except (RuntimeError, OSError) as exc:
        print(f"llama-server did not start ({exc}): skipping that baseline", file=sys.stderr,
              flush=True)
        return None


def _token_prompts(model, prompts: list[str]) -> list[list[int]]:
    """Each prompt as one user message in `model`'s chat template (an engine, or the
    hf generate baseline), tokenized."""
    from llmserve.serving.chat_template import CHATML_TEMPLATE, ChatTemplate

    template = ChatTemplate(model.chat_template or CHATML_TEMPLATE,
                            bos_token=model.bos_token, eos_token=model.eos_token)
    return [model.tokenize(template.render([{"role": "user", "content": q}]), add_bos=False)
            for q in prompts]


def _end_tokens(engine, model_path: Path) -> list[int]:
    if engine is not None:
        return sorted(engine.end_tokens)
    from llmserve.engines.llamacpp import LlamaCppEngine

    probe = LlamaCppEngine(model_path, context_length=64, max_sequences=1)
    try:
        return sorted(probe.end_tokens)
    finally:
        probe.close()
