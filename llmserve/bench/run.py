"""`llmserve bench`: a concurrency sweep of streamed chat requests against llmserve, with
baselines measured in the same run, level by level so that machine drift cancels: the same
engine in-process with no HTTP (the limit), the engine's own OpenAI server on the same model
(llama.cpp's `llama-server` and llama-cpp-python's for llama.cpp, `vllm serve` for vLLM), and
for the transformers engine Hugging Face `model.generate` on static batches of the same
prompts. Every system meets its measured prompts in the same cache state, cold or warm
(`run_block`), on a workload of open questions or of texts to copy from (`workloads.py`), with
llmserve's speculative decoding off or on."""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import importlib.util
import json
import os
import platform
import socket
import subprocess
import sys
import time
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import AbstractAsyncContextManager, ExitStack, asynccontextmanager, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import httpx

from llmserve.bench.load import (
    StreamClient,
    Timing,
    chat_body,
    engine_stream,
    metric_totals,
    run_level,
)
from llmserve.bench.report import LevelResult, ratios, summarize, table
from llmserve.bench.workloads import (
    CACHE_MODES,
    PROBE,
    WORKLOADS,
    Messages,
    PromptMaker,
    workload_prompts,
)

if TYPE_CHECKING:
    from llmserve.config import Settings

T = TypeVar("T")

LLMSERVE = "llmserve"
LIMIT = "in-process"
LCP = "llama-cpp-python"
LLAMA_SERVER = "llama-server"
VLLM = "vllm serve"
SPECULATIVE = ("off", "ngram")  # llmserve's --speculative
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
    return workload_prompts("free")


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
class SpecCounts:
    """Speculative decoding's counters of a system so far."""

    draft_tokens: int
    accepted_tokens: int


SPEC_METRICS = ("llmserve:spec_decode_num_draft_tokens_total",
                "llmserve:spec_decode_num_accepted_tokens_total")

Stream = Callable[[Any, int], Awaitable[Timing]]  # one prepared request, its max_tokens


class System(ABC):
    """Something measured: a row's name, how its requests are sent, what it spent."""

    name: str
    engine_apart = False  # the engine runs in child processes: the top one is the API

    def prepare(self, conversations: list[Messages]) -> list[Any]:
        """The requests as `connect`'s stream takes them, made before any timing."""
        return conversations

    @abstractmethod
    def connect(self, concurrency: int) -> AbstractAsyncContextManager[Stream]: ...

    def cpu_s(self) -> tuple[float | None, float | None]:
        """CPU seconds so far: the whole system's, and its API process's alone."""
        return None, None

    def peak_rss_mb(self) -> float | None:
        return None

    async def spec_counts(self) -> SpecCounts | None:
        return None


@dataclass
class HttpSystem(System):
    """A system over HTTP: its server, the body fields it gets."""

    name: str
    url: str
    model: str
    extra: dict
    proc: Proc | None
    engine_apart: bool = True
    spec_metrics: bool = False  # llmserve's /metrics counts speculative decoding

    @asynccontextmanager
    async def connect(self, concurrency: int) -> AsyncIterator[Stream]:
        client = StreamClient(self.url)
        yield lambda conversation, max_tokens: client.stream(
            chat_body(self.model, conversation, max_tokens, self.extra))

    def cpu_s(self) -> tuple[float | None, float | None]:
        if self.proc is None:
            return None, None
        return self.proc.cpu_s(), self.proc.cpu_s(tree=False) if self.engine_apart else None

    def peak_rss_mb(self) -> float | None:
        return self.proc.peak_rss_mb() if self.proc is not None else None

    async def spec_counts(self) -> SpecCounts | None:
        if not self.spec_metrics:
            return None
        try:
            async with httpx.AsyncClient(base_url=self.url, timeout=30) as client:
                text = (await client.get("/metrics")).text
        except httpx.HTTPError:
            return None
        found = metric_totals(text, SPEC_METRICS)
        if len(found) < len(SPEC_METRICS):
            return None  # not speculating
        return SpecCounts(*(int(found[n]) for n in SPEC_METRICS))


@dataclass
class EngineSystem(System):
    """The engine driven in this process: no HTTP, no text handling. Taking `turns` with
    other engines in this process, it decodes only during its own blocks (see `load_apart`)."""

    name: str
    engine: Any  # Engine
    template: Any  # ChatTemplate
    turns: bool = False

    def prepare(self, conversations: list[Messages]) -> list[list[int]]:
        return [self.engine.tokenize(self.template.render(c), add_bos=False)
                for c in conversations]

    @asynccontextmanager
    async def connect(self, concurrency: int) -> AsyncIterator[Stream]:
        if self.turns:
            await self.engine.start()
        try:
            yield lambda prompt, max_tokens: engine_stream(self.engine, prompt, max_tokens)
        finally:
            if self.turns:
                await self.engine.suspend()

    def cpu_s(self) -> tuple[float | None, float | None]:
        return time.process_time(), None

    async def spec_counts(self) -> SpecCounts | None:
        stats = self.engine.spec_decode_stats()
        return SpecCounts(stats.draft_tokens, stats.accepted_tokens) if stats else None


@dataclass
class _Run:
    """One block of requests against a system: what `summarize` needs, and what the system
    spent on it."""

    timings: list[Timing]
    wall: float
    cpu_s: float | None
    api_cpu_s: float | None
    peak_rss_mb: float | None
    spec: SpecCounts | None = None  # drafted and accepted during the block


def _delta(a: float | None, b: float | None) -> float | None:
    return b - a if a is not None and b is not None else None


async def run_block(system: System, conversations: list[Messages], probe: Messages,
                    concurrency: int, max_tokens: int, *, warm: bool) -> _Run:
    """`conversations` sent to `system`, `concurrency` at a time, timed. First one short
    request of its own (`probe`, new to every cache: connections open, nothing measured),
    then, when `warm`, every one of `conversations` once for a single token, untimed: the
    measured requests then find their prompts in whatever cache the system keeps, as they
    would for a client sending them again. Cold, they are new to it."""
    requests = system.prepare(conversations)
    (first,) = system.prepare([probe])
    async with system.connect(concurrency) as stream:
        await stream(first, 4)
        if warm:
            await run_level(lambda i: stream(requests[i], 1), concurrency, len(requests))
        spec0 = await system.spec_counts()
        cpu0, api0 = system.cpu_s()
        timings, wall = await run_level(lambda i: stream(requests[i], max_tokens),
                                        concurrency, len(requests))
        cpu1, api1 = system.cpu_s()
        spec1 = await system.spec_counts()
    spec = (SpecCounts(spec1.draft_tokens - spec0.draft_tokens,
                       spec1.accepted_tokens - spec0.accepted_tokens)
            if spec0 is not None and spec1 is not None else None)
    return _Run(timings, wall, _delta(cpu0, cpu1), _delta(api0, api1), system.peak_rss_mb(),
                spec)


def _result(name: str, conc: int, runs: list[_Run], workload: str, cache: str) -> LevelResult:
    """One row of several blocks of the same system: their requests over their summed time."""
    result = summarize(name, conc, [t for r in runs for t in r.timings], sum(r.wall for r in runs))
    result.workload, result.cache = workload, cache
    cpus = [r.cpu_s for r in runs]
    result.cpu_s = None if None in cpus else sum(cpus)  # type: ignore[arg-type]
    api = [r.api_cpu_s for r in runs]
    result.api_cpu_s = None if None in api else sum(api)  # type: ignore[arg-type]
    result.peak_rss_mb = max((r.peak_rss_mb for r in runs if r.peak_rss_mb is not None), default=None)
    specs = [r.spec for r in runs]
    if specs and None not in specs:
        result.spec_draft_tokens = sum(s.draft_tokens for s in specs)  # type: ignore[union-attr]
        result.spec_accepted_tokens = sum(s.accepted_tokens for s in specs)  # type: ignore[union-attr]
    return result


async def measure_interleaved(
    systems: list[System], maker: PromptMaker, prompts: list[str], conc: int, requests: int,
    max_tokens: int, *, workload: str, cache: str, rounds: int = 1, lead_in: bool = True,
) -> list[LevelResult]:
    """Every system in `2 * rounds` blocks (the requests split evenly, at least one per
    stream), in the order A, B, ..., ..., B, A (`rounds` times), after (`lead_in`) one
    unmeasured block of the first. The machine's speed drifts by a third within a minute
    here, and runs just after a quiet spell (a server's start) are faster: the lead-in block
    and this order keep both out of the ratios; more rounds average out what drifts faster
    than a block. Every block asks the same questions in new conversations (`maker`), cold
    or warm (`run_block`), so no system's cache holds more of them than another's."""
    block = max(conc, -(-requests // (2 * rounds)))
    if lead_in:
        await run_block(systems[0], maker.block(prompts, conc), maker.conversation(PROBE),
                        conc, max_tokens, warm=False)
    runs: dict[str, list[_Run]] = {s.name: [] for s in systems}
    for s in (systems + systems[::-1]) * rounds:
        runs[s.name].append(await run_block(
            s, maker.block(prompts, block), maker.conversation(PROBE), conc, max_tokens,
            warm=cache == "warm"))
    return [_result(s.name, conc, runs[s.name], workload, cache) for s in systems]


def _speculative_modes(text: str) -> list[str]:
    modes = [m.strip() for m in text.split(",") if m.strip()]
    if not modes or any(m not in SPECULATIVE for m in modes) or len(set(modes)) < len(modes):
        raise argparse.ArgumentTypeError(f"modes among {', '.join(SPECULATIVE)}, comma-separated")
    return modes


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="llmserve bench", description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="examples:\n"
               "  llmserve bench                          # the bundled model, 1 to 64 streams\n"
               "  llmserve bench --levels 1,8 --max-tokens 64 --no-llama-server\n"
               "  llmserve bench --url http://127.0.0.1:8000 --served-model-name my-model\n"
               "  llmserve bench --plot-from benchmarks/results/bench.json --plot bench.png")
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
                   help="A,B,..,B,A rounds of the systems; the requests split among them")
    p.add_argument("--cache", default="both", choices=["cold", "warm", "both"],
                   help="what every system's cache holds of the measured prompts: nothing "
                        "(cold: each request opens with a nonce never sent before), or each "
                        "of them (warm: the block's requests sent once, untimed, just "
                        "before); both (default) measures each, as rows of their own")
    p.add_argument("--workload", default="free", choices=["free", "grounded", "both"],
                   help="free: open questions (default); grounded: rewrite, copy-edit or "
                        "extract from a text in the prompt, the answer mostly copied from it")
    p.add_argument("--speculative", default="off", type=_speculative_modes,
                   help="llmserve's --speculative, one server each: off (default), ngram, "
                        "or off,ngram to measure both in the same run (llama.cpp engine); "
                        "the in-process engine likewise")
    p.add_argument("--seed", type=int,
                   help="seed of the conversations' nonces (default: random, so that a "
                        "server given by --url has seen none of them)")
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
    p.add_argument("--plot", metavar="PNG",
                   help="also draw tok/s, TTFT and ITL against concurrency, one colour per "
                        "system, into this image (needs matplotlib: the bench extra)")
    p.add_argument("--plot-from", metavar="JSON",
                   help="run nothing: draw --plot (default: beside it, .png) from a JSON "
                        "file an earlier run wrote")
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
    if args.plot_from or args.plot:
        from llmserve.bench.plot import PlotUnavailable, require_matplotlib

        try:
            require_matplotlib()  # known now, not after the run
        except PlotUnavailable as exc:
            p.error(str(exc))
    if args.plot_from:
        return _plot_from(Path(args.plot_from), Path(args.plot) if args.plot else None)
    if args.url and len(args.speculative) > 1:
        p.error("--speculative with several modes: needs servers the bench starts, not --url")
    # uvloop where there is one, as llmserve's server runs: the load generator shares the
    # machine with what it measures (0.11 ms of CPU a streamed token against 0.20 with
    # asyncio's own loop), and the in-process engine meets the loop the server gives it.
    try:
        from uvloop import run
    except ImportError:
        run = asyncio.run
    return run(_soak(args) if args.soak else _main(args))


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
    workloads = list(WORKLOADS) if args.workload == "both" else [args.workload]
    caches = list(CACHE_MODES) if args.cache == "both" else [args.cache]
    modes: list[str] = args.speculative
    maker = PromptMaker(args.seed)
    logs = Path(args.logs)
    logs.mkdir(parents=True, exist_ok=True)
    # Every stream of the highest level gets a sequence of its own, in every server.
    max_seq = max(levels)
    engine_kind = args.engine
    if engine_kind == "auto":
        engine_kind = "transformers" if model_path.is_dir() else "llamacpp"
    if engine_kind != "llamacpp" and modes != ["off"]:
        print(f"--speculative {','.join(modes)}: for the llama.cpp engine only",
              file=sys.stderr)
        return 2
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
    engines: dict[str, Any] = {}  # the in-process engine, by speculative mode
    results: list[LevelResult] = []
    from llmserve.config import Settings

    # What our server runs with (same flags, same LLMSERVE_* environment and .env), for the
    # in-process engine and llama-server's configuration.
    settings = (Settings(engine=engine_kind, context_length=args.context_length,
                         max_sequences=max_seq, threads=args.threads)
                if llama_server is not None or not args.no_limit else None)
    with ExitStack() as stack:
        ours: dict[str, tuple[str, Proc | None]] = {}  # llmserve's URL and process, by mode
        if args.url:
            ours[modes[0]] = args.url.rstrip("/"), None
            model = args.served_model_name or served_name_for(model_path)
        else:
            for mode in modes:
                proc = stack.enter_context(start_process(
                    [sys.executable, "-m", "llmserve.cli", "serve", "--port", "{port}",
                     "--model", str(model_path), "--engine", engine_kind,
                     "--embedding-model", "none", "--store", "none",
                     "--max-sequences", str(max_seq), "--context-length", str(args.context_length),
                     "--threads", str(args.threads), "--speculative", mode,
                     "--log-level", "warning"],
                    "/health", logs / f"{_named('llmserve', mode).replace(' ', '-')}.log"))
                ours[mode] = proc.url, proc
            model = served_name_for(model_path)
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
        # Several in-process engines take turns (one OpenMP pool at a time); one serves throughout.
        turns = len(modes) > 1
        if settings is not None and not args.no_limit:
            from llmserve.models import load_engine

            for mode in modes:
                engine = load_apart(lambda mode=mode: load_engine(
                    settings.model_copy(update={"speculative": mode}), model_path,
                    show_progress=False))
                if not turns:
                    await engine.start()
                engines[mode] = engine
        first_engine = next(iter(engines.values()), None)
        # llama-cpp-python knows no ignore_eos: a -100 bias on end tokens keeps lengths equal.
        lcp_extra = (
            {"logit_bias": {str(t): -100 for t in _end_tokens(first_engine, model_path)}}
            if lcp_proc is not None else {}
        )
        ours_extra = {"ignore_eos": True, "stream_options": {"include_usage": True}}
        systems: list[System] = []
        for mode, (url, proc) in ours.items():
            systems.append(HttpSystem(_named(LLMSERVE, mode), url, model, ours_extra, proc,
                                      spec_metrics=True))
            if not args.no_constrained and mode == modes[0]:
                systems.append(HttpSystem(CONSTRAINED, url, model,
                                          {**ours_extra, "response_format": NOTES_FORMAT}, proc))
        if vllm_proc is not None:  # it takes ignore_eos too: the same bodies
            systems.append(HttpSystem(VLLM, vllm_proc.url, model, ours_extra, vllm_proc))
        if ls_proc is not None:  # ignore_eos and include_usage too
            systems.append(HttpSystem(LLAMA_SERVER, ls_proc.url, model, ours_extra, ls_proc,
                                      engine_apart=False))
        if lcp_proc is not None:
            systems.append(HttpSystem(LCP, lcp_proc.url, model, lcp_extra, lcp_proc,
                                      engine_apart=False))
        for mode, engine in engines.items():
            systems.append(EngineSystem(_named(LIMIT, mode), engine, _template(engine),
                                        turns=turns))
        try:
            for conc in levels:
                n_req = args.requests or max(4, conc)
                print(f"-- concurrency {conc}: {n_req} requests x {args.max_tokens} tokens",
                      file=sys.stderr, flush=True)
                level: list[LevelResult] = []
                for workload in workloads:
                    prompts = workload_prompts(workload)
                    for cache in caches:
                        level += await measure_interleaved(
                            systems, maker, prompts, conc, n_req, args.max_tokens,
                            workload=workload, cache=cache, rounds=args.rounds,
                            lead_in=not level)
                        if hf is not None:  # no cache kept between batches: warm is cold
                            row = hf.measure(_token_prompts(hf, maker.block(prompts, n_req)),
                                             conc, n_req, args.max_tokens)
                            row.workload, row.cache = workload, cache
                            level.append(row)
                print(table(level), file=sys.stderr, flush=True)
                results += level
        finally:
            for engine in engines.values():
                await engine.stop()

    ratio_text, ratio_rows = "", []
    hf_name = [hf.system] if hf is not None else []
    for mode in ours:
        baselines = [b for b in (_named(LIMIT, mode), LLAMA_SERVER, LCP, VLLM, *hf_name)
                     if any(r.system == b for r in results)]
        text, rows = ratios(results, _named(LLMSERVE, mode), baselines)
        ratio_text, ratio_rows = ratio_text + text + "\n", ratio_rows + rows
    if hf is not None and engines:  # the engine alone against plain generate
        text, _ = ratios(results, LIMIT, hf_name)
        ratio_text += text + "\n"
    speculative_rows: list[dict] = []
    if len(modes) > 1:  # speculation on against off, over HTTP and in-process
        for base in (LLMSERVE, LIMIT):
            for mode in modes[1:]:
                text, rows = ratios(results, _named(base, mode), [_named(base, modes[0])])
                ratio_text, speculative_rows = ratio_text + text + "\n", speculative_rows + rows
    constrained_rows: list[dict] = []
    if any(r.system == CONSTRAINED for r in results):
        text, constrained_rows = ratios(results, CONSTRAINED, [_named(LLMSERVE, modes[0])])
        ratio_text += text + "\n"
    print()
    print(f"model {model_path.name}, {engine_kind} engine, {args.max_tokens} output tokens per request, greedy, "
          f"{args.threads} threads, {os.cpu_count()} cores, {platform.processor() or platform.machine()}")
    print("cache: cold = prompts no system has seen (a nonce opens each conversation); "
          "warm = each prompt sent once, untimed, just before")
    print(table(results))
    print()
    print(ratio_text.rstrip("\n"))
    out = Path(args.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({
        "model": str(model_path), "engine": engine_kind, "max_tokens": args.max_tokens, "threads": args.threads,
        "cores": os.cpu_count(), "levels": levels, "workloads": workloads, "cache": caches,
        "speculative": modes,
        "results": [r.to_json() for r in results], "ratios": ratio_rows,
        "speculative_ratios": speculative_rows, "constrained_ratios": constrained_rows,
    }, indent=1))
    print(f"\nJSON: {out}")
    if args.plot:
        _plot_from(out, Path(args.plot))
    return 1 if any(r.errors for r in results if r.system.startswith(LLMSERVE)) else 0


def _plot_from(source: Path, out: Path | None) -> int:
    from llmserve.bench.plot import save_plot, title_of

    run = json.loads(source.read_text())
    out = save_plot(run["results"], out or source.with_suffix(".png"), title_of(run))
    print(f"plot: {out}")
    return 0


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


def load_apart(load: Callable[[], T]) -> T:
    """`load()` on a thread that ends with it. An engine measuring its step costs as it loads
    (adaptive speculation) decodes there, and llama.cpp's OpenMP pool belongs to the thread
    that decodes: on this (event loop) thread it would live on beside the decode thread's, and
    with more threads than CPUs to manage libgomp throttles every pool's spinning (an engine
    beside another ran 80 tok/s against 116-123 alone)."""
    with concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="bench-load") as pool:
        return pool.submit(load).result()  # leaving the block ends the thread


def _template(model):
    """`model`'s chat template (an engine, or the hf generate baseline)."""
    from llmserve.serving.chat_template import CHATML_TEMPLATE, ChatTemplate

    return ChatTemplate(model.chat_template or CHATML_TEMPLATE,
                        bos_token=model.bos_token, eos_token=model.eos_token)


def _token_prompts(model, conversations: list[Messages]) -> list[list[int]]:
    """Each conversation in `model`'s chat template, tokenized."""
    template = _template(model)
    return [model.tokenize(template.render(c), add_bos=False) for c in conversations]


def _named(system: str, speculative: str) -> str:
    """A row's name: the system's, and its speculative decoding where it has any."""
    return system if speculative == "off" else f"{system} {speculative}"


def _end_tokens(engine, model_path: Path) -> list[int]:
    if engine is not None:
        return sorted(engine.end_tokens)
    from llmserve.engines.llamacpp import LlamaCppEngine

    probe = LlamaCppEngine(model_path, context_length=64, max_sequences=1)
    try:
        return sorted(probe.end_tokens)
    finally:
        probe.close()
