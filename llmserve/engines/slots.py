"""Which KV slot a new sequence of the llama.cpp engine runs in.

Two things pull on the choice. A free slot may still hold an earlier prompt's tokens: a new
prompt sharing a prefix with them skips reading that part. And llama.cpp, with one KV stream
per sequence, decodes a batch in one pass only over consecutive seq ids; running sequences
on ids with gaps between them cost a pass per run, every step, for as long as they run (16
sequences in two runs of 8 took about 20% longer per step than in one). So a sequence goes
where it leaves the fewest runs, and takes the cached prefix it wants along: a whole-stream
copy once (a few milliseconds for a small model) beats a slower step for the rest of the
answer.

A slot's cache is also worth keeping for later: a new conversation should not overwrite the
one a client is about to continue. So among equals the least recently used slot (an empty one
first) is taken. A cache is copied only to save runs, not to keep its source whole: llama.cpp
copies a whole stream, used or not (47 MB for the bundled model at 2048 cells, over 500 MB for
a 7B model with grouped-query attention at 4096), and this did it at every repeated prompt, for
a cache that may never be asked for again.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field

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


@dataclass(frozen=True)
class SlotCaches:
    """When each free slot's cache was last released (`used`, higher is later; an empty slot
    -1). Unknown slots: nothing to lose, all equal."""

    used: Mapping[int, int] = field(default_factory=dict)

    def age(self, sid: int) -> int:
        return self.used.get(sid, 0)


def choose_slot(
    free: Collection[int], shared: Mapping[int, int], busy: Collection[int],
    min_copy: int = MIN_COPY_TOKENS, caches: SlotCaches = SlotCaches(),
) -> SlotChoice:
    """The slot for a new sequence among `free` ones, given how many of its prompt tokens each
    free slot holds (`shared`), the ids running (or about to) in `busy`, and the free slots'
    caches."""
    taken = set(busy)

    def cost(sid: int) -> int:
        return added_runs(taken, sid)

    best = max(free, key=lambda s: (shared[s], -cost(s), -caches.age(s), -s))
    # Where a sequence goes when no cache is worth carrying: fewest runs, least recently used.
    spare = min(free, key=lambda s: (cost(s), caches.age(s), -shared[s], s))
    if shared[best] - shared[spare] < min_copy:
        return SlotChoice(spare, spare, shared[spare])
    if cost(spare) < cost(best):  # copied next to the running ones
        return SlotChoice(spare, best, shared[best])
    return SlotChoice(best, best, shared[best])


def plan(
    free: Collection[int], requests: Sequence[tuple[Mapping[int, int], int]],
    busy: Collection[int], min_copy: int = MIN_COPY_TOKENS, caches: SlotCaches = SlotCaches(),
) -> list[tuple[SlotChoice, list[int]]]:
    """Slots for requests admitted together, in order: each is (`shared`, as for
    `choose_slot`; its number of sequences), and gets a choice for its first sequence and
    the slots of the others (copies of the first once its prompt is read). The slot each
    request would like best is held for it against the requests before it, and counts as
    running: a burst of prompts that find their own caches takes them in place, all
    together consecutive, instead of copying them about one by one."""
    left = list(free)
    taken = set(busy)
    favourite = [max(left, key=lambda s: (shared[s], -caches.age(s), -s))
                 for shared, _ in requests]
    out: list[tuple[SlotChoice, list[int]]] = []
    for i, (shared, n) in enumerate(requests):
        held = set(favourite[i + 1:]) - {favourite[i]}
        mine = [s for s in left if s not in held]
        if len(mine) < n:
            mine = left
        reserved = held & set(left)
        choice = choose_slot(mine, shared, taken | reserved, min_copy, caches)
        left.remove(choice.slot)
        taken.add(choice.slot)
        others = []
        for _ in range(n - 1):
            pool = [s for s in left if s not in held] or left
            sid = compact_slot(pool, taken | reserved, caches)
            left.remove(sid)
            taken.add(sid)
            others.append(sid)
        out.append((choice, others))
    return out


def compact_slot(
    free: Collection[int], busy: Collection[int], caches: SlotCaches = SlotCaches()
) -> int:
    """The free slot that leaves the fewest runs (the least recently used, then the lowest,
    of equals): for a sequence that starts from another's cache (the n choices of a prompt)."""
    taken = set(busy)
    return min(free, key=lambda s: (added_runs(taken, s), caches.age(s), s))
