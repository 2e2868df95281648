"""Embedding requests batched across clients (serving/batching.py: one bounded line per
model, run off the event loop)."""

from __future__ import annotations

from typing import Protocol

import numpy as np

from llmserve.engines.base import EngineHealth
from llmserve.serving.batching import BatchLine


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
    def __init__(self, embedder: Embedder, *, max_batch: int = 64, max_queue: int = 256) -> None:
        self.embedder = embedder
        self._line: BatchLine[list[int], np.ndarray] = BatchLine(
            embedder.embed, what="embedder", max_batch=max_batch, max_queue=max_queue
        )

    @property
    def busy(self) -> bool:
        """Inputs waiting or being embedded."""
        return self._line.busy

    @property
    def waiting(self) -> int:
        """Requests whose inputs are not all taken into a batch yet."""
        return self._line.waiting

    async def embed(self, inputs: list[list[int]]) -> np.ndarray:
        vectors = await self._line.submit(inputs)
        if not vectors:
            return np.zeros((0, self.embedder.dimensions), dtype=np.float32)
        return np.stack(vectors)
