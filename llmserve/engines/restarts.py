"""When to restart a crashed engine: after 1 s, then 2, 4, ... up to 30 s after further
crashes; after 5 crashes within 5 minutes, never (until the server is restarted). One rule
for engines in child processes (engines/process.py) and vLLM's engine core (engines/vllm.py).
A child process that stalls (makes no progress for `stall_timeout` seconds) is one more crash.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass


@dataclass(frozen=True)
class RestartPolicy:
    first_delay: float = 1.0  # seconds before the first restart, doubling after each crash
    max_delay: float = 30.0
    max_crashes: int = 5  # this many crashes within `window` seconds: stay down
    window: float = 300.0
    load_timeout: float = 900.0
    # seconds a child process may leave the watchdog's ping unanswered (its decode loop
    # answers between steps, so the longest step must fit); 0: never treated as stalled
    stall_timeout: float = 60.0


class Crashes:
    """Recent crashes, under a policy."""

    def __init__(self, policy: RestartPolicy) -> None:
        self.policy = policy
        self._times: deque[float] = deque()
        self.next_try = 0.0  # time.monotonic() of the next restart

    def record(self) -> float | None:
        """Count a crash now; the seconds to wait before restarting, or None to stay down."""
        now = time.monotonic()
        self._times.append(now)
        while self._times and self._times[0] < now - self.policy.window:
            self._times.popleft()
        n = len(self._times)
        if n >= self.policy.max_crashes:
            return None
        delay = min(self.policy.max_delay, self.policy.first_delay * 2 ** (n - 1))
        self.next_try = now + delay
        return delay

    def given_up(self, reason: str) -> str:
        return (f"{reason}; {len(self._times)} crashes within {self.policy.window:g} s, "
                "not restarting")

    def wait(self) -> int:
        """Whole seconds a client should wait before trying again (Retry-After)."""
        return max(1, int(self.next_try - time.monotonic() + 0.999) + 1)
