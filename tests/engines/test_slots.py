"""Slot choice for the llama.cpp engine: the longest cached prefix, without splitting the
running sequences into more runs of consecutive ids than needed."""

from __future__ import annotations

from llmserve.engines.slots import (
    SlotCaches,
    SlotChoice,
    added_runs,
    choose_slot,
    compact_slot,
    plan,
    runs,
)


def test_runs_counts_breaks_between_consecutive_ids():
    assert runs([]) == 0
    assert runs([3]) == 1
    assert runs([2, 0, 1]) == 1
    assert runs([0, 1, 3, 4, 9]) == 3


def test_idle_engine_takes_the_longest_prefix_in_place():
    free = range(8)
    shared = {s: 0 for s in free} | {5: 40}
    assert choose_slot(free, shared, busy=[]) == SlotChoice(5, 5, 40)


def test_equal_prefixes_go_to_the_slot_that_adds_no_run():
    free = [0, 4, 6]
    shared = {0: 20, 4: 20, 6: 20}
    assert choose_slot(free, shared, busy=[2, 3]) == SlotChoice(4, 4, 20)


def test_a_long_prefix_in_a_distant_slot_is_copied_next_to_the_running_ones():
    free = [0, 3, 7]
    shared = {0: 20, 3: 20, 7: 90}
    assert choose_slot(free, shared, busy=[1, 2]) == SlotChoice(0, 7, 90)


def test_a_prefix_too_short_to_copy_is_read_again_in_the_compact_slot():
    free = [3, 7]
    shared = {3: 20, 7: 30}
    assert choose_slot(free, shared, busy=[1, 2], min_copy=16) == SlotChoice(3, 3, 20)


def test_a_distant_slot_that_fills_a_gap_is_taken_in_place():
    free = [2, 9]
    shared = {2: 50, 9: 0}
    assert choose_slot(free, shared, busy=[0, 1, 3]) == SlotChoice(2, 2, 50)


def test_compact_slot_joins_the_run():
    assert compact_slot([0, 5, 9], busy=[6, 7]) == 5
    assert compact_slot([0, 5, 9], busy=[]) == 0


def test_a_burst_finding_its_own_caches_takes_them_in_place():
    """Four arrive together, each prompt cached in a slot of its own, out of order: each
    takes its own in place (no copy), and the four are consecutive."""
    free = range(4)
    own = [3, 1, 0, 2]  # request i's prompt is cached in slot own[i]
    requests = [({s: 40 if s == own[i] else 10 for s in free}, 1) for i in range(4)]
    planned = plan(free, requests, busy=[])
    assert [(c.slot, c.source, c.reused) for c, _ in planned] == [(s, s, 40) for s in own]


def test_a_burst_closes_a_gap_with_one_copy():
    """Caches in slots 3, 5, 1, 4: in place they would leave slot 2 empty between 1 and 3
    (two runs every step); the one in 5 is copied into 2 instead."""
    free = range(6)
    own = [3, 5, 1, 4]
    requests = [({s: 40 if s == own[i] else 10 for s in free}, 1) for i in range(4)]
    planned = plan(free, requests, busy=[])
    assert [(c.slot, c.source, c.reused) for c, _ in planned] == [
        (3, 3, 40), (2, 5, 40), (1, 1, 40), (4, 4, 40)]


def test_a_request_does_not_take_the_slot_a_later_one_wants():
    free = [0, 1, 2]
    requests = [({0: 10, 1: 10, 2: 10}, 1), ({0: 10, 1: 50, 2: 10}, 1)]
    [(first, _), (second, _)] = plan(free, requests, busy=[])
    assert first.slot != 1 and second == SlotChoice(1, 1, 50)


def test_plan_gives_the_other_choices_consecutive_slots():
    [(choice, others)] = plan(range(8), [({s: 0 for s in range(8)}, 3)], busy=[4])
    assert runs([4, choice.slot, *others]) == 1


def test_added_runs_is_the_change_in_runs():
    taken = {1, 2, 5, 7}
    for sid in (0, 3, 4, 6, 9):
        assert added_runs(taken, sid) == runs(taken | {sid}) - runs(taken)


def test_a_new_conversation_takes_an_empty_slot_not_the_last_one_used():
    """At one stream the slot just released holds the conversation its client is about to
    continue: an unrelated prompt goes to an empty slot."""
    free = range(4)
    caches = SlotCaches(used={0: 5, 1: -1, 2: -1, 3: -1})
    assert choose_slot(free, {s: 0 for s in free}, busy=[], caches=caches) == SlotChoice(1, 1, 0)


def test_with_every_slot_holding_a_cache_the_least_recently_used_is_overwritten():
    free = range(3)
    caches = SlotCaches(used={0: 3, 1: 1, 2: 2})
    assert choose_slot(free, {s: 0 for s in free}, busy=[], caches=caches) == SlotChoice(1, 1, 0)


def test_a_shared_system_prompt_is_read_in_place_not_copied_to_keep_the_rest():
    """Copies are only for saving runs (engines/slots.py says why): a prompt sharing a
    system prompt with a slot's cache starts from that slot itself."""
    free = range(4)
    caches = SlotCaches(used={0: 5, 1: -1, 2: -1, 3: -1})
    shared = {0: 30, 1: 0, 2: 0, 3: 0}
    assert choose_slot(free, shared, busy=[], caches=caches) == SlotChoice(0, 0, 30)


def test_a_conversation_continued_takes_its_own_slot_in_place():
    free = range(4)
    caches = SlotCaches(used={0: 5, 1: -1, 2: -1, 3: -1})
    shared = {0: 80, 1: 0, 2: 0, 3: 0}
    assert choose_slot(free, shared, busy=[], caches=caches) == SlotChoice(0, 0, 80)


def test_plan_keeps_recent_caches_for_a_burst_of_new_prompts():
    free = range(6)
    caches = SlotCaches(used={s: s + 1 if s < 2 else -1 for s in free})
    planned = plan(free, [({s: 0 for s in free}, 1)] * 2, busy=[], caches=caches)
    assert sorted(c.slot for c, _ in planned) == [2, 3]
