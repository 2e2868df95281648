"""Engines in child processes, seen from the server: the same `Engine` protocol, with the
model in a process of its own so that a native crash costs the requests it was serving,
never the server.

`ChildProcess` starts a worker (see `engines.worker`), writes to it on a thread of its own
(engines.outbox) and reads its messages on the event loop (engines.inbox), notices its death
(its pipe closes) or its stall (a ping its decode loop leaves unanswered), and restarts it
with backoff; `EngineProcess` and `BatchProcess` (an embedder's, a
cross-encoder's) speak their worker's messages.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import functools
import itertools
import logging
import multiprocessing
import signal
import time
from collections.abc import Callable, Hashable
from typing import Any

from llmserve.engines.base import (
    EngineDown,
    EngineError,
    EngineFacts,
    EngineHealth,
    EngineInfo,
    SamplingParams,
    SpecDecodeStats,
    check_request,
)
from llmserve.engines.inbox import Inbox
from llmserve.engines.outbox import Outbox, OutboxClosed, OutboxFull
from llmserve.engines.restarts import Crashes, RestartPolicy
from llmserve.engines.spec import BatchSpec, CrossEncoderSpec, EmbedderSpec, EngineSpec
from llmserve.engines.stepping import QueueStream, route
from llmserve.engines.worker import batch_main, decode, engine_main

log = logging.getLogger(__name__)

# A fresh interpreter: forking a process that runs threads (the event loop's, the
# writers') can copy a held lock into the child.
_MP = multiprocessing.get_context("spawn")

# Bytes of requests a child may leave unread before new ones are refused (503): far more
# than a full batch of requests takes; a child this far behind is stuck, and its stall is
# noticed (the watchdog) soon after.
OUTBOX_LIMIT = 64 * 1024 * 1024


def describe_exit(code: int | None) -> str:
    if code is None:
        return "did not exit"
    if code < 0:
        try:
            return f"was killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"was killed by signal {-code}"
    return f"exited with code {code}"


class ChildProcess:
    """One worker process, watched and restarted.

    `on_message(msg)` and `on_lost(reason)` run on the event loop; `on_lost` is called once
    per death, before any restart.

    The watchdog pings the child every second or so; its decode loop answers between two
    steps (at once when idle). A ping unanswered for `policy.stall_timeout` seconds means
    the child is stopped, hung, or stuck in one step: it is `stalled`, killed (SIGKILL: a
    stopped process holds any other signal), and restarted as after a crash.
    """

    def __init__(
        self,
        name: str,
        target: Callable[..., None],
        args: Callable[[int], tuple],  # the worker's arguments for its nth start (0: first)
        *,
        on_message: Callable[[tuple], None],
        on_lost: Callable[[str], None],
        policy: RestartPolicy = RestartPolicy(),
    ) -> None:
        self.name = name
        self._target = target
        self._args = args
        self._on_message = on_message
        self._on_lost = on_lost
        self.policy = policy
        self._proc: Any = None
        self._conns: Any = None  # (from the child, to the child)
        self._inbox: Inbox | None = None
        self._outbox: Outbox | None = None
        self._fatal: str | None = None  # the traceback the current process sent as it died
        self._loop: asyncio.AbstractEventLoop | None = None
        self._state = "starting"
        self._reason: str | None = None
        self._starts = 0
        self._generation = 0  # which process the inbox's reports are about
        self._ending: asyncio.Task[None] | None = None
        self._crashes = Crashes(policy)
        self._restarter: asyncio.Task[None] | None = None
        self._watchdog: asyncio.Task[None] | None = None
        # pings of the current process: the latest sent (its time) and the latest answered
        self._asked = 0
        self._asked_at = 0.0
        self._answered = 0

    # -- starting ---------------------------------------------------------------------------

    def launch(self) -> Any:
        """Start the first process and wait until it has loaded; returns what it reported.
        A load failure raises (FileNotFoundError, EngineError): the server cannot start."""
        self._proc, self._conns, ready = self._spawn()
        return ready

    async def start(self) -> None:
        """Begin watching, from the event loop that will receive the messages."""
        self._loop = asyncio.get_running_loop()
        self._state = "running"
        self._watch()
        if self.policy.stall_timeout > 0:
            self._watchdog = self._loop.create_task(self._watch_progress())

    def _spawn(self) -> tuple[Any, tuple[Any, Any], Any]:
        # A pipe each way, not one socket pair: the loop reads its end without blocking while
        # the writer thread writes blocking, and a socket's two directions would share that
        # setting (uvloop sets it on whatever it watches).
        requests, to_child = _MP.Pipe(duplex=False)
        ours, replies = _MP.Pipe(duplex=False)
        proc = _MP.Process(target=self._target,
                           args=(requests, replies, *self._args(self._starts)),
                           name=f"llmserve-{self.name}", daemon=True)
        self._starts += 1
        try:
            proc.start()
        except BaseException:
            for conn in (requests, to_child, ours, replies):
                conn.close()
            raise
        requests.close()  # only the child holds its ends: its death closes the pipes
        replies.close()
        deadline = time.monotonic() + self.policy.load_timeout
        try:
            while time.monotonic() < deadline:
                if ours.poll(0.2):
                    msg = ours.recv()
                    if msg[0] == "ready":
                        return proc, (ours, to_child), msg[1]
                    if msg[0] == "failed":
                        _, kind, message = msg
                        raise (FileNotFoundError if kind == "FileNotFoundError" else EngineError)(message)
                elif not proc.is_alive():
                    break
            else:
                raise EngineError(f"the {self.name} process did not load within "
                                  f"{self.policy.load_timeout:g} s")
            proc.join(5)
            raise EngineError(f"the {self.name} process {describe_exit(proc.exitcode)} while loading")
        except BaseException:
            ours.close()
            to_child.close()
            _reap(proc)
            raise

    def _watch(self) -> None:
        assert self._loop is not None
        self._generation += 1
        self._asked, self._asked_at, self._answered = 0, time.monotonic(), 0
        self._fatal = None
        from_child, to_child = self._conns
        self._outbox = Outbox(to_child, name=self.name, limit=OUTBOX_LIMIT)
        self._inbox = Inbox(
            from_child, self._loop,
            on_message=functools.partial(self._received, self._generation),
            on_closed=functools.partial(self._closed, self._proc, self._generation),
        )

    # -- running ----------------------------------------------------------------------------

    @property
    def up(self) -> bool:
        return self._state == "running"

    @property
    def pid(self) -> int | None:
        alive = self._state in ("running", "stalled")
        return self._proc.pid if self._proc is not None and alive else None

    def down_error(self) -> EngineDown:
        if self._state in ("restarting", "stalled"):
            wait = self._crashes.wait()
            return EngineDown(f"The {self.name} is restarting after a crash ({self._reason}). "
                              f"Retry in {wait} s.", retry_after=wait)
        return EngineDown(f"The {self.name} is {self._state}"
                          + (f": {self._reason}." if self._reason else "."),
                          retry_after=self.policy.max_delay)

    def send(self, msg: tuple, *, bounded: bool = True) -> None:
        """Queue `msg` for the child, never waiting on it: EngineDown when it is not up, or
        (when `bounded`) when it has left too much unread."""
        if not self.up:
            raise self.down_error()
        assert self._outbox is not None
        try:
            self._outbox.put(msg, bounded=bounded)
        except OutboxFull as exc:
            raise EngineDown(f"The {self.name} is not reading its requests ({exc.queued} bytes "
                             "waiting). Retry later.", retry_after=1) from None
        except OutboxClosed:  # the pipe broke: the reader reports the death
            raise EngineDown(f"The {self.name} process is gone.") from None

    def health(self) -> EngineHealth:
        return EngineHealth(self._state, self._reason, self.pid, max(0, self._starts - 1))

    def _received(self, generation: int, msg: Any) -> None:
        if generation != self._generation:
            return
        if msg[0] == "pong":
            self._answered = max(self._answered, msg[1])
        elif msg[0] == "fatal":
            self._fatal = msg[1]
        else:
            self._on_message(msg)

    def _closed(self, proc, generation: int) -> None:
        """The child's end of the pipe closed: it is dying or dead. Reaped off the loop (it
        may take seconds), then reported, once."""
        fatal = self._fatal if generation == self._generation else None
        self._ending = asyncio.get_running_loop().create_task(
            self._reaped(proc, generation, fatal))

    async def _reaped(self, proc, generation: int, fatal: str | None) -> None:
        await asyncio.to_thread(_reap, proc, 5)
        if fatal:
            reason = f"its decode loop raised {fatal.strip().splitlines()[-1]}"
        else:
            reason = f"its process (pid {proc.pid}) {describe_exit(proc.exitcode)}"
        self._died(generation, reason, fatal)

    def _died(self, generation: int, reason: str, fatal: str | None) -> None:
        if generation != self._generation or self._state in ("stopped", "failed"):
            return
        if self._state == "stalled":  # killed by the watchdog: say why, not how
            reason = self._reason or reason
        assert self._outbox is not None
        self._outbox.close()
        self._crashed(reason, fatal)

    async def _watch_progress(self) -> None:
        """The watchdog: a ping at a time, and a child that leaves one unanswered for
        `stall_timeout` seconds is killed (its death then goes the way of any crash)."""
        timeout = self.policy.stall_timeout
        period = min(1.0, timeout / 5)
        while True:
            await asyncio.sleep(period)
            if self._state != "running":
                continue
            waited = time.monotonic() - self._asked_at
            if self._answered >= self._asked:
                if waited >= period:
                    self._asked += 1
                    self._asked_at = time.monotonic()
                    try:
                        self.send(("ping", self._asked), bounded=False)
                    except EngineDown:
                        pass  # dying: the reader reports it
            elif waited > timeout:
                self._stalled(waited)

    def _stalled(self, waited: float) -> None:
        proc = self._proc
        self._state = "stalled"
        self._reason = (f"its process (pid {proc.pid}) stalled: no progress for {waited:.0f} s; "
                        "killed")
        try:
            proc.kill()
        except OSError:
            pass  # gone already

    def _crashed(self, reason: str, detail: str | None = None) -> None:
        delay = self._crashes.record()
        if delay is None:
            self._state, self._reason = "failed", self._crashes.given_up(reason)
            next_step = "it stays down"
        else:
            self._state, self._reason = "restarting", reason
            self._restarter = asyncio.get_running_loop().create_task(self._restart(delay))
            next_step = f"restarting in {delay:g} s"
        lost = self._on_lost(reason)
        log.error("%s crashed: %s; %s; %s%s", self.name, reason, lost, next_step,
                  f"\n{detail.rstrip()}" if detail else "")

    async def _restart(self, delay: float) -> None:
        await asyncio.sleep(delay)
        try:
            proc, conns, _ = await asyncio.to_thread(self._spawn)
        except Exception as exc:  # noqa: BLE001 - a failed restart is one more crash
            if self._state == "restarting":
                self._crashed(f"restart failed: {exc}")
            return
        if self._state != "restarting":  # stopped meanwhile
            for conn in conns:
                conn.close()
            _reap(proc, timeout=0)
            return
        self._proc, self._conns = proc, conns
        self._state, self._reason = "running", None
        self._watch()
        log.warning("%s is back (pid %d)", self.name, proc.pid)

    # -- stopping ---------------------------------------------------------------------------

    async def stop(self) -> None:
        self._state = "stopped"
        for task in (self._restarter, self._watchdog, self._ending):
            if task is not None:
                task.cancel()
        # No reference cycle outlives the stop (a cancelled task's traceback holds its frame,
        # the callbacks their owner): a model unloaded on demand goes, its vocabulary with it,
        # when its last reference does, not at some later full collection.
        self._restarter = self._watchdog = self._ending = None
        self._on_message, self._on_lost = _ignore, _ignore
        proc, inbox, outbox = self._proc, self._inbox, self._outbox
        if proc is None:
            return
        if outbox is None:  # never watched: only launched
            for conn in self._conns:
                conn.close()
        else:
            try:
                outbox.put(("stop",), bounded=False)
            except OutboxClosed:
                pass
        await asyncio.to_thread(_reap, proc, 10)
        if inbox is not None:
            inbox.close()
        if outbox is not None:
            outbox.close()


def _ignore(*_: object) -> str:
    return ""


def _reap(proc, timeout: float = 0) -> None:
    """Wait for `proc` to exit, ending it if it will not; no zombie or orphan is left."""
    proc.join(timeout)
    if proc.is_alive():
        proc.terminate()
        proc.join(5)
    if proc.is_alive():
        proc.kill()
        proc.join()


class EngineProcess(EngineFacts):
    """An engine in a child process behind the `Engine` protocol. Tokenizing happens here,
    with the model's tokenizer (no weights); decoding there."""

    def __init__(self, spec: EngineSpec, *, name: str, fault: str | None = None,
                 policy: RestartPolicy = RestartPolicy()) -> None:
        self.spec = spec
        self._tokenizer = spec.tokenizer()
        self._child = ChildProcess(
            f"engine of {name}", engine_main, lambda n: (spec, fault, n == 0),
            on_message=self._on_message, on_lost=self._on_lost, policy=policy,
        )
        self.info: EngineInfo = self._child.launch()
        self._streams: dict[Hashable, QueueStream] = {}
        # the child's counters, and those of children before it (a counter never goes back)
        self._spec: SpecDecodeStats | None = None
        self._spec_before = SpecDecodeStats()
        self._keys = itertools.count()
        self._adapter_calls: dict[int, concurrent.futures.Future] = {}

    def tokenize(self, text: str, *, add_bos: bool) -> list[int]:
        return self._tokenizer.tokenize(text, add_bos=add_bos)

    def detokenize(self, ids: list[int]) -> str:
        return self._tokenizer.detokenize(ids)

    def token_strs(self, ids: list[int]) -> list[str]:
        return self._tokenizer.token_strs(ids)

    @property
    def pid(self) -> int | None:
        return self._child.pid

    def health(self) -> EngineHealth:
        return self._child.health()

    # -- lifecycle --------------------------------------------------------------------------

    async def start(self) -> None:
        await self._child.start()

    async def stop(self) -> None:
        await self._child.stop()
        self._on_lost("the server is stopping")

    # -- requests ---------------------------------------------------------------------------

    def generate(
        self, prompt: list[int], params: list[SamplingParams], *, request_id: str | None = None,
        adapter: str | None = None,
    ) -> QueueStream:
        check_request(prompt, params, max_sequences=self.max_sequences,
                      context_length=self.context_length, adapter=adapter,
                      adapters=self.adapters)
        key = next(self._keys)
        self._child.send(("add", key, list(prompt), list(params), adapter))
        stream = self._streams[key] = QueueStream(key, self._cancel, request_id)
        return stream

    def _cancel(self, key: Hashable, index: int | None) -> None:
        if key in self._streams and self._child.up:
            try:
                self._child.send(("cancel", key, index), bounded=False)
            except EngineDown:
                pass

    def spec_decode_stats(self) -> SpecDecodeStats | None:
        return self._spec_before + self._spec if self._spec is not None else None

    # -- LoRA adapters while serving ----------------------------------------------------------

    async def load_adapter(self, name: str, path: str, scale: float = 1.0) -> None:
        """Load a LoRA adapter into the running engine (EngineError with the reason if it
        cannot); it is in the spec from then on, so a restarted engine loads it too."""
        error = await self._adapter_call("load", (name, path, scale))
        if error is not None:
            raise EngineError(error)
        self.info.adapters[name] = None
        self.spec.options.setdefault("adapters", {})[name] = (path, scale)

    async def unload_adapter(self, name: str) -> bool:
        """Stop serving an adapter (requests under way finish); False if there was none."""
        self.info.adapters.pop(name, None)  # refused here from now on
        self.spec.options.get("adapters", {}).pop(name, None)
        return await self._adapter_call("unload", (name,))

    async def _adapter_call(self, op: str, args: tuple) -> Any:
        key = next(self._keys)
        done: concurrent.futures.Future = concurrent.futures.Future()
        self._adapter_calls[key] = done
        try:
            self._child.send(("adapter", key, op, args))
        except EngineDown:
            self._adapter_calls.pop(key, None)
            raise
        return await asyncio.wrap_future(done)

    def _on_message(self, msg: tuple) -> None:
        if msg[0] == "step":
            route(self._streams, [(key, decode(payload)) for key, payload in msg[1]])
        elif msg[0] == "spec" and msg[1] is not None:
            self._spec = msg[1]
        elif msg[0] == "adapter":
            done = self._adapter_calls.pop(msg[1], None)
            if done is not None:
                done.set_result(msg[2])

    def _on_lost(self, reason: str) -> str:
        calls, self._adapter_calls = self._adapter_calls, {}
        for done in calls.values():
            done.set_exception(self._child.down_error())
        if self._spec is not None:
            self._spec_before, self._spec = self._spec_before + self._spec, SpecDecodeStats()
        streams, self._streams = self._streams, {}
        err = self._child.down_error()
        for stream in streams.values():
            stream.queue.put_nowait(err)
        ids = [s.request_id or f"#{s.key}" for s in streams.values()]
        return f"requests lost: {', '.join(ids)}" if ids else "no request was running"


class BatchProcess:
    """A model that answers batches (an embedder, a cross-encoder) in a child process;
    `call` runs off the event loop and waits for the child's answer."""

    def __init__(self, spec: BatchSpec, *, name: str, what: str,
                 policy: RestartPolicy = RestartPolicy()) -> None:
        self._what = what
        self._child = ChildProcess(
            f"{what} {name}", batch_main, lambda n: (spec,),
            on_message=self._on_message, on_lost=self._on_lost, policy=policy,
        )
        self.facts: dict[str, Any] = self._child.launch()
        self._pending: dict[int, concurrent.futures.Future] = {}
        self._keys = itertools.count()

    @property
    def pid(self) -> int | None:
        return self._child.pid

    def health(self) -> EngineHealth:
        return self._child.health()

    async def start(self) -> None:
        await self._child.start()

    async def stop(self) -> None:
        await self._child.stop()
        self._on_lost("the server is stopping")

    def call(self, inputs: list[Any]) -> Any:
        key = next(self._keys)
        fut: concurrent.futures.Future = concurrent.futures.Future()
        self._pending[key] = fut
        try:
            self._child.send(("run", key, inputs))
        except EngineDown:
            self._pending.pop(key, None)
            raise
        return fut.result()

    def _on_message(self, msg: tuple) -> None:
        if msg[0] != "result":
            return
        _, key, value = msg
        fut = self._pending.pop(key, None)
        if fut is not None:
            if isinstance(value, BaseException):
                fut.set_exception(value)
            else:
                fut.set_result(value)

    def _on_lost(self, reason: str) -> str:
        pending, self._pending = self._pending, {}
        err = self._child.down_error()
        for fut in pending.values():
            fut.set_exception(err)
        return f"{len(pending)} {self._what} batches lost" if pending else "no batch was running"


class EmbedderProcess(BatchProcess):
    """A sentence embedder in a child process behind the `Embedder` protocol."""

    def __init__(self, spec: EmbedderSpec, *, name: str,
                 policy: RestartPolicy = RestartPolicy()) -> None:
        from llmserve.engines.sentence_embedder import EmbeddingTokenizer

        self._tokenizer = EmbeddingTokenizer(spec.path)
        super().__init__(spec, name=name, what="embedder", policy=policy)
        self.dimensions: int = self.facts["dimensions"]
        self.max_input_tokens: int = self.facts["max_input_tokens"]
        self.vocab_size: int = self.facts["vocab_size"]

    def tokenize(self, text: str) -> list[int]:
        return self._tokenizer.tokenize(text)

    def embed(self, inputs: list[list[int]]):
        return self.call(inputs)


class CrossEncoderProcess(BatchProcess):
    """A cross-encoder in a child process behind the `PairScorer` protocol
    (serving/scores.py): pairs are tokenized here, scored there."""

    def __init__(self, spec: CrossEncoderSpec, *, name: str,
                 policy: RestartPolicy = RestartPolicy()) -> None:
        from llmserve.engines.cross_encoder import PairTokenizer

        self._tokenizer = PairTokenizer(spec.path)
        super().__init__(spec, name=name, what="reranker", policy=policy)
        self.max_input_tokens: int = self.facts["max_input_tokens"]

    def tokenize_pair(self, query: str, document: str):
        return self._tokenizer.tokenize_pair(query, document)

    def score(self, pairs: list) -> list[float]:
        return self.call(pairs)
