"""What every step-loop engine shares: a decode thread fed through an inbox, requests that
hand their tokens to the event loop once per step, and the rule for when a sequence ends.

The engine's thread owns the model. The event loop talks to it only through the inbox
(new requests, cancellations) and receives each step's tokens with one
`call_soon_threadsafe` for the whole step.
"""

from __future__ import annotations

import asyncio
import queue
from collections import deque
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from llmserve.engines.base import FinishReason, SamplingParams, TokenOutput

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
