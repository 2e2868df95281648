"""Embedding requests batched across clients: inputs that arrive while the model is busy
are embedded together in the next batch, off the event loop."""

from __future__ import annotations

import asyncio
from typing import Protocol

import numpy as np

from llmserve.engines.base import EngineError, EngineHealth
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


class EmbeddingBatcher:
    def __init__(self, embedder: Embedder, *, max_batch: int = 64) -> None:
        self.embedder = embedder
        self._max_batch = max_batch
        self._pending: list[tuple[list[int], asyncio.Future[np.ndarray]]] = []
        self._worker: asyncio.Task[None] | None = None

    async def embed(self, inputs: list[list[int]]) -> np.ndarray:
        loop = asyncio.get_running_loop()
        futures = []
        for ids in inputs:
            fut: asyncio.Future[np.ndarray] = loop.create_future()
            self._pending.append((ids, fut))
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
            batch = [(ids, f) for ids, f in self._pending[: self._max_batch] if not f.done()]
            del self._pending[: self._max_batch]
            if not batch:
                continue
            # Similar lengths together waste less padding.
            batch.sort(key=lambda item: len(item[0]))
            try:
                vectors = await asyncio.to_thread(self.embedder.embed, [ids for ids, _ in batch])
            except Exception as exc:  # noqa: BLE001 - every waiter learns of it
                if isinstance(exc, EngineError):
                    exc = engine_failure(exc)
                for _, f in batch:
                    if not f.done():
                        f.set_exception(exc)
                continue
            for (_, f), vec in zip(batch, vectors, strict=True):
                if not f.done():
                    f.set_result(vec)
