"""Every servable model by name, and its lifecycle: loaded on its first request (or at
start), each in an engine process of its own, unloaded by the rules of `residency` (the
--max-loaded-models limit, --keep-alive, memory). Routes reach a model only through
`acquire`, which answers with a lease (held until the request's answer ends) or an error:
404 for an unknown name, 503 with the reason for a model that cannot load."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal, Protocol

from llmserve.engines.base import EngineDown, EngineError, EngineHealth
from llmserve.errors import (
    EngineUnavailable,
    InvalidRequest,
    ModelNotFound,
    ModelNotLoaded,
    QueueTimeout,
    ServerBusy,
)
from llmserve.models.entries import Kind, ModelEntry
from llmserve.models.procmem import tree_rss
from llmserve.models.residency import Served, Slot, evictable, expired, over_limit

log = logging.getLogger(__name__)

Clock = Callable[[], float]


class MemoryBudget(Protocol):
    """The memory rule (models/memory.py): what a model needs, and what there is."""

    def estimate(self, entry: ModelEntry) -> int: ...

    def free(self, slots: list[Slot]) -> int:
        """Bytes a new model may take now, without unloading any."""
        ...

    def frees(self, slot: Slot) -> int:
        """Bytes unloading `slot` would give back."""
        ...

    def refusal(self, entry: ModelEntry, need: int, free: int, freeable: int) -> str: ...


@dataclass(frozen=True)
class ModelStatus:
    """One model as `GET /v1/models/status` and `llmserve models` show it."""

    id: str
    aliases: list[str]
    kind: str
    state: str  # unloaded, loading, running, restarting, stalled, unloading, failed
    reason: str | None
    pid: int | None
    memory_bytes: int | None  # resident set of its process tree
    estimate_bytes: int | None
    slots_in_use: int
    slots: int
    waiting: int
    loads: int
    unloads: int
    load_seconds: float


class Lease:
    """A request's hold on a loaded model: it is not unloaded until released (idempotent).
    `served` is the model, or the view of one of its LoRA adapters that was asked for."""

    def __init__(self, registry: ModelRegistry, slot: Slot) -> None:
        assert slot.served is not None
        self.served: Served = slot.served
        self._registry = registry
        self._slot: Slot | None = slot

    def release(self) -> None:
        slot, self._slot = self._slot, None
        if slot is not None:
            self._registry._give_back(slot)


class ModelRegistry:
    def __init__(
        self,
        entries: list[ModelEntry],
        load: Callable[[ModelEntry], Served],
        *,
        max_loaded: int | None = None,
        keep_alive: float | None = 300.0,
        queue_timeout: float | None = 600.0,
        max_queue: int = 256,
        memory: MemoryBudget | None = None,
        clock: Clock = time.monotonic,
    ) -> None:
        self._entries = list(entries)
        self._slots = {e.name: Slot(e) for e in entries if not e.is_adapter}
        self._by_name = {n: self._slots[e.name] for e in entries if not e.is_adapter
                         for n in e.names}
        # LoRA adapters by every name: served by their base's engine, loaded with it
        self._adapters = {n: e for e in entries if e.is_adapter for n in e.names}
        self._adding: set[str] = set()  # adapters being loaded while serving
        self._load = load
        self._max_loaded = max_loaded
        self._keep_alive = keep_alive
        self._queue_timeout = queue_timeout
        self._max_queue = max_queue
        self._memory = memory
        self._clock = clock
        self._changed = asyncio.Event()
        self._keeper: asyncio.Task[None] | None = None
        self.created = int(time.time())

    # -- what there is ----------------------------------------------------------------------

    def entries(self) -> list[ModelEntry]:
        return list(self._entries)

    def names(self) -> list[str]:
        """Every name a request may send (ids and aliases)."""
        return [n for e in self._entries for n in e.names]

    def entry(self, name: str) -> ModelEntry:
        adapter = self._adapters.get(name)
        return adapter if adapter is not None else self._slot(name).entry

    def loaded(self) -> dict[str, Served]:
        """The running models by id (for scrapes: they come and go)."""
        return {n: s.served for n, s in self._slots.items()
                if s.state == "running" and s.served is not None}

    def get(self, name: str) -> Served:
        """A model already loaded (tests, benchmarks); routes use `acquire`."""
        adapter = self._adapters.get(name)
        slot = self._slot(adapter.base if adapter is not None else name)
        if slot.served is None:
            raise ModelNotLoaded(f"The model '{slot.name}' is {slot.state}.")
        return slot.served if adapter is None else _adapted(slot.served, adapter)

    def health(self) -> dict[str, EngineHealth]:
        """The engines of the loaded models."""
        return {n: s.health() for n, s in self.loaded().items()}

    def status(self) -> list[ModelStatus]:
        return [self._adapter_status(e) if e.is_adapter else self._status(self._slots[e.name])
                for e in self._entries]

    def _adapter_status(self, entry: ModelEntry) -> ModelStatus:
        """An adapter stands where its base does, unless it failed to load with it."""
        slot = self._slot(entry.base or "")
        base = self._status(slot)
        state, reason = base.state, base.reason
        if state == "running" and slot.served is not None:
            why = _adapter_problem(slot.served, entry)
            if why is not None:
                state, reason = "failed", why
        return dataclasses.replace(base, id=entry.name, aliases=list(entry.names[1:]),
                                   state=state, reason=reason)

    def _status(self, slot: Slot) -> ModelStatus:
        served = slot.served if slot.state == "running" else None
        state, reason, pid, rss = slot.state, slot.reason, None, None
        in_use = capacity = waiting = 0
        if served is not None:
            health = served.health()
            if not health.ok:  # crashed: restarting, stalled, or given up on
                state, reason = health.state, health.reason
            pid = served.pid
            rss = tree_rss(pid) if pid is not None else None
            scheduler = getattr(served, "scheduler", None)
            if scheduler is not None:
                in_use, capacity = scheduler.slots_in_use, scheduler.capacity
                waiting = scheduler.sequences_waiting
        return ModelStatus(
            id=slot.name, aliases=list(slot.entry.names[1:]), kind=slot.entry.kind,
            state=state, reason=reason, pid=pid, memory_bytes=rss,
            estimate_bytes=slot.estimate, slots_in_use=in_use, slots=capacity,
            waiting=waiting + slot.waiting, loads=slot.loads, unloads=slot.unloads,
            load_seconds=round(slot.load_seconds, 3),
        )

    def _slot(self, name: str) -> Slot:
        slot = self._by_name.get(name)
        if slot is None:
            raise self._not_found(name)
        return slot

    def _not_found(self, name: str) -> ModelNotFound:
        served = ", ".join(e.name for e in self._entries)
        return ModelNotFound(f"The model '{name}' does not exist. Served: {served}.",
                             param="model")

    # -- taking a model -----------------------------------------------------------------

    async def acquire(self, name: str, use: Use) -> Lease:
        """The model named `name`, loaded, held until the lease is released. Waits while it
        loads (or while room is made for it), at most the queue timeout; refuses at once
        a model of another kind (400), a full line (429), a failed load (503). A LoRA
        adapter's name takes its base, and the lease serves the adapter."""
        adapter = self._adapters.get(name)
        if adapter is not None:
            _check_kind(adapter, name, use)  # refused under its own name, not its base's
            lease = await self.acquire(adapter.base or "", use)
            try:
                lease.served = _adapted(lease.served, adapter)
            except BaseException:
                lease.release()
                raise
            return lease
        slot = self._slot(name)
        _check_kind(slot.entry, name, use)
        if slot.state == "running":
            return self._take(slot)
        if slot.state == "failed":
            raise self._failed(slot)
        if slot.waiting >= self._max_queue:
            raise ServerBusy(
                f"The model '{slot.name}' is loading and {slot.waiting} requests already "
                "wait for it. Retry later.", headers={"Retry-After": "1"})
        slot.waiting += 1
        slot.leases += 1  # held from now: once loaded, nothing unloads it before we take it
        try:
            try:
                async with asyncio.timeout(self._queue_timeout):
                    while slot.state != "running":
                        if slot.state == "failed":
                            raise self._failed(slot)
                        if slot.state != "unloaded" or not self._make_room_or_load(slot):
                            await self._wait_for_change()
            except TimeoutError:
                raise QueueTimeout(
                    f"The model '{slot.name}' was not loaded within {self._queue_timeout:g} s "
                    f"({self._why_waiting(slot)}). Retry later.",
                    headers={"Retry-After": "1"}) from None
        except BaseException:
            slot.leases -= 1
            self._notify()
            raise
        finally:
            slot.waiting -= 1
        slot.leases -= 1
        return self._take(slot)

    def _take(self, slot: Slot) -> Lease:
        slot.leases += 1
        slot.last_used = self._clock()
        return Lease(self, slot)

    def _give_back(self, slot: Slot) -> None:
        slot.leases -= 1
        slot.last_used = self._clock()
        self._notify()

    def _failed(self, slot: Slot) -> ModelNotLoaded:
        return ModelNotLoaded(f"The model '{slot.name}' failed to load: {slot.reason}",
                              headers={"Retry-After": "30"})

    def _why_waiting(self, slot: Slot) -> str:
        if slot.state == "loading":
            return "it is still loading"
        return (f"{len([s for s in self._slots.values() if s.state != 'unloaded'])} models "
                "are loaded and busy")

    def _make_room_or_load(self, slot: Slot) -> bool:
        """Begin loading `slot` if there is room; else begin unloading the least recently
        used idle model (False: wait for a change). Refuses a model that cannot fit in
        memory even with every idle model unloaded."""
        slots = list(self._slots.values())
        short = 0
        if self._memory is not None:
            if slot.estimate is None:
                slot.estimate = self._memory.estimate(slot.entry)
            free = self._memory.free(slots)
            short = slot.estimate - free
            if short > 0:
                idle = evictable(slots)
                freeable = sum(self._memory.frees(s) for s in idle) + sum(
                    self._memory.frees(s) for s in slots if s.state == "unloading")
                if short > freeable:
                    raise ModelNotLoaded(self._memory.refusal(
                        slot.entry, slot.estimate, free, freeable))
        if not short > 0 and not over_limit(slots, self._max_loaded):
            self._begin_load(slot)
            return True
        if any(s.state == "unloading" for s in slots):
            return False  # room is on its way
        idle = evictable(slots)
        if idle:
            victim = idle[0]
            why = ("memory is short" if short > 0
                   else f"--max-loaded-models {self._max_loaded} reached")
            self._unload(victim, f"evicted for '{slot.name}' ({why}; idle "
                                 f"{self._clock() - victim.last_used:.0f} s)")
        return False

    async def _wait_for_change(self) -> None:
        await self._changed.wait()

    def _notify(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()

    # -- LoRA adapters while serving --------------------------------------------------------

    async def add_adapter(self, entry: ModelEntry) -> None:
        """Serve the adapter `entry` from now on: loaded into its base's engine at once if
        the base runs (else with the base, when it loads). 400 for a name taken or a file its
        engine cannot load (with the reason), 404 for an unknown base."""
        name = entry.name
        if name in self._adapters or name in self._by_name or name in self._adding:
            raise InvalidRequest(f"The model '{name}' exists already: unload it first.",
                                 param="lora_name")
        slot = self._slot(entry.base or "")
        if slot.entry.kind != "chat":
            raise InvalidRequest(f"'{slot.name}' is not a chat model: it takes no LoRA adapter.",
                                 param="base_model")
        entry = dataclasses.replace(entry, base=slot.name)
        self._adding.add(name)
        try:
            # a load or unload under way has read the adapter list already: wait for its end
            async with asyncio.timeout(self._queue_timeout):
                while slot.state in ("loading", "unloading"):
                    await self._wait_for_change()
        except BaseException as exc:
            self._adding.discard(name)
            if isinstance(exc, TimeoutError):
                raise QueueTimeout(f"The model '{slot.name}' did not finish loading within "
                                   f"{self._queue_timeout:g} s. Retry later.",
                                   headers={"Retry-After": "1"}) from None
            raise
        # shielded: a client that hangs up meanwhile must not leave the engine serving an
        # adapter the list does not know (nor its name taken for ever)
        await asyncio.shield(asyncio.ensure_future(self._serve_adapter(slot, entry)))

    async def _serve_adapter(self, slot: Slot, entry: ModelEntry) -> None:
        try:
            if slot.state == "running" and slot.served is not None:
                await _engine_load(slot.served, entry)
            self._entries.append(entry)
            self._adapters[entry.name] = entry
        finally:
            self._adding.discard(entry.name)
        log.info("LoRA adapter %s of %s served from %s", entry.name, slot.name, entry.path)

    async def remove_adapter(self, name: str) -> None:
        """Stop serving the adapter `name` (404 if there is none): refused from now on, the
        requests under way finish under it."""
        entry = self._adapters.get(name)
        if entry is None or entry.name != name:
            raise ModelNotFound(f"The LoRA adapter '{name}' cannot be found.", param="lora_name")
        self._entries.remove(entry)
        for n in entry.names:
            self._adapters.pop(n, None)
        slot = self._by_name.get(entry.base or "")
        if slot is not None and slot.state == "running" and slot.served is not None:
            unload = getattr(slot.served.engine, "unload_adapter", None)
            if unload is not None:
                with contextlib.suppress(EngineDown):  # gone with its engine, not in its spec
                    await unload(name)
        log.info("LoRA adapter %s unloaded", name)

    # -- loading and unloading --------------------------------------------------------------

    def _begin_load(self, slot: Slot) -> None:
        slot.state, slot.reason = "loading", None
        log.debug("loading %s from %s", slot.name, slot.entry.path)
        slot.task = asyncio.get_running_loop().create_task(self._load_now(slot))

    async def _load_now(self, slot: Slot) -> None:
        started = self._clock()
        try:
            served = await asyncio.to_thread(self._load, slot.entry)
            await served.start()
        except Exception as exc:  # noqa: BLE001 - its requests get the reason
            slot.state, slot.reason = "failed", str(exc) or type(exc).__name__
            log.error("model %s failed to load: %s", slot.name, slot.reason)
        else:
            self._loaded(slot, served, self._clock() - started)
        finally:
            slot.task = None
            self._notify()

    def _loaded(self, slot: Slot, served: Served, seconds: float) -> None:
        slot.served, slot.state = served, "running"
        slot.loads += 1
        slot.load_seconds = seconds
        slot.last_used = self._clock()
        log.info("model %s loaded in %.1f s (%s)", slot.name, seconds, slot.entry.path)

    def _unload(self, slot: Slot, why: str) -> None:
        slot.state = "unloading"
        slot.task = asyncio.get_running_loop().create_task(self._unload_now(slot, why))

    async def _unload_now(self, slot: Slot, why: str) -> None:
        served = slot.served
        try:
            if served is not None:
                await served.stop()
        finally:
            slot.served, slot.state, slot.task = None, "unloaded", None
            slot.unloads += 1
            log.info("model %s unloaded: %s", slot.name, why)
            self._notify()

    async def _keep(self) -> None:
        """Keep-alive: unload what has been idle too long, checked a few times a period."""
        assert self._keep_alive is not None
        period = min(max(self._keep_alive / 4, 0.25), 5.0)
        while True:
            await asyncio.sleep(period)
            for slot in expired(self._slots.values(), self._clock(), self._keep_alive):
                self._unload(slot, f"idle for {self._clock() - slot.last_used:.0f} s "
                                   f"(--keep-alive {self._keep_alive:g} s)")

    # -- the server's start and stop --------------------------------------------------------

    def preload(self) -> None:
        """Load the models marked to load at start, before the server listens (blocking,
        in order); a failure raises and the server does not start."""
        for slot in self._slots.values():
            if slot.entry.load_at_start and slot.state == "unloaded":
                if self._memory is not None:  # shown in the status; the one model is not refused
                    slot.estimate = self._memory.estimate(slot.entry)
                started = self._clock()
                served = self._load(slot.entry)
                self._loaded(slot, served, self._clock() - started)

    async def start(self) -> None:
        """Start watching the preloaded engines (from the server's event loop)."""
        for slot in self._slots.values():
            if slot.served is not None:
                await slot.served.start()
        if self._keep_alive is not None:
            self._keeper = asyncio.get_running_loop().create_task(self._keep())

    async def stop(self) -> None:
        if self._keeper is not None:
            self._keeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._keeper
        # a load under way ends first (its thread cannot be interrupted), then everything stops
        tasks = [s.task for s in self._slots.values() if s.task is not None]
        if tasks:
            await asyncio.wait(tasks)
        for slot in self._slots.values():
            if slot.served is not None:
                await slot.served.stop()
                slot.served, slot.state = None, "unloaded"


def _adapter_problem(served: Served, entry: ModelEntry) -> str | None:
    """Why the loaded `served` cannot serve the adapter `entry`, if it cannot."""
    engine = getattr(served, "engine", None)
    adapters = getattr(engine, "adapters", {}) if engine is not None else {}
    if entry.name not in adapters:
        return "its base's engine does not load LoRA adapters (llama.cpp's does)"
    return adapters[entry.name]


async def _engine_load(served: Served, entry: ModelEntry) -> None:
    load = getattr(getattr(served, "engine", None), "load_adapter", None)
    if load is None:
        raise InvalidRequest(f"The engine of '{entry.base}' does not load LoRA adapters while "
                             "serving.", param="base_model")
    try:
        await load(entry.name, str(entry.path), entry.scale)
    except EngineDown as exc:
        raise EngineUnavailable(f"The engine of '{entry.base}' is down: {exc}",
                                headers={"Retry-After": "1"}) from None
    except EngineError as exc:
        raise InvalidRequest(f"The LoRA adapter '{entry.name}' could not be loaded: {exc}",
                             param="lora_path") from None


def _adapted(served: Served, entry: ModelEntry) -> Served:
    """The view of a loaded chat model that decodes with the adapter `entry`."""
    why = _adapter_problem(served, entry)
    if why is not None:
        raise ModelNotLoaded(f"The model '{entry.name}' (a LoRA adapter of '{entry.base}') "
                             f"cannot be served: {why}", headers={"Retry-After": "30"})
    return served.adapted(entry.name)  # type: ignore[attr-defined]


# What a route wants, and the kinds of model that serve it.
Use = Literal["chat", "embedding", "score"]
_SERVES: dict[str, tuple[Kind, ...]] = {
    "chat": ("chat",), "embedding": ("embedding",), "score": ("rerank", "embedding")}
_CHAT_ROUTES = "/v1/chat/completions, /v1/completions and /v1/responses"
_SCORE_ROUTES = "/v1/rerank and /v1/score"


def _check_kind(entry: ModelEntry, name: str, use: Use) -> None:
    """A 400 for a model of the wrong kind for the route, before anything loads."""
    if entry.kind in _SERVES[use]:
        return
    if use == "embedding":
        raise InvalidRequest(f"The model '{name}' does not make embeddings.", param="model")
    if use == "score":
        raise InvalidRequest(
            f"The model '{name}' is a chat model: it serves {_CHAT_ROUTES}; {_SCORE_ROUTES} "
            "need a reranker or an embedding model.", param="model")
    if entry.kind == "embedding":
        raise InvalidRequest(f"The model '{name}' is an embedding model: use /v1/embeddings.",
                             param="model")
    raise InvalidRequest(f"The model '{name}' is a reranker: it serves {_SCORE_ROUTES}.",
                         param="model")
