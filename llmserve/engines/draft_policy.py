"""When a draft pays: how many guessed tokens to verify in a step, from what a step costs with
that many more tokens (measured on this machine) and how often this sequence's guesses have
been right.

A step that decodes a sequence's next token plus `d` drafted ones gives, if each guess is right
with probability `p` (independently, as a first approximation), 1 + p + ... + p^d tokens on
average, and costs `cost[d] / cost[0]` times a plain step. Verification is nearly free where a
step's cost hardly grows with its tokens (a GPU, a CPU with matrix units, a larger model) and
costs almost a full step per token where it grows linearly (small models on AVX2 CPUs): there
only a sequence that copies its input wins. The policy drafts the length with the best
expected tokens per unit of time, and none when no length beats a plain step.

The costs measured at load are refined by every step a sequence alone takes (a measurement
skewed by other work on the machine is corrected as the real steps come). Guesses are scored
even when not drafted (the proposal is compared with the token that was
sampled), so a sequence whose output turns into a copy is noticed at no cost.
"""

from __future__ import annotations

from collections.abc import Sequence


class Acceptance:
    """A running estimate of how often a sequence's guesses are right."""

    __slots__ = ("p",)

    WEIGHT = 0.15  # of the newest outcome: about the last dozen guesses count

    def __init__(self, prior: float) -> None:
        self.p = prior

    def update(self, right: int, wrong: int) -> None:
        for _ in range(right):
            self.p += self.WEIGHT * (1.0 - self.p)
        if wrong:
            self.p -= self.WEIGHT * self.p


class DraftPolicy:
    """`length(p, available)`: how many of `available` guessed tokens to verify next step."""

    WEIGHT = 0.05  # of a step's observed cost in its length's running estimate

    def __init__(self, step_cost: Sequence[float], *, margin: float = 1.05) -> None:
        """`step_cost[d]`: seconds of a step decoding one token plus `d` drafted ones."""
        if not step_cost or min(step_cost) <= 0:
            raise ValueError("step costs must be positive")
        self.step_cost = list(step_cost)
        self.margin = margin
        self._ratios()

    def _ratios(self) -> None:
        base = self.step_cost[0]
        # a step with more tokens never costs less than one with fewer (noise aside)
        ratios, top = [], 1.0
        for c in self.step_cost:
            top = max(top, c / base)
            ratios.append(top)
        self.cost_ratio: tuple[float, ...] = tuple(ratios)

    def observe(self, d: int, seconds: float) -> None:
        """A step with `d` drafted tokens took `seconds`."""
        if 0 <= d < len(self.step_cost) and seconds > 0:
            self.step_cost[d] += self.WEIGHT * (seconds - self.step_cost[d])
            self._ratios()

    @property
    def max_length(self) -> int:
        return len(self.cost_ratio) - 1

    def gain(self, p: float, d: int) -> float:
        """Expected tokens per unit of time with `d` drafted tokens, against a plain step."""
        expected = sum(p ** i for i in range(d + 1))
        return expected / self.cost_ratio[d]

    def length(self, p: float, available: int) -> int:
        best, best_gain = 0, self.margin
        for d in range(1, min(available, self.max_length) + 1):
            g = self.gain(p, d)
            if g > best_gain:
                best, best_gain = d, g
        return best
