"""Runs that outlive their request: event logs followed from any point, live and after the
end; cancelling; a server stop."""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Callable, Coroutine
from typing import Any

import pytest

from llmserve.serving.runs import CHAT_COMPLETION, RESPONSE, EventLog, Run, Runs


def in_loop(test: Callable[[], Coroutine[Any, Any, None]]) -> Callable[[], None]:
    """An async test run in a fresh event loop of its own."""

    @functools.wraps(test)
    def run() -> None:
        asyncio.run(test())

    return run


async def _take(log: EventLog, after: int = -1) -> list[tuple[int, bytes]]:
    return [e async for e in log.follow(after)]


@in_loop
async def test_followers_replay_then_follow_live_until_closed():
    log = EventLog()
    log.write(b"a")
    early = asyncio.create_task(_take(log))
    late = asyncio.create_task(_take(log, after=0))
    await asyncio.sleep(0)
    for data in (b"b", b"c"):
        log.write(data)
        await asyncio.sleep(0)
    log.close()
    assert await early == [(0, b"a"), (1, b"b"), (2, b"c")]
    assert await late == [(1, b"b"), (2, b"c")]
    assert await _take(log, after=1) == [(2, b"c")]  # after the end: replay only
    assert await _take(log, after=5) == []


@in_loop
async def test_several_writes_between_wakeups_are_all_seen():
    log = EventLog()
    follower = asyncio.create_task(_take(log))
    await asyncio.sleep(0)
    for i in range(5):  # no yield to the follower in between
        log.write(bytes([i]))
    log.close()
    assert [d for _, d in await follower] == [bytes([i]) for i in range(5)]


@in_loop
async def test_a_closed_log_takes_no_writes():
    log = EventLog()
    log.close()
    with pytest.raises(RuntimeError):
        log.write(b"x")


@in_loop
async def test_a_run_closes_its_log_however_it_ends_and_lingers():
    runs = Runs(linger=0.05)

    async def fails(run: Run) -> None:
        run.log.write(b"one")
        raise ValueError("boom")

    run = runs.start("r1", RESPONSE, fails, key_hash="k")
    assert await _take(run.log) == [(0, b"one")]
    assert runs.get("r1", RESPONSE, "k") is run  # still there for late followers
    await asyncio.sleep(0.1)
    assert runs.get("r1", RESPONSE, "k") is None


async def _started_slow_run(runs: Runs) -> Run:
    """A run that waits until cancelled, then takes a moment to write (save) its ending:
    `stopping` or `cancelled`."""
    started = asyncio.Event()

    async def slow(run: Run) -> None:
        try:
            started.set()
            await asyncio.sleep(60)
        except asyncio.CancelledError:
            await asyncio.sleep(0.01)
            run.log.write(b"stopping" if run.stopping else b"cancelled")
            raise

    run = runs.start("r", RESPONSE, slow, key_hash="k")
    await started.wait()
    return run


@in_loop
async def test_end_cancels_and_waits_for_the_ending():
    runs = Runs()
    run = await _started_slow_run(runs)
    await run.end()
    assert run.log.events() == [(0, b"cancelled")] and run.log.closed
    assert not run.cancel()  # ended already
    await run.end()  # and again: nothing to do
    await runs.stop()


@in_loop
async def test_stop_marks_runs_stopping_and_waits_for_them():
    runs = Runs()
    run = await _started_slow_run(runs)
    await runs.stop()
    assert run.log.events() == [(0, b"stopping")]
    assert runs.get("r", RESPONSE, "k") is None


@in_loop
async def test_a_run_is_found_only_by_its_own_kind_and_key():
    runs = Runs()
    run = await _started_slow_run(runs)
    assert runs.get("r", RESPONSE, "k") is run
    assert runs.get("r", CHAT_COMPLETION, "k") is None
    assert runs.get("r", RESPONSE, "another key") is None
    await runs.stop()


@in_loop
async def test_remove_stops_the_run_and_forgets_it_at_once():
    runs = Runs()
    run = await _started_slow_run(runs)
    await runs.remove(run)
    assert run.log.events() == [(0, b"cancelled")] and run.log.closed
    assert runs.get("r", RESPONSE, "k") is None  # not even for the linger time
    await runs.stop()
