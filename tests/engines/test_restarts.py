"""The restart rule shared by child-process engines and vLLM's engine core."""

from __future__ import annotations

from llmserve.engines.restarts import Crashes, RestartPolicy


def test_delays_double_up_to_the_cap_then_give_up():
    crashes = Crashes(RestartPolicy(first_delay=1, max_delay=3, max_crashes=4, window=60))
    assert [crashes.record() for _ in range(3)] == [1, 2, 3]
    assert 1 <= crashes.wait() <= 5
    assert crashes.record() is None
    assert "4 crashes within 60 s, not restarting" in crashes.given_up("it died")


def test_crashes_older_than_the_window_are_forgotten(monkeypatch):
    now = [1000.0]
    monkeypatch.setattr("llmserve.engines.restarts.time.monotonic", lambda: now[0])
    crashes = Crashes(RestartPolicy(first_delay=1, max_crashes=2, window=10))
    assert crashes.record() == 1
    now[0] += 11
    assert crashes.record() == 1  # the first one is out of the window
    assert crashes.record() is None
