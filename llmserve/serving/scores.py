"""Relevance scores of (query, document) pairs, for /v1/rerank and /v1/score, written once
for both: from a cross-encoder, which reads each pair together, or from an embedding model,
as the cosine similarity of the two texts' vectors (as vLLM scores with embedding models).

A request's texts are checked and tokenized in `prepare` (a thread's work: no event loop),
then scored in `score`, batched with other requests' in the model's bounded line."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from llmserve.engines.base import EngineHealth
from llmserve.errors import ContextLengthExceeded, InvalidRequest
from llmserve.serving.batching import BatchLine
from llmserve.serving.embeddings import EmbeddingBatcher

if TYPE_CHECKING:  # the module itself is the model process's (torch, offline hub settings)
    from llmserve.engines.cross_encoder import Pair


@dataclass(frozen=True)
class Texts:
    """What a request scores: one query against every document, or queries and documents
    paired one to one; `params` name the request fields they came from (for errors)."""

    queries: list[str]
    documents: list[str]
    params: tuple[str, str] = ("query", "documents")

    def __post_init__(self) -> None:
        first, second = self.params
        if not self.queries:
            raise InvalidRequest(f"'{first}' must hold at least one text.", param=first)
        if not self.documents:
            raise InvalidRequest(f"'{second}' must hold at least one text.", param=second)
        if len(self.queries) > 1 and len(self.queries) != len(self.documents):
            raise InvalidRequest(
                f"'{first}' has {len(self.queries)} texts and '{second}' {len(self.documents)}: "
                "pair one with many (1:N) or as many with as many (N:N).",
                param=first,
            )
        for param, texts in ((first, self.queries), (second, self.documents)):
            for i, text in enumerate(texts):
                if not text:
                    where = f"Text {i} of '{param}'" if len(texts) > 1 else f"'{param}'"
                    raise InvalidRequest(f"{where} is an empty string.", param=param)

    def query_of(self, i: int) -> str:
        return self.queries[0] if len(self.queries) == 1 else self.queries[i]


@dataclass(frozen=True)
class ScoreJob:
    """A request's texts as token ids, ready for its scorer's line."""

    tokens: int  # the tokens the model reads for it
    work: Any


class Scorer(Protocol):
    name: str

    def prepare(self, texts: Texts) -> ScoreJob: ...

    async def score(self, job: ScoreJob) -> list[float]: ...


class PairModel(Protocol):
    """A cross-encoder: engines.process.CrossEncoderProcess, or the model itself."""

    @property
    def max_input_tokens(self) -> int: ...

    def tokenize_pair(self, query: str, document: str) -> Pair: ...

    def score(self, pairs: list[Pair]) -> list[float]: ...

    def health(self) -> EngineHealth: ...

    async def start(self) -> None: ...

    async def stop(self) -> None: ...


class CrossEncoderScorer:
    """Each (query, document) pair read together by the model, one score each."""

    def __init__(self, name: str, model: PairModel, *, max_batch: int = 32,
                 max_queue: int = 256) -> None:
        self.name = name
        self.model = model
        self._line: BatchLine[Pair, float] = BatchLine(
            model.score, what="reranker", max_batch=max_batch, max_queue=max_queue,
            size=lambda pair: len(pair.ids),
        )

    @property
    def waiting(self) -> int:
        return self._line.waiting

    @property
    def busy(self) -> bool:
        return self._line.busy

    def prepare(self, texts: Texts) -> ScoreJob:
        limit = self.model.max_input_tokens
        pairs = []
        for i, document in enumerate(texts.documents):
            pair = self.model.tokenize_pair(texts.query_of(i), document)
            if len(pair.ids) > limit:
                raise ContextLengthExceeded(
                    f"Pair {i} (query and document {i}) has {len(pair.ids)} tokens; the model "
                    f"'{self.name}' reads at most {limit}.",
                    param=texts.params[1],
                )
            pairs.append(pair)
        return ScoreJob(sum(len(p.ids) for p in pairs), pairs)

    async def score(self, job: ScoreJob) -> list[float]:
        return await self._line.submit(job.work)


class EmbeddingScorer:
    """The cosine similarity of each query's vector and its document's, the vectors made in
    the embedding model's own line (so scoring and embeddings share its limits)."""

    def __init__(self, name: str, batcher: EmbeddingBatcher) -> None:
        self.name = name
        self.batcher = batcher

    def prepare(self, texts: Texts) -> ScoreJob:
        embedder = self.batcher.embedder
        limit = embedder.max_input_tokens
        inputs: list[list[int]] = []
        for param, group in zip(texts.params, (texts.queries, texts.documents), strict=True):
            for i, text in enumerate(group):
                ids = embedder.tokenize(text)
                if len(ids) > limit:
                    where = f"Text {i} of '{param}'" if len(group) > 1 else f"'{param}'"
                    raise ContextLengthExceeded(
                        f"{where} has {len(ids)} tokens; the model '{self.name}' reads at most "
                        f"{limit}.",
                        param=param,
                    )
                inputs.append(ids)
        return ScoreJob(sum(map(len, inputs)), (len(texts.queries), inputs))

    async def score(self, job: ScoreJob) -> list[float]:
        n_queries, inputs = job.work
        vectors = (await self.batcher.embed(inputs)).astype(np.float64)
        queries, documents = vectors[:n_queries], vectors[n_queries:]
        return cosine(queries, documents).tolist()


def cosine(queries: np.ndarray, documents: np.ndarray) -> np.ndarray:
    """Row i of `documents` against row i of `queries` (or against its only row)."""
    def unit(v: np.ndarray) -> np.ndarray:
        return v / np.maximum(np.linalg.norm(v, axis=1, keepdims=True), 1e-12)

    return np.sum(unit(queries) * unit(documents), axis=1)


def ranked(scores: list[float], top_n: int | None) -> list[int]:
    """Indices by score, highest first (ties: in the order sent); the first `top_n` only,
    all of them when it is None or 0 (as vLLM reads 0)."""
    order = sorted(range(len(scores)), key=lambda i: -scores[i])
    return order[:top_n] if top_n else order
