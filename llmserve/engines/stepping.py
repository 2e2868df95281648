"""What every step-loop engine shares: a decode thread fed through an inbox, requests that
hand their tokens to the event loop once per step, and the rule for when a sequence ends.

The engine's thread owns the model. The event loop talks to it only through the inbox
(new requests, cancellations) and receives each step's tokens with one
`call_soon_threadsafe` for the whole step.
"""

from __future__ import annotations

import asyncio
import queue
import threading
from collections import deque
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from llmserve.engines.base import EngineError, FinishReason, SamplingParams, TokenOutput

Inbox = queue.SimpleQueue


class EngineRequest:
    """One request inside an engine; also the `GenerationStream` handed to the core."""

    def __init__(self, inbox: Inbox, prompt: list[int], params: list[SamplingParams]) -> None:
        self._inbox = inbox
        self.prompt = prompt
        self.params = params
        self.queue: asyncio.Queue[list[TokenOutput] | BaseException | None] = asyncio.Queue()
        # decode-thread state
        self.sequences: list[Any] = []
        self.prefilled = 0
        self.cancelled: set[int] = set()
        self.cancel_all = False

    def cancel(self, index: int | None = None) -> None:
        self._inbox.put(("cancel", self, index))

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


def drain_inbox(inbox: Inbox, waiting: deque[EngineRequest], block: bool) -> bool:
    """Take new requests and cancellations; False once asked to stop. Blocks only when
    `block` (the engine is idle) and only for the first message."""
    while True:
        try:
            msg = inbox.get(block=block)
        except queue.Empty:
            return True
        block = False
        kind = msg[0]
        if kind == "stop":
            return False
        if kind == "add":
            waiting.append(msg[1])
        elif kind == "cancel":
            _, req, index = msg
            if index is None:
                req.cancel_all = True
            else:
                req.cancelled.add(index)


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
    finished: list[EngineRequest] = field(default_factory=list)
    failed: list[tuple[EngineRequest, BaseException]] = field(default_factory=list)

    def add(self, request: EngineRequest, output: TokenOutput) -> None:
        self.by_request.setdefault(request, []).append(output)

    def deliver(self, loop: asyncio.AbstractEventLoop | None) -> None:
        """Hand the whole step to the event loop in one call."""
        if loop is None or not (self.by_request or self.finished or self.failed):
            return
        items: list[tuple[EngineRequest, object]] = [
            *self.by_request.items(),
            *self.failed,
            *((r, None) for r in self.finished),
        ]
        loop.call_soon_threadsafe(_put_all, items)


def _put_all(items: list[tuple[EngineRequest, object]]) -> None:
    for req, item in items:
        req.queue.put_nowait(item)


class StepLoopEngine:
    """The part of an engine that is the same for every backend: the decode thread's
    lifecycle, admission of requests into the inbox, and the facts the serving core reads.

    A subclass loads its model, sets the `_`-fields below in `__init__`, calls
    `_init_loop()`, and implements `_run()` (the decode thread) and `close()`.
    """

    thread_name = "decode"

    _context_length: int
    _max_sequences: int
    _n_vocab: int
    _end_tokens: frozenset[int]
    _token_bytes: list[bytes]
    _chat_template: str | None
    _bos_token: str
    _eos_token: str
    _add_bos: bool

    def _init_loop(self) -> None:
        self._inbox: Inbox = Inbox()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._closed = False

    @property
    def context_length(self) -> int:
        return self._context_length

    @property
    def max_sequences(self) -> int:
        return self._max_sequences

    @property
    def vocab_size(self) -> int:
        return self._n_vocab

    @property
    def end_tokens(self) -> frozenset[int]:
        """End-of-generation tokens (EOS, end of turn)."""
        return self._end_tokens

    @property
    def chat_template(self) -> str | None:
        return self._chat_template

    @property
    def bos_token(self) -> str:
        return self._bos_token

    @property
    def eos_token(self) -> str:
        return self._eos_token

    @property
    def add_bos(self) -> bool:
        return self._add_bos

    def token_bytes(self, token_id: int) -> bytes:
        return self._token_bytes[token_id]

    async def start(self) -> None:
        if self._thread is not None:
            return
        if self._closed:
            raise EngineError("engine closed")
        self._loop = asyncio.get_running_loop()
        self._thread = threading.Thread(target=self._run, name=self.thread_name, daemon=True)
        self._thread.start()

    async def stop(self) -> None:
        if self._thread is not None:
            self._inbox.put(("stop",))
            await asyncio.to_thread(self._thread.join)
            self._thread = None
        self.close()

    def generate(self, prompt: list[int], params: list[SamplingParams]) -> EngineRequest:
        if self._thread is None:
            raise EngineError("engine not started")
        if not prompt:
            raise ValueError("empty prompt")
        if not params:
            raise ValueError("no sequences requested")
        if len(params) > self._max_sequences:
            raise ValueError(f"{len(params)} sequences requested, at most {self._max_sequences}")
        if len(prompt) >= self._context_length:
            raise ValueError(
                f"prompt of {len(prompt)} tokens leaves no room in the context "
                f"({self._context_length})"
            )
        request = EngineRequest(self._inbox, list(prompt), list(params))
        self._inbox.put(("add", request))
        return request

    def _run(self) -> None:
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError
