"""Test-only fault injection (LLMSERVE_TEST_FAULT; not a user setting): makes the failures
that the fault-tolerance tests need happen on cue, inside a real engine.

  step:N   the decode loop raises after its Nth step (only in the first engine process)
  seed:S   sampling a sequence whose seed is S raises (a failure of that request alone)
"""

from __future__ import annotations


class InjectedFault(RuntimeError):
    pass


class Faults:
    def __init__(self, spec: str | None = None, *, first_process: bool = True) -> None:
        self._step_at: int | None = None
        self._seed: int | None = None
        self._steps = 0
        for part in (spec or "").split(","):
            kind, _, value = part.strip().partition(":")
            if kind == "step" and first_process:
                self._step_at = int(value)
            elif kind == "seed":
                self._seed = int(value)
            elif kind and kind not in ("step", "seed"):
                raise ValueError(f"unknown fault {part!r}")

    def after_step(self) -> None:
        if self._step_at is None:
            return
        self._steps += 1
        if self._steps >= self._step_at:
            raise InjectedFault(f"injected fault after step {self._steps}")

    def before_sample(self, seed: int | None) -> None:
        if self._seed is not None and seed == self._seed:
            raise InjectedFault(f"injected sampler fault (seed {seed})")
