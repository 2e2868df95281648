"""One bounded batching line for models that answer batches (embedders, cross-encoders):
items that arrive while the model is busy go together into its next batch, run off the
event loop. While a batch runs, at most `max_queue` requests wait with items not yet taken;
one more is refused at once (429 with Retry-After). A stuck model is its process watchdog's
business (engines/process.py): it is killed, and its waiters get 503."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from typing import Generic, TypeVar

from llmserve.engines.base import EngineError
from llmserve.errors import ServerBusy
from llmserve.serving.availability import engine_failure

I = TypeVar("I")  # noqa: E741 - an item of a batch
R = TypeVar("R")  # its result


class _Waiter:
    """One request's items not yet taken into a batch."""

    __slots__ = ("left",)

    def __init__(self, left: int) -> None:
        self.left = left


class BatchLine(Generic[I, R]):
    """`run(items)` answers a batch with one result per item, in order; it is called on a
    worker thread, one batch at a time. `size(item)` sorts a batch (similar lengths together
    waste less padding)."""

    def __init__(
        self,
        run: Callable[[list[I]], Sequence[R]],
        *,
        what: str,
        max_batch: int,
        max_queue: int,
        size: Callable[[I], int] = len,  # type: ignore[assignment]
    ) -> None:
        self._run_batch = run
        self._what = what
        self._max_batch = max_batch
        self._max_queue = max_queue
        self._size = size
        self._pending: list[tuple[I, asyncio.Future[R], _Waiter]] = []
        self._waiting = 0  # requests with items in _pending
        self._running = False  # a batch is with the model
        self._worker: asyncio.Task[None] | None = None

    @property
    def waiting(self) -> int:
        """Requests whose items are not all taken into a batch yet."""
        return self._waiting

    @property
    def busy(self) -> bool:
        """Items waiting or with the model (it is not to be unloaded)."""
        return self._running or bool(self._pending) or self._waiting > 0

    async def submit(self, items: list[I]) -> list[R]:
        if (self._running or self._waiting) and self._waiting >= self._max_queue:
            raise ServerBusy(
                f"The {self._what} is busy: {self._waiting} requests are already waiting. "
                "Retry later.",
                headers={"Retry-After": "1"},
            )
        if not items:
            return []
        loop = asyncio.get_running_loop()
        futures = []
        waiter = _Waiter(len(items))
        self._waiting += 1
        for item in items:
            fut: asyncio.Future[R] = loop.create_future()
            self._pending.append((item, fut, waiter))
            futures.append(fut)
        if self._worker is None or self._worker.done():
            self._worker = asyncio.create_task(self._work())
        try:
            return list(await asyncio.gather(*futures))
        except asyncio.CancelledError:
            for fut in futures:
                fut.cancel()  # a client that left: its items are skipped if not yet started
            raise

    async def _work(self) -> None:
        while self._pending:
            taken = self._pending[: self._max_batch]
            del self._pending[: self._max_batch]
            for _, _, waiter in taken:
                waiter.left -= 1
                if waiter.left == 0:
                    self._waiting -= 1
            batch = [(item, f) for item, f, _ in taken if not f.done()]
            if not batch:
                continue
            self._running = True
            try:
                batch.sort(key=lambda entry: self._size(entry[0]))
                results = await asyncio.to_thread(self._run_batch, [item for item, _ in batch])
                if len(results) != len(batch):
                    raise EngineError(f"the {self._what} answered {len(results)} results for "
                                      f"{len(batch)} items")
            except Exception as exc:  # noqa: BLE001 - every waiter learns of it
                if isinstance(exc, EngineError):
                    exc = engine_failure(exc)
                for _, f in batch:
                    if not f.done():
                        f.set_exception(exc)
                continue
            finally:
                self._running = False
            for (_, f), result in zip(batch, results, strict=True):
                if not f.done():
                    f.set_result(result)
