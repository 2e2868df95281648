"""Scheduler: sequence slots first come, first served, with a bounded line."""

from __future__ import annotations

import asyncio

import pytest

from llmserve.errors import LLMServeError, QueueTimeout, ServerBusy
from llmserve.serving.scheduler import Scheduler


async def settle(rounds: int = 5) -> None:
    """Let every ready task run until it blocks again."""
    for _ in range(rounds):
        await asyncio.sleep(0)


def test_free_slots_granted_immediately():
    async def main():
        s = Scheduler(4, max_queue=0, queue_timeout=None)
        await s.acquire(3)
        assert s.free_slots == 1
        await s.acquire(1)
        assert s.free_slots == 0
        assert s.waiting == 0
        s.release(4)
        assert s.free_slots == 4

    asyncio.run(main())


def test_slots_context_manager_releases_on_exit_and_on_error():
    async def main():
        s = Scheduler(2, max_queue=1, queue_timeout=None)
        async with s.slots(2):
            assert s.free_slots == 0
        assert s.free_slots == 2
        with pytest.raises(RuntimeError):
            async with s.slots(1):
                assert s.free_slots == 1
                raise RuntimeError("boom")
        assert s.free_slots == 2

    asyncio.run(main())


def test_fifo_grant_order():
    async def main():
        s = Scheduler(1, max_queue=10, queue_timeout=None)
        await s.acquire(1)
        order = []

        async def waiter(name):
            await s.acquire(1)
            order.append(name)

        tasks = []
        for name in "abcde":
            tasks.append(asyncio.create_task(waiter(name)))
            await settle()
        assert s.waiting == 5
        for _ in range(5):
            s.release(1)
            await settle()
        assert order == list("abcde")
        await asyncio.gather(*tasks)
        assert s.free_slots == 0
        s.release(1)
        assert s.free_slots == 1

    asyncio.run(main())


def test_big_request_is_not_overtaken_by_later_small_ones():
    async def main():
        s = Scheduler(4, max_queue=10, queue_timeout=None)
        await s.acquire(3)  # 1 free
        order = []

        async def waiter(name, n):
            await s.acquire(n)
            order.append(name)

        big = asyncio.create_task(waiter("big", 3))
        await settle()
        small = asyncio.create_task(waiter("small", 1))
        await settle()
        # The small one would fit in the free slot, but the big one is ahead of it.
        assert order == []
        assert s.waiting == 2
        assert s.free_slots == 1
        s.release(2)  # 3 free: enough for big only
        await settle()
        assert order == ["big"]
        assert s.free_slots == 0
        s.release(1)
        await settle()
        assert order == ["big", "small"]
        await asyncio.gather(big, small)

    asyncio.run(main())


def test_new_request_waits_behind_line_even_if_slots_are_free():
    async def main():
        s = Scheduler(2, max_queue=10, queue_timeout=None)
        await s.acquire(1)  # 1 free
        big = asyncio.create_task(s.acquire(2))
        await settle()
        late = asyncio.create_task(s.acquire(1))
        await settle()
        assert not late.done()
        assert s.waiting == 2
        s.release(1)
        await settle()
        assert big.done() and not late.done()
        s.release(2)
        await settle()
        assert late.done()
        assert s.free_slots == 1

    asyncio.run(main())


def test_release_wakes_several_waiters_that_fit():
    async def main():
        s = Scheduler(3, max_queue=10, queue_timeout=None)
        await s.acquire(3)
        tasks = [asyncio.create_task(s.acquire(1)) for _ in range(3)]
        await settle()
        assert s.waiting == 3
        s.release(2)
        await settle()
        assert [t.done() for t in tasks] == [True, True, False]
        assert s.free_slots == 0
        s.release(1)
        await settle()
        assert all(t.done() for t in tasks)

    asyncio.run(main())


def test_line_full_refused_with_server_busy():
    async def main():
        s = Scheduler(1, max_queue=2, queue_timeout=None)
        await s.acquire(1)
        waiters = [asyncio.create_task(s.acquire(1)) for _ in range(2)]
        await settle()
        assert s.waiting == 2
        with pytest.raises(ServerBusy) as info:
            s.check_room(1)
        err = info.value
        assert isinstance(err, LLMServeError)
        assert err.status_code == 429
        assert err.type == "rate_limit_error"
        assert err.code == "server_busy"
        assert "Retry-After" in err.headers
        assert int(err.headers["Retry-After"]) >= 1
        with pytest.raises(ServerBusy):
            await s.acquire(1)
        assert s.waiting == 2  # the refused request did not join the line
        for _ in range(3):
            s.release(1)
            await settle()
        await asyncio.gather(*waiters)
        assert s.free_slots == 1
        s.check_room(1)  # room again

    asyncio.run(main())


def test_check_room_ok_while_slots_free_even_with_zero_queue():
    async def main():
        s = Scheduler(2, max_queue=0, queue_timeout=None)
        s.check_room(2)
        await s.acquire(1)
        s.check_room(1)
        with pytest.raises(ServerBusy):
            s.check_room(2)  # would have to wait, and no waiting is allowed
        with pytest.raises(ServerBusy):
            await s.acquire(2)
        assert s.free_slots == 1

    asyncio.run(main())


def test_more_slots_than_exist_is_a_programming_error():
    s = Scheduler(2, max_queue=5, queue_timeout=None)
    with pytest.raises(ValueError):
        s.check_room(3)


def test_queue_timeout():
    async def main():
        s = Scheduler(1, max_queue=5, queue_timeout=0.05)
        await s.acquire(1)
        with pytest.raises(QueueTimeout) as info:
            await s.acquire(1)
        err = info.value
        assert err.status_code == 503
        assert err.code == "queue_timeout"
        assert "Retry-After" in err.headers
        assert s.waiting == 0
        assert s.free_slots == 0
        s.release(1)
        assert s.free_slots == 1

    asyncio.run(main())


def test_timed_out_head_lets_smaller_request_behind_it_through():
    async def main():
        s = Scheduler(2, max_queue=5, queue_timeout=0.2)
        await s.acquire(1)  # 1 free
        big = asyncio.create_task(s.acquire(2))
        await asyncio.sleep(0.1)  # small's deadline comes well after big's
        small = asyncio.create_task(s.acquire(1))
        await settle()
        assert s.waiting == 2 and not small.done()
        with pytest.raises(QueueTimeout):
            await big
        await settle()
        assert small.done() and small.exception() is None
        assert s.free_slots == 0
        assert s.waiting == 0

    asyncio.run(main())


def test_cancelled_waiter_leaves_line_without_leaking_slots():
    async def main():
        s = Scheduler(2, max_queue=5, queue_timeout=None)
        await s.acquire(2)
        a = asyncio.create_task(s.acquire(1))
        b = asyncio.create_task(s.acquire(2))
        c = asyncio.create_task(s.acquire(1))
        await settle()
        assert s.waiting == 3
        b.cancel()
        await settle()
        assert b.cancelled()
        assert s.waiting == 2
        s.release(2)
        await settle()
        # b is gone: a and c both get a slot.
        assert a.done() and c.done()
        assert s.free_slots == 0
        s.release(1)
        s.release(1)
        assert s.free_slots == 2
        assert s.waiting == 0

    asyncio.run(main())


def test_cancelled_head_wakes_the_one_behind():
    async def main():
        s = Scheduler(2, max_queue=5, queue_timeout=None)
        await s.acquire(1)  # 1 free
        big = asyncio.create_task(s.acquire(2))
        await settle()
        small = asyncio.create_task(s.acquire(1))
        await settle()
        assert not small.done()
        big.cancel()
        await settle()
        assert small.done() and not small.cancelled()
        assert s.free_slots == 0

    asyncio.run(main())


@pytest.mark.parametrize(
    "queue_timeout", [None, pytest.param(600.0, id="600.0")]
)
def test_waiter_cancelled_after_being_granted_hands_the_slots_on(queue_timeout):
    async def main():
        s = Scheduler(1, max_queue=5, queue_timeout=queue_timeout)
        await s.acquire(1)
        a = asyncio.create_task(s.acquire(1))
        b = asyncio.create_task(s.acquire(1))
        await settle()
        s.release(1)  # grants a's future; a has not resumed yet
        a.cancel()
        await settle()
        try:
            assert a.cancelled()
            # The slot a was granted went to b rather than leaking.
            assert b.done() and not b.cancelled()
            assert s.free_slots == 0
            assert s.waiting == 0
            s.release(1)
            assert s.free_slots == 1
        finally:
            b.cancel()
            await settle()

    asyncio.run(main())


@pytest.mark.parametrize(
    "queue_timeout", [None, pytest.param(600.0, id="600.0")]
)
def test_task_cancelled_as_its_slot_is_granted_stops_and_frees_it(queue_timeout):
    # What a request handler does: hold the slots while generating.
    async def main():
        s = Scheduler(1, max_queue=5, queue_timeout=queue_timeout)
        await s.acquire(1)
        body_ran = False

        async def request():
            nonlocal body_ran
            async with s.slots(1):
                body_ran = True
                await asyncio.sleep(3600)

        task = asyncio.create_task(request())
        await settle()
        s.release(1)  # the slot is granted to the waiting request...
        task.cancel()  # ...just as its client goes away
        await settle()
        try:
            assert task.cancelled()
            assert not body_ran
            assert s.free_slots == 1
        finally:
            task.cancel()
            await settle()

    asyncio.run(main())


def test_release_wakes_the_next_waiter():
    async def main():
        s = Scheduler(1, max_queue=5, queue_timeout=None)
        await s.acquire(1)
        got = asyncio.Event()

        async def waiter():
            await s.acquire(1)
            got.set()

        t = asyncio.create_task(waiter())
        await settle()
        assert not got.is_set()
        s.release(1)
        await asyncio.wait_for(got.wait(), 1)
        await t

    asyncio.run(main())


def test_many_concurrent_users_never_exceed_slots():
    async def main():
        s = Scheduler(3, max_queue=100, queue_timeout=None)
        in_use = 0
        peak = 0

        async def user(n):
            nonlocal in_use, peak
            async with s.slots(n):
                in_use += n
                peak = max(peak, in_use)
                assert in_use <= 3
                await asyncio.sleep(0)
                in_use -= n

        await asyncio.gather(*(user(1 + i % 3) for i in range(60)))
        assert peak == 3
        assert s.free_slots == 3
        assert s.waiting == 0

    asyncio.run(main())
