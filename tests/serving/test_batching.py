"""BatchLine, the bounded batching line of embedders and cross-encoders, with plain
functions as the batch: order kept, errors to every waiter of a batch, empty requests."""

from __future__ import annotations

import asyncio

import pytest

from llmserve.engines.base import EngineDown, EngineError
from llmserve.errors import EngineFailure, EngineUnavailable
from llmserve.serving.batching import BatchLine


def test_results_come_back_in_each_requests_order_batched_by_size():
    seen: list[list[str]] = []

    def run(items: list[str]) -> list[str]:
        seen.append(items)
        return [s.upper() for s in items]

    async def main():
        line = BatchLine(run, what="model", max_batch=4, max_queue=8)
        return await asyncio.gather(line.submit(["ccc", "a"]), line.submit(["bb"]),
                                    line.submit([]))

    assert asyncio.run(main()) == [["CCC", "A"], ["BB"], []]
    assert seen == [["a", "bb", "ccc"]]  # one batch, shortest first


@pytest.mark.parametrize(("raised", "expected"), [
    (EngineDown("the model process is gone", retry_after=2), EngineUnavailable),
    (EngineError("bad batch"), EngineFailure),
])
def test_a_failed_batch_fails_every_request_in_it(raised, expected):
    def run(items):
        raise raised

    async def main():
        line = BatchLine(run, what="model", max_batch=4, max_queue=8)
        return await asyncio.gather(line.submit(["a"]), line.submit(["b", "c"]),
                                    return_exceptions=True)

    results = asyncio.run(main())
    assert all(isinstance(r, expected) for r in results)
    if expected is EngineUnavailable:
        assert results[0].status_code == 503 and results[0].headers["Retry-After"] == "2"


def test_a_batch_that_cannot_even_be_sorted_fails_its_requests_not_the_line():
    async def main():
        line = BatchLine(lambda items: items, what="model", max_batch=4, max_queue=8)
        with pytest.raises(TypeError):
            await asyncio.wait_for(line.submit([1]), 5)  # ints have no len()
        return line.waiting, await line.submit(["ok"])

    assert asyncio.run(main()) == (0, ["ok"])
