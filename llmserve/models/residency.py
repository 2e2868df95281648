"""Which models stay loaded: the rules, as plain functions of the models' slots, so that
they can be read (and tested) apart from the loading and unloading that follow them.

- A model is *busy* while a request holds it (a lease: from its lookup to its answer's
  end) or its scheduler or batcher has work (a background run outlives its request).
- A busy model is never unloaded: not by the limit, not by keep-alive, not for memory.
- When a model must load and `--max-loaded-models` is reached (or memory is short), the
  least recently used idle model goes first.
- A model loaded on demand that has been idle `--keep-alive` seconds goes; one loaded at
  start (`load_at_start`, the one-model default) stays unless the limit needs its room.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Literal, Protocol

from llmserve.engines.base import EngineHealth
from llmserve.models.entries import ModelEntry

State = Literal["unloaded", "loading", "running", "unloading", "failed"]


class Served(Protocol):
    """A loaded model as the registry handles it (models.ServedModel, ServedEmbedder)."""

    name: str

    def busy(self) -> bool: ...

    def health(self) -> EngineHealth: ...

    @property
    def pid(self) -> int | None: ...

    async def start(self) -> None: ...

    async def stop(self) -> None: ...


@dataclass(eq=False)
class Slot:
    """One servable model and where it stands."""

    entry: ModelEntry
    state: State = "unloaded"
    served: Served | None = None
    reason: str | None = None  # why it failed to load
    leases: int = 0  # requests holding it (or waiting for it to load)
    waiting: int = 0  # requests waiting for it to load
    last_used: float = 0.0  # when a request last took or gave it back
    estimate: int | None = None  # bytes it is expected to take once loaded
    loads: int = 0
    unloads: int = 0
    load_seconds: float = 0.0  # the latest load's
    task: asyncio.Task[None] | None = field(default=None, repr=False)

    @property
    def name(self) -> str:
        return self.entry.name

    def busy(self) -> bool:
        return self.leases > 0 or (self.served is not None and self.served.busy())


def occupying(slots: Iterable[Slot]) -> list[Slot]:
    """The slots counted against --max-loaded-models: loaded, or on their way in or out."""
    return [s for s in slots if s.state in ("loading", "running", "unloading")]


def evictable(slots: Iterable[Slot]) -> list[Slot]:
    """Running models that nothing holds, least recently used first."""
    return sorted((s for s in slots if s.state == "running" and not s.busy()),
                  key=lambda s: s.last_used)


def expired(slots: Iterable[Slot], now: float, keep_alive: float | None) -> list[Slot]:
    """The idle models keep-alive unloads now (none when keep-alive is for ever)."""
    if keep_alive is None:
        return []
    return [s for s in evictable(slots)
            if not s.entry.load_at_start and now - s.last_used >= keep_alive]


def over_limit(slots: Iterable[Slot], max_loaded: int | None) -> bool:
    """Whether loading one more model needs another to go first."""
    return max_loaded is not None and len(occupying(slots)) >= max_loaded
