"""Which KV slot a new sequence of the llama.cpp engine runs in.

Two things pull on the choice. A free slot may still hold an earlier prompt's tokens: a new
prompt sharing a prefix with them skips reading that part. And llama.cpp, with one KV stream
per sequence, decodes a batch in one pass only over consecutive seq ids; running sequences
on ids with gaps between them cost a pass per run, every step, for as long as they run (16
sequences in two runs of 8 took about 20% longer per step than in one). So a sequence goes
where it leaves the fewest runs, and takes the cached prefix it wants along: a whole-stream
copy once (a few milliseconds for a small model) beats a slower step for the rest of the
answer.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass

# A cached prefix shorter than this is read again rather than copied to another slot.
MIN_COPY_TOKENS = 16


def runs(ids: Iterable[int]) -> int:
    """How many runs of consecutive ids `ids` make (the passes of one decode step)."""
    ordered = sorted(set(ids))
    return sum(1 for i, sid in enumerate(ordered) if i == 0 or sid != ordered[i - 1] + 1)


def added_runs(taken: Collection[int], sid: int) -> int:
    """How many runs taking `sid` (not in `taken`) adds: 1 alone, 0 beside one run, -1
    joining two. Cheaper than counting runs again, for every free slot of every request."""
    return 1 - (sid - 1 in taken) - (sid + 1 in taken)


@dataclass(frozen=True)
class SlotChoice:
    slot: int  # where the sequence runs
    source: int  # whose cached tokens it starts from: `slot` itself, or a slot to copy
    reused: int  # prompt tokens the cache holds already


def choose_slot(
    free: Collection[int], shared: Mapping[int, int], busy: Collection[int],
    min_copy: int = MIN_COPY_TOKENS,
) -> SlotChoice:
    """The slot for a new sequence among `free` ones, given how many of its prompt tokens each
    free slot holds (`shared`) and the ids running (or about to) in `busy`."""
    taken = set(busy)

    def cost(sid: int) -> int:
        return added_runs(taken, sid)

    best = max(free, key=lambda s: (shared[s], -cost(s), -s))
    compact = min(free, key=lambda s: (cost(s), -shared[s], s))
    if cost(best) <= cost(compact):
        return SlotChoice(best, best, shared[best])
    if shared[best] - shared[compact] >= min_copy:
        return SlotChoice(compact, best, shared[best])
    return SlotChoice(compact, compact, shared[compact])


def plan(
    free: Collection[int], requests: Sequence[tuple[Mapping[int, int], int]],
    busy: Collection[int], min_copy: int = MIN_COPY_TOKENS,
) -> list[tuple[SlotChoice, list[int]]]:
    """Slots for requests admitted together, in order: each is (`shared`, as for
    `choose_slot`; its number of sequences), and gets a choice for its first sequence and
    the slots of the others (copies of the first once its prompt is read). The slot each
    request would like best is held for it against the requests before it, and counts as
    running: a burst of prompts that find their own caches takes them in place, all
    together consecutive, instead of copying them about one by one."""
    left = list(free)
    taken = set(busy)
    favourite = [max(left, key=lambda s: (shared[s], -s)) for shared, _ in requests]
    out: list[tuple[SlotChoice, list[int]]] = []
    for i, (shared, n) in enumerate(requests):
        held = set(favourite[i + 1:]) - {favourite[i]}
        mine = [s for s in left if s not in held]
        if len(mine) < n:
            mine = left
        reserved = held & set(left)
        choice = choose_slot(mine, shared, taken | reserved, min_copy)
        left.remove(choice.slot)
        taken.add(choice.slot)
        others = []
        for _ in range(n - 1):
            pool = [s for s in left if s not in held] or left
            sid = compact_slot(pool, taken | reserved)
            left.remove(sid)
            taken.add(sid)
            others.append(sid)
        out.append((choice, others))
    return out


def compact_slot(free: Collection[int], busy: Collection[int]) -> int:
    """The free slot that leaves the fewest runs (the lowest of equals): for a sequence that
    starts from another's cache (the n choices of one prompt)."""
    taken = set(busy)
    return min(free, key=lambda s: (added_runs(taken, s), s))
