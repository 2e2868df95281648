"""Messages to a child process over a real pipe: sending never waits on the reader, what
waits is bounded, and everything arrives in order once the reader reads."""

from __future__ import annotations

import multiprocessing
import time

import pytest

from llmserve.engines.outbox import Outbox, OutboxClosed, OutboxFull

MB = 1024 * 1024


def test_a_reader_that_does_not_read_never_blocks_the_sender():
    ours, theirs = multiprocessing.Pipe()
    outbox = Outbox(ours, name="test", limit=3 * MB)
    big = b"x" * (2 * MB)  # far more than the pipe's buffer
    t0 = time.monotonic()
    outbox.put(("add", 1, big))
    with pytest.raises(OutboxFull):  # nobody reads: the next large one is refused at once
        outbox.put(("add", 2, big))
    outbox.put(("cancel", 1, None), bounded=False)  # small and unbounded: always taken
    assert time.monotonic() - t0 < 1.0
    assert outbox.queued > 2 * MB

    assert theirs.recv() == ("add", 1, big)
    assert theirs.recv() == ("cancel", 1, None)
    deadline = time.monotonic() + 5
    while outbox.queued and time.monotonic() < deadline:
        time.sleep(0.01)
    assert outbox.queued == 0
    outbox.put(("add", 3, big))  # room again
    assert theirs.recv() == ("add", 3, big)
    outbox.close()


def test_a_message_larger_than_the_limit_goes_when_nothing_waits():
    ours, theirs = multiprocessing.Pipe()
    outbox = Outbox(ours, name="test", limit=MB)
    big = b"y" * (2 * MB)
    outbox.put(("add", 1, big))
    assert theirs.recv() == ("add", 1, big)
    outbox.close()


def test_a_reader_gone_closes_the_outbox():
    ours, theirs = multiprocessing.Pipe()
    outbox = Outbox(ours, name="test", limit=MB)
    theirs.close()
    outbox.put(("ping", 1), bounded=False)
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        try:
            outbox.put(("ping", 2), bounded=False)
        except OutboxClosed:
            break
        time.sleep(0.01)
    else:
        raise AssertionError("the outbox never noticed its reader was gone")
