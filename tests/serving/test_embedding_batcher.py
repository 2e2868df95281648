"""EmbeddingBatcher on the real bundled embedder: concurrent requests share batches and get
exactly their own vectors."""

from __future__ import annotations

import asyncio
import threading

import numpy as np
import pytest

pytest.importorskip("sentence_transformers")

from llmserve.engines.sentence_embedder import SentenceEmbedder  # noqa: E402
from llmserve.errors import ServerBusy  # noqa: E402
from llmserve.models import bundled_embedding_path  # noqa: E402
from llmserve.serving.embeddings import EmbeddingBatcher  # noqa: E402


class Counting:
    """The real embedder, counting how many batches it is asked for."""

    def __init__(self, inner: SentenceEmbedder) -> None:
        self.inner = inner
        self.batches: list[int] = []

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def embed(self, inputs):
        self.batches.append(len(inputs))
        return self.inner.embed(inputs)


class Held(Counting):
    """The real embedder, holding each batch until `release` is set."""

    def __init__(self, inner: SentenceEmbedder) -> None:
        super().__init__(inner)
        self.release = threading.Event()

    def embed(self, inputs):
        self.batches.append(len(inputs))
        self.release.wait(30)
        return self.inner.embed(inputs)


@pytest.fixture(scope="module")
def embedder() -> SentenceEmbedder:
    return SentenceEmbedder(bundled_embedding_path())


def test_concurrent_requests_share_batches_and_keep_their_order(embedder):
    texts = [f"text {i} " + "word " * i for i in range(12)]
    ids = [embedder.tokenize(t) for t in texts]
    alone = embedder.embed(ids)

    async def main():
        counting = Counting(embedder)
        batcher = EmbeddingBatcher(counting, max_batch=64)
        results = await asyncio.gather(*(batcher.embed([x]) for x in ids))
        return counting.batches, np.concatenate(results)

    batches, together = asyncio.run(main())
    assert sum(batches) == len(texts)
    assert len(batches) < len(texts)  # requests arriving together were embedded together
    np.testing.assert_allclose(together, alone, atol=1e-5)


def test_a_cancelled_request_does_not_disturb_the_others(embedder):
    ids = [embedder.tokenize(t) for t in ("alpha", "beta", "gamma")]

    async def main():
        batcher = EmbeddingBatcher(embedder)
        keep = asyncio.create_task(batcher.embed(ids[:1]))
        drop = asyncio.create_task(batcher.embed(ids[1:]))
        await asyncio.sleep(0)
        drop.cancel()
        return await keep

    np.testing.assert_allclose(asyncio.run(main()), embedder.embed(ids[:1]), atol=1e-5)


def test_a_full_line_is_refused_at_once_and_the_others_are_served(embedder):
    ids = [embedder.tokenize(t) for t in ("alpha", "beta", "gamma", "delta")]

    async def main():
        held = Held(embedder)
        batcher = EmbeddingBatcher(held, max_queue=1)
        try:
            first = asyncio.create_task(batcher.embed(ids[:1]))
            while not held.batches:  # with the embedder, held there
                await asyncio.sleep(0.01)
            second = asyncio.create_task(batcher.embed(ids[1:3]))  # waits: the line is 1
            await asyncio.sleep(0.05)
            assert batcher.waiting == 1
            with pytest.raises(ServerBusy) as refused:
                await batcher.embed(ids[3:])
            assert refused.value.status_code == 429 and refused.value.headers["Retry-After"]
        finally:
            held.release.set()
        results = await first, await second
        assert batcher.waiting == 0
        # the line is free again
        return [*results, await batcher.embed(ids[3:])]

    first, second, third = asyncio.run(main())
    np.testing.assert_allclose(first, embedder.embed(ids[:1]), atol=1e-5)
    np.testing.assert_allclose(second, embedder.embed(ids[1:3]), atol=1e-5)
    np.testing.assert_allclose(third, embedder.embed(ids[3:]), atol=1e-5)
