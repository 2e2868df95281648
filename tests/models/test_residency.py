"""Which models stay loaded: LRU under --max-loaded-models, keep-alive, busy ones kept."""

from __future__ import annotations

from pathlib import Path

from llmserve.models.entries import ModelEntry
from llmserve.models.residency import Slot, evictable, expired, occupying, over_limit


def slot(name: str, state: str = "running", last_used: float = 0.0, leases: int = 0,
         at_start: bool = False) -> Slot:
    return Slot(ModelEntry((name,), Path(name), load_at_start=at_start), state=state,
                last_used=last_used, leases=leases)


def test_least_recently_used_idle_model_goes_first():
    a, b, c = slot("a", last_used=30), slot("b", last_used=10), slot("c", last_used=20)
    assert evictable([a, b, c]) == [b, c, a]


def test_a_model_with_requests_is_never_evicted():
    held = slot("held", last_used=0, leases=1)
    idle = slot("idle", last_used=50)
    assert evictable([held, idle]) == [idle]
    assert evictable([held]) == []


def test_only_running_models_are_evicted():
    states = ["unloaded", "loading", "unloading", "failed"]
    assert evictable([slot(s, state=s) for s in states]) == []


def test_the_limit_counts_models_loading_and_unloading():
    slots = [slot("a"), slot("b", state="loading"), slot("c", state="unloading"),
             slot("d", state="unloaded"), slot("e", state="failed")]
    assert [s.name for s in occupying(slots)] == ["a", "b", "c"]
    assert over_limit(slots, 3) and not over_limit(slots, 4)
    assert not over_limit(slots, None)


def test_keep_alive_unloads_idle_models_loaded_on_demand():
    old, recent = slot("old", last_used=0), slot("recent", last_used=250)
    busy = slot("busy", last_used=0, leases=2)
    pinned = slot("pinned", last_used=0, at_start=True)
    slots = [old, recent, busy, pinned]
    assert expired(slots, now=300, keep_alive=300) == [old]
    assert expired(slots, now=549, keep_alive=300) == [old]
    assert expired(slots, now=550, keep_alive=300) == [old, recent]
    assert expired(slots, now=10_000, keep_alive=None) == []  # for ever
    assert expired([old], now=0, keep_alive=0) == [old]  # right after its last request
