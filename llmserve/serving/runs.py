"""Generations that outlive their request: background responses, and stored chat streams
whose client hung up. Each runs as a task of its own and writes its events to an
`EventLog`; any number of clients follow it from any event on, replaying what was already
written and then following live, so a client that lost its connection loses nothing and
nothing is generated twice.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable, Coroutine
from typing import Any

log = logging.getLogger(__name__)

# The kinds of run: each API finds only its own (a chat completion id is no response).
RESPONSE = "response"
CHAT_COMPLETION = "chat.completion"


class EventLog:
    """One run's events, numbered from 0 in the order written."""

    def __init__(self) -> None:
        self._events: list[bytes] = []
        self._closed = False
        self._written = asyncio.Event()  # replaced after each write: one per generation

    @property
    def closed(self) -> bool:
        return self._closed

    def __len__(self) -> int:
        return len(self._events)

    def write(self, event: bytes) -> int:
        if self._closed:
            raise RuntimeError("write to a closed event log")
        self._events.append(event)
        self._wake()
        return len(self._events) - 1

    def close(self) -> None:
        self._closed = True
        self._wake()

    def _wake(self) -> None:
        self._written.set()
        self._written = asyncio.Event()

    def events(self, after: int = -1) -> list[tuple[int, bytes]]:
        return [(i, e) for i, e in enumerate(self._events[after + 1:], start=after + 1)]

    async def follow(self, after: int = -1) -> AsyncIterator[tuple[int, bytes]]:
        """Events numbered above `after`: those written, then each as it comes, until the
        log closes."""
        i = after + 1
        while True:
            written = self._written
            while i < len(self._events):
                yield i, self._events[i]
                i += 1
            if self._closed:
                return
            await written.wait()


class Run:
    def __init__(self, id: str, kind: str, key_hash: str) -> None:
        self.id = id
        self.kind = kind  # RESPONSE, CHAT_COMPLETION
        self.key_hash = key_hash  # who made it, as the store has it
        self.log = EventLog()
        self.task: asyncio.Task[None] | None = None
        self.state: Any = None  # what the run's owner keeps of it (a response as it stands)
        self.stopping = False  # cancelled because the server stops, not on request
        self._expiry: asyncio.TimerHandle | None = None

    def cancel(self) -> bool:
        """Stop the run; False when it had already ended."""
        if self.task is None or self.task.done():
            return False
        self.task.cancel()
        return True

    async def end(self) -> None:
        """Stop the run and wait until it has written (and saved) its ending."""
        if self.cancel():
            await asyncio.gather(self.task, return_exceptions=True)  # type: ignore[arg-type]


class Runs:
    """The running generations of one app, by id. An ended run stays for `linger` seconds, so
    a client reconnecting just after the end reads its events from memory rather than from
    the store."""

    def __init__(self, linger: float = 60.0) -> None:
        self._runs: dict[str, Run] = {}
        self._linger = linger

    def get(self, id: str, kind: str, key_hash: str) -> Run | None:
        """The run `id` if it makes a `kind` and was made with `key_hash`: an id of another
        kind, or another key's, is none of the asker's."""
        run = self._runs.get(id)
        if run is None or run.kind != kind or run.key_hash != key_hash:
            return None
        return run

    def start(self, id: str, kind: str, work: Callable[[Run], Coroutine[Any, Any, None]],
              *, key_hash: str) -> Run:
        """Run `work(run)` as a task of its own; it writes `run.log` and the log is closed
        when it returns, fails or is cancelled."""
        run = Run(id, kind, key_hash)
        self._runs[id] = run

        async def main() -> None:
            try:
                await work(run)
            except asyncio.CancelledError:
                pass  # `work` saw it and wrote its own ending; the task ends here
            except Exception:  # noqa: BLE001 - logged; the run's followers see the log close
                log.exception("run %s failed", id)
            finally:
                run.log.close()
                run._expiry = asyncio.get_running_loop().call_later(
                    self._linger, self._drop, id, run)

        run.task = asyncio.create_task(main(), name=f"run {id}")
        return run

    async def remove(self, run: Run) -> None:
        """Forget the run at once, and stop it if it runs (what it made is being deleted):
        from now on nobody finds it, not even for the linger time."""
        self._drop(run.id, run)
        await run.end()

    def _drop(self, id: str, run: Run) -> None:
        if self._runs.get(id) is run:
            del self._runs[id]

    async def stop(self) -> None:
        """Cancel every run and wait for each to write its ending."""
        tasks = []
        for run in self._runs.values():
            if run.task is not None and not run.task.done():
                run.stopping = True
                run.task.cancel()
                tasks.append(run.task)
        await asyncio.gather(*tasks, return_exceptions=True)
        for run in self._runs.values():
            if run._expiry is not None:
                run._expiry.cancel()
        self._runs.clear()
