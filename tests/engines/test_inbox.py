"""Messages from a child process read on the event loop, over a real pipe, on asyncio's loop
and on uvloop (which makes the pipe non-blocking): whole messages in order however the bytes
arrive, half a message never blocks the loop, and the end comes once, after the last one."""

from __future__ import annotations

import asyncio
import multiprocessing
import os
import struct
import threading
from multiprocessing.reduction import ForkingPickler

import pytest

from llmserve.engines.inbox import Inbox, _next_frame

MB = 1024 * 1024


def _runners() -> list:
    runners = [pytest.param(asyncio.run, id="asyncio")]
    try:
        import uvloop
    except ImportError:
        return runners
    return [*runners, pytest.param(uvloop.run, id="uvloop")]


def frame(msg: object) -> bytes:
    data = bytes(ForkingPickler.dumps(msg))
    return struct.pack("!i", len(data)) + data


class Received:
    def __init__(self) -> None:
        self.messages: list[object] = []
        self.closed = 0
        self.changed = asyncio.Event()

    def message(self, msg: object) -> None:
        self.messages.append(msg)
        self.changed.set()

    def close(self) -> None:
        self.closed += 1
        self.changed.set()

    async def until(self, done, timeout: float = 5.0) -> None:
        async with asyncio.timeout(timeout):
            while not done():
                self.changed.clear()
                await self.changed.wait()


@pytest.mark.parametrize("run", _runners())
def test_messages_cut_anywhere_arrive_whole_and_in_order_and_half_a_message_never_blocks(run):
    async def main() -> None:
        ours, theirs = multiprocessing.Pipe(duplex=False)
        got = Received()
        inbox = Inbox(ours, asyncio.get_running_loop(), on_message=got.message,
                      on_closed=got.close)
        raw = frame(("step", [(1, [(0, 42, None, None, False, None)])])) + frame(("pong", 7))
        fd = theirs.fileno()
        # the first message and two bytes of the second's header
        cut = len(frame(("step", [(1, [(0, 42, None, None, False, None)])]))) + 2
        os.write(fd, raw[:3])  # not even a whole header
        ticks = 0
        for _ in range(5):  # the loop goes on turning while the rest is missing
            await asyncio.sleep(0.01)
            ticks += 1
        assert ticks == 5 and got.messages == []
        os.write(fd, raw[3:cut])
        await got.until(lambda: len(got.messages) == 1)
        os.write(fd, raw[cut:-1])
        await asyncio.sleep(0.05)
        assert len(got.messages) == 1  # the second lacks its last byte
        os.write(fd, raw[-1:])
        await got.until(lambda: len(got.messages) == 2)
        assert got.messages == [("step", [(1, [(0, 42, None, None, False, None)])]), ("pong", 7)]
        assert got.closed == 0
        theirs.close()
        await got.until(lambda: got.closed)
        assert got.closed == 1
        inbox.close()  # again: nothing happens

    run(main())


@pytest.mark.parametrize("run", _runners())
def test_a_message_far_larger_than_the_pipe_arrives_whole_then_the_end_once(run):
    big = b"x" * (3 * MB)

    async def main() -> None:
        ours, theirs = multiprocessing.Pipe(duplex=False)
        got = Received()
        Inbox(ours, asyncio.get_running_loop(), on_message=got.message, on_closed=got.close)

        def write() -> None:  # the child's way: blocking sends, then its end closes
            theirs.send(("result", 1, big))
            theirs.send(("result", 2, b"small"))
            theirs.close()

        writer = threading.Thread(target=write)
        writer.start()
        await got.until(lambda: got.closed, timeout=20)
        writer.join()
        assert got.messages == [("result", 1, big), ("result", 2, b"small")]
        assert got.closed == 1
        assert ours.closed

    run(main())


def test_a_message_whose_handler_fails_does_not_stop_the_next():
    async def main() -> None:
        ours, theirs = multiprocessing.Pipe(duplex=False)
        got = Received()

        def handle(msg: object) -> None:
            if msg == "bad":
                raise RuntimeError("handler failed")
            got.message(msg)

        Inbox(ours, asyncio.get_running_loop(), on_message=handle, on_closed=got.close)
        theirs.send("bad")
        theirs.send("good")
        theirs.close()
        await got.until(lambda: got.closed)
        assert got.messages == ["good"]

    asyncio.run(main())


def test_the_long_form_of_a_length_is_read():
    # Connection writes -1 and an 8-byte length for a message over 2 GiB: the same rule on a
    # small one, and nothing taken until all of it is there.
    data = bytes(ForkingPickler.dumps(("step", [])))
    framed = bytearray(struct.pack("!i", -1) + struct.pack("!Q", len(data)) + data)
    for cut in (2, 4, 8, 12, len(framed) - 1):
        assert _next_frame(framed[:cut], 0) == (b"", 0)
    assert _next_frame(framed, 0) == (data, len(framed))
