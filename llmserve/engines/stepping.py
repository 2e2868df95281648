"""What every step-loop engine shares: the decode loop itself (inbox, admission, cancels,
one step, one delivery), the rule for when a sequence ends, and the facts the serving core
reads.

The loop (`serve`) runs in one thread that owns the model and hands each step's results to
a `Delivery` callback in one call. Where that goes is the caller's business: to the event
loop of this process (`start`/`generate`, used by tests and the benchmark's in-process
baseline), or over a pipe to the server process (`engines.worker`).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import itertools
import logging
import queue
import threading
from collections import deque
from collections.abc import AsyncIterator, Callable, Hashable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any

from llmserve.engines.base import (
    EngineError,
    EngineFacts,
    EngineHealth,
    EngineInfo,
    FinishReason,
    SamplingParams,
    SpecCounter,
    SpecDecodeStats,
    TokenOutput,
    check_request,
)
from llmserve.engines.faults import Faults
from llmserve.engines.grammar import Grammars

log = logging.getLogger(__name__)

Inbox = queue.SimpleQueue
# What one step hands out, per request: its new tokens, or its end (None: finished, or the
# error that failed it).
Payload = list[TokenOutput] | BaseException | None
Delivery = Callable[[list[tuple[Hashable, Payload]]], None]


class EngineRequest:
    """One request inside the decode loop (decode-thread state only)."""

    __slots__ = ("key", "prompt", "params", "adapter", "sequences", "prefilled", "cancelled",
                 "cancel_all", "error", "matchers")

    def __init__(self, key: Hashable, prompt: list[int], params: list[SamplingParams],
                 adapter: str | None = None) -> None:
        self.key = key
        self.prompt = prompt
        self.params = params
        self.adapter = adapter  # its LoRA adapter's name; None: the base model
        self.sequences: list[Any] = []
        self.prefilled = 0
        self.cancelled: set[int] = set()
        self.cancel_all = False
        self.error: BaseException | None = None
        # per choice: its grammar's matcher (engines.grammar), None when unconstrained
        self.matchers: list[Any] = [None] * len(params)

    def fail(self, exc: BaseException) -> None:
        """A failure that is this request's alone: it leaves at the start of the next step,
        with `exc`, and the others go on."""
        if self.error is None:
            self.error = EngineError(f"{type(exc).__name__}: {exc}")
        self.cancel_all = True


def finish_reason(
    params: SamplingParams, *, generated: int, end_of_generation: bool, room_left: int
) -> FinishReason | None:
    """Why a sequence ends after its latest token, if it does; `room_left` is the
    context positions still free after that token."""
    if end_of_generation:
        return "stop"
    if generated >= params.max_tokens or room_left <= 0:
        return "length"
    return None


@dataclass
class StepOutputs:
    by_request: dict[EngineRequest, list[TokenOutput]] = field(default_factory=dict)
    ended: list[EngineRequest] = field(default_factory=list)

    def add(self, request: EngineRequest, output: TokenOutput) -> None:
        self.by_request.setdefault(request, []).append(output)

    def end(self, request: EngineRequest, error: BaseException | None = None) -> None:
        """The request is done: finished, or failed with `error` (or its own `error`)."""
        if error is not None and request.error is None:
            request.error = error
        self.ended.append(request)

    def items(self) -> list[tuple[Hashable, Payload]]:
        return [
            *((r.key, outputs) for r, outputs in self.by_request.items()),
            *((r.key, r.error) for r in self.ended),
        ]


class StepLoopEngine(EngineFacts):
    """The part of an engine that is the same for every backend.

    A subclass loads its model, sets the `_`-fields below in `__init__`, calls
    `_init_loop()` (which makes `info` of them), and fills in the model's side of a step: `_apply_cancels`, `_admit`,
    `_step`, `_running` and `_reset`. Requests waiting for room are `self._waiting`;
    requests whose prompt is being read are `self._prefilling`.
    """

    thread_name = "decode"

    _context_length: int
    _max_sequences: int
    _prefill_chunk: int
    _n_vocab: int
    _end_tokens: frozenset[int]
    _token_bytes: list[bytes]
    _chat_template: str | None
    _bos_token: str
    _eos_token: str
    _add_bos: bool
    _grammars: Grammars | None = None  # None: this engine takes no grammar
    _spec: SpecCounter | None = None  # set by an engine that speculates
    # LoRA adapters: None where loaded, else why not (an engine that loads them sets its own)
    _adapters: Mapping[str, str | None] = MappingProxyType({})

    def _init_loop(self) -> None:
        self.info = EngineInfo(
            context_length=self._context_length, max_sequences=self._max_sequences,
            vocab_size=self._n_vocab, end_tokens=self._end_tokens,
            token_bytes=self._token_bytes, chat_template=self._chat_template,
            bos_token=self._bos_token, eos_token=self._eos_token, add_bos=self._add_bos,
            adapters=dict(self._adapters),
        )
        self._inbox: Inbox = Inbox()
        self._waiting: deque[EngineRequest] = deque()
        self._prefilling: deque[EngineRequest] = deque()
        self._live: dict[Hashable, EngineRequest] = {}
        # requests whose grammars are being compiled, not in the inbox yet (any thread)
        self._compiling: dict[Hashable, EngineRequest] = {}
        self._compiling_lock = threading.Lock()
        self._compiler: concurrent.futures.ThreadPoolExecutor | None = None
        self.faults = Faults()
        # in-process use (start/generate)
        self._thread: threading.Thread | None = None
        self._streams: dict[Hashable, QueueStream] = {}
        self._keys = itertools.count()
        self._dead: EngineError | None = None
        self._closed = False
        # adapters unloaded while requests taken under them still run: freed after the last
        self._retiring: set[str] = set()

    # -- the decode loop, from any thread ----------------------------------------------------

    def submit(self, key: Hashable, prompt: list[int], params: list[SamplingParams],
               *, adapter: str | None = None, compile_later: bool = False) -> None:
        """Hand a request to the decode loop; ValueError for one it cannot take. Its grammars
        are compiled here (a bad one raises GrammarError, a ValueError), off the decode thread,
        or with `compile_later` on a thread of their own: then a bad grammar fails the request
        (its end is that error), and the caller (a child's pipe reader) goes on meanwhile."""
        check_request(prompt, params, max_sequences=self._max_sequences,
                      context_length=self._context_length, adapter=adapter,
                      adapters=self._adapters)
        req = EngineRequest(key, list(prompt), list(params), adapter)
        if any(p.grammar is not None for p in params):
            if self._grammars is None:
                raise ValueError("this engine does not support grammars")
            if not compile_later:
                req.matchers = self._grammars.matchers(params)
                self._inbox.put(("add", req))
                return
            with self._compiling_lock:
                self._compiling[key] = req
                if self._compiler is None:
                    self._compiler = concurrent.futures.ThreadPoolExecutor(
                        2, thread_name_prefix="grammar")
            self._compiler.submit(self._compile, req)
            return
        self._inbox.put(("add", req))

    def _compile(self, req: EngineRequest) -> None:
        try:
            matchers = self._grammars.matchers(req.params)  # type: ignore[union-attr]
        except Exception as exc:  # noqa: BLE001 - that request fails (GrammarError: its grammar)
            req.error = EngineError(str(exc))
            req.cancel_all = True
        else:
            req.matchers = matchers
        with self._compiling_lock:  # after any cancel that found it compiling
            self._compiling.pop(req.key, None)
            self._inbox.put(("add", req))

    def cancel(self, key: Hashable, index: int | None = None) -> None:
        with self._compiling_lock:
            req = self._compiling.get(key)
            if req is not None:  # taken when it reaches the loop, already cancelled
                if index is None:
                    req.cancel_all = True
                else:
                    req.cancelled.add(index)
                return
            self._inbox.put(("cancel", key, index))

    def between_steps(self, fn: Callable[[], None]) -> None:
        """Run `fn` on the decode thread before its next step (at once when idle): what it
        does there shows the loop advances (the server's watchdog pings this way)."""
        self._inbox.put(("call", fn))

    def shutdown(self) -> None:
        """Ask `serve` to return after the step under way."""
        self._inbox.put(("stop",))

    def live_keys(self) -> list[Hashable]:
        """Requests the loop holds (for failing them all when the loop itself fails)."""
        return list(self._live)

    def serve(self, deliver: Delivery) -> None:
        """Run the decode loop in this thread until `shutdown()`. An exception escapes with
        every request still live: the caller fails them (see `live_keys`)."""
        try:
            while True:
                if not self._drain_inbox(block=not (self._waiting or self._busy())):
                    return
                out = StepOutputs()
                for req in [r for r in self._waiting if self._all_cancelled(r)]:
                    self._waiting.remove(req)
                    out.end(req)
                self._apply_cancels(out)
                self._admit()
                if self._busy():
                    self._step(out)
                    self.faults.after_step()
                if out.by_request or out.ended:
                    for req in out.ended:
                        self._live.pop(req.key, None)
                    deliver(out.items())
                if self._retiring:
                    self._free_retired()
        finally:
            with self._compiling_lock:
                compiler, self._compiler = self._compiler, None
            if compiler is not None:
                compiler.shutdown(wait=False, cancel_futures=True)
            self._reset()

    def _drain_inbox(self, block: bool) -> bool:
        """Take new requests and cancellations; False once asked to stop. Blocks only when
        `block` (the engine is idle) and only for the first message."""
        while True:
            try:
                msg = self._inbox.get(block=block)
            except queue.Empty:
                return True
            block = False
            kind = msg[0]
            if kind == "stop":
                return False
            if kind == "add":
                req = msg[1]
                self._live[req.key] = req
                self._waiting.append(req)
                if req.adapter is not None and req.adapter not in self._adapters:
                    # unloaded between its submit and now: it ends at once, saying so
                    req.error = EngineError(f"the LoRA adapter '{req.adapter}' was unloaded")
                    req.cancel_all = True
            elif kind == "call":
                msg[1]()
            elif kind == "cancel":
                _, key, index = msg
                req = self._live.get(key)
                if req is None:
                    continue  # ended already
                if index is None:
                    req.cancel_all = True
                else:
                    req.cancelled.add(index)

    @staticmethod
    def _all_cancelled(req: EngineRequest) -> bool:
        return req.cancel_all or len(req.cancelled) >= len(req.params)

    def _busy(self) -> bool:
        return bool(self._prefilling) or self._running()

    def _prefill_budget(self, decoding: bool, most: int) -> int:
        """Prompt tokens to read this step, `most` at the very most. While streams decode, up
        to `prefill_chunk` for each prompt waiting: one long prompt comes in pieces small enough
        to keep the streams flowing, and a burst of prompts is read about as fast as with none
        decoding (as llama-server and vLLM read them), not one piece a step."""
        if not decoding:
            return most
        return min(most, self._prefill_chunk * len(self._prefilling))

    # -- LoRA adapters while serving: on the decode thread, between two steps ----------------

    def load_adapter_now(self, name: str, path: str, scale: float) -> str | None:
        """Load a LoRA adapter and serve it from the next step on: None, or why not (then
        nothing is added). Call it on the decode thread (`between_steps`) once it runs."""
        if name in self._adapters:
            return f"a LoRA adapter named '{name}' is loaded already"
        if name in self._retiring:
            return f"the LoRA adapter '{name}' was unloaded and still finishes its requests"
        error = self._load_adapter(name, Path(path), scale)
        if error is None:
            self._adapters[name] = None  # type: ignore[index]  # a loading engine's own dict
            self.info.adapters[name] = None
        return error

    def unload_adapter_now(self, name: str) -> bool:
        """Refuse requests for `name` from now on; those already taken finish under it, and
        it is freed after the last. False: no such adapter. On the decode thread as above."""
        if name not in self._adapters:
            return False
        loaded = self._adapters[name] is None
        del self._adapters[name]  # type: ignore[attr-defined]
        self.info.adapters.pop(name, None)
        if loaded:
            self._retiring.add(name)
            self._free_retired()
        return True

    def _free_retired(self) -> None:
        in_use = {r.adapter for r in self._live.values()}
        with self._compiling_lock:
            in_use.update(r.adapter for r in self._compiling.values())
        for name in self._retiring - in_use:
            self._retiring.discard(name)
            self._free_adapter(name)

    def _load_adapter(self, name: str, path: Path, scale: float) -> str | None:
        """Load one LoRA adapter into the model: None, or why it cannot be used."""
        return "this engine does not load LoRA adapters"

    def _free_adapter(self, name: str) -> None:
        """Free a loaded adapter no request uses any more (and any cache computed under it)."""

    async def load_adapter(self, name: str, path: str, scale: float = 1.0) -> None:
        """`load_adapter_now` between two steps; EngineError with the reason if it fails."""
        error = await self._between_steps(lambda: self.load_adapter_now(name, path, scale))
        if error is not None:
            raise EngineError(error)

    async def unload_adapter(self, name: str) -> bool:
        return await self._between_steps(lambda: self.unload_adapter_now(name))

    async def _between_steps(self, fn: Callable[[], Any]) -> Any:
        if self._thread is None:  # not serving: nothing else touches the model
            return fn()
        done: concurrent.futures.Future = concurrent.futures.Future()

        def call() -> None:
            try:
                done.set_result(fn())
            except BaseException as exc:  # noqa: BLE001 - the caller's to raise
                done.set_exception(exc)

        self.between_steps(call)
        return await asyncio.wrap_future(done)

    # -- the model's side of a step ------------------------------------------------------------

    def _running(self) -> bool:
        """Whether any sequence is decoding."""
        raise NotImplementedError

    def _apply_cancels(self, out: StepOutputs) -> None:
        """Drop cancelled (or failed) sequences of prefilling and running requests."""
        raise NotImplementedError

    def _admit(self) -> None:
        """Move waiting requests that fit into prefilling, first come first served."""
        raise NotImplementedError

    def _step(self, out: StepOutputs) -> None:
        """One forward pass: the next token of every running sequence, a piece of prompt."""
        raise NotImplementedError

    def _reset(self) -> None:
        """The loop is over: free every sequence's resources."""
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError

    # -- in this process: a decode thread and the event loop ----------------------------------

    async def start(self) -> None:
        if self._thread is not None:
            return
        if self._closed:
            raise EngineError("engine closed")
        loop = asyncio.get_running_loop()

        def deliver(items: list[tuple[Hashable, Payload]]) -> None:
            loop.call_soon_threadsafe(route, self._streams, items)

        self._thread = threading.Thread(
            target=self._serve_thread, args=(deliver,), name=self.thread_name, daemon=True
        )
        self._thread.start()

    def _serve_thread(self, deliver: Delivery) -> None:
        try:
            self.serve(deliver)
        except BaseException as exc:  # noqa: BLE001 - a dead loop must fail every request
            log.exception("decode loop crashed")
            self._dead = EngineError(f"decode loop crashed: {type(exc).__name__}: {exc}")
            keys = set(self.live_keys())
            with self._compiling_lock:
                keys.update(self._compiling)
            while True:  # and those not taken from the inbox yet
                try:
                    msg = self._inbox.get_nowait()
                except queue.Empty:
                    break
                if msg[0] == "add":
                    keys.add(msg[1].key)
            deliver([(k, self._dead) for k in keys])

    async def suspend(self) -> None:
        """Stop serving after the step under way, keeping the model and its cache: `start`
        serves again, on a new thread. For engines in one process taking turns (the bench):
        each thread that decodes keeps an OpenMP pool of its own while it lives, and libgomp
        throttles every pool's spinning once it manages more threads than there are CPUs."""
        if self._thread is not None:
            self.shutdown()
            await asyncio.to_thread(self._thread.join)
            self._thread = None

    async def stop(self) -> None:
        await self.suspend()
        self.close()

    def spec_decode_stats(self) -> SpecDecodeStats | None:
        return self._spec.snapshot() if self._spec is not None else None

    def health(self) -> EngineHealth:
        if self._dead is not None:
            return EngineHealth("failed", str(self._dead))
        return EngineHealth("running" if self._thread is not None else "stopped")

    def generate(
        self, prompt: list[int], params: list[SamplingParams], *, request_id: str | None = None,
        adapter: str | None = None,
    ) -> QueueStream:
        if self._dead is not None:
            raise self._dead
        if self._thread is None:
            raise EngineError("engine not started")
        key = next(self._keys)
        self.submit(key, prompt, params, adapter=adapter)
        stream = self._streams[key] = QueueStream(key, self.cancel, request_id)
        return stream


class QueueStream:
    """The `GenerationStream` of one request, fed by `route`: lists of tokens, then None
    (finished) or the error that failed it. `cancel(key, index)` reaches the engine."""

    def __init__(
        self,
        key: Hashable,
        cancel: Callable[[Hashable, int | None], None],
        request_id: str | None = None,
    ) -> None:
        self.key = key
        self.request_id = request_id
        self._cancel = cancel
        self.queue: asyncio.Queue[Payload] = asyncio.Queue()

    def cancel(self, index: int | None = None) -> None:
        self._cancel(self.key, index)

    async def __aiter__(self) -> AsyncIterator[list[TokenOutput]]:
        try:
            while True:
                item = await self.queue.get()
                if item is None:
                    return
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            # The consumer left (done, error or disconnect): free whatever still runs.
            self.cancel()


def route(streams: dict[Hashable, QueueStream], items: list[tuple[Hashable, Payload]]) -> None:
    """Hand one step's payloads to their streams; an ended request's stream is dropped."""
    for key, payload in items:
        stream = streams.get(key) if isinstance(payload, list) else streams.pop(key, None)
        if stream is not None:
            stream.queue.put_nowait(payload)
