"""Embedding requests batched across clients: inputs that arrive while the model is busy
are embedded together in the next batch, off the event loop. The line is bounded as chat's
is: while a batch is being embedded, at most `max_queue` requests wait with inputs not yet
taken; one more is refused at once (429 with Retry-After). A stuck embedder is the
embedder's watchdog's business (engines/process.py): it is killed, and its waiters get 503."""

from __future__ import annotations

import asyncio
from typing import Protocol

import numpy as np

from llmserve.engines.base import EngineError, EngineHealth
from llmserve.errors import ServerBusy
from llmserve.serving.availability import engine_failure


class Embedder(Protocol):
    @property
    def dimensions(self) -> int: ...

    @property
    def max_input_tokens(self) -> int: ...

    @property
    def vocab_size(self) -> int: ...

    def tokenize(self, text: str) -> list[int]: ...

    def embed(self, inputs: list[list[int]]) -> np.ndarray: ...

    def health(self) -> EngineHealth: ...

    async def start(self) -> None: ...

    async def stop(self) -> None: ...


class _Waiter:
    """One request's inputs not yet taken into a batch."""

    __slots__ = ("left",)

    def __init__(self, left: int) -> None:
        self.left = left


class EmbeddingBatcher:
    def __init__(self, embedder: Embedder, *, max_batch: int = 64, max_queue: int = 256) -> None:
        self.embedder = embedder
        self._max_batch = max_batch
        self._max_queue = max_queue
        self._pending: list[tuple[list[int], asyncio.Future[np.ndarray], _Waiter]] = []
        self._waiting = 0  # requests with inputs in _pending
        self._embedding = False  # a batch is with the embedder
        self._worker: asyncio.Task[None] | None = None

    @property
    def waiting(self) -> int:
        """Requests whose inputs are not all taken into a batch yet."""
        return self._waiting

    async def embed(self, inputs: list[list[int]]) -> np.ndarray:
        if (self._embedding or self._waiting) and self._waiting >= self._max_queue:
            raise ServerBusy(
                f"The embedder is busy: {self._waiting} requests are already waiting. "
                "Retry later.",
                headers={"Retry-After": "1"},
            )
        if not inputs:
            return np.zeros((0, self.embedder.dimensions), dtype=np.float32)
        loop = asyncio.get_running_loop()
        futures = []
        waiter = _Waiter(len(inputs))
        self._waiting += 1
        for ids in inputs:
            fut: asyncio.Future[np.ndarray] = loop.create_future()
            self._pending.append((ids, fut, waiter))
            futures.append(fut)
        if self._worker is None or self._worker.done():
            self._worker = asyncio.create_task(self._run())
        try:
            return np.stack(await asyncio.gather(*futures))
        except asyncio.CancelledError:
            for fut in futures:
                fut.cancel()  # a client that left: its inputs are skipped if not yet started
            raise

    async def _run(self) -> None:
        while self._pending:
            taken = self._pending[: self._max_batch]
            del self._pending[: self._max_batch]
            for _, _, waiter in taken:
                waiter.left -= 1
                if waiter.left == 0:
                    self._waiting -= 1
            batch = [(ids, f) for ids, f, _ in taken if not f.done()]
            if not batch:
                continue
            # Similar lengths together waste less padding.
            batch.sort(key=lambda item: len(item[0]))
            self._embedding = True
            try:
                vectors = await asyncio.to_thread(self.embedder.embed, [ids for ids, _ in batch])
            except Exception as exc:  # noqa: BLE001 - every waiter learns of it
                if isinstance(exc, EngineError):
                    exc = engine_failure(exc)
                for _, f in batch:
                    if not f.done():
                        f.set_exception(exc)
                continue
            finally:
                self._embedding = False
            for (_, f), vec in zip(batch, vectors, strict=True):
                if not f.done():
                    f.set_result(vec)
