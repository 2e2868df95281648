"""The memory rule: before a model loads, what it will take (its weights, as their files'
sizes, plus its KV cache in f16 for its context x max_sequences, from the GGUF metadata or
config.json, plus a process's own overhead), against what there is: `--memory-limit` less
what the loaded models take, or MemAvailable from /proc/meminfo. A model that does not fit
even with every idle model unloaded is refused (503 model_not_loaded, with the numbers)
rather than left to swap or to the OOM killer."""

from __future__ import annotations

import json
import struct
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

from llmserve.config import Settings
from llmserve.models.entries import ModelEntry
from llmserve.models.procmem import mem_available, tree_rss
from llmserve.models.residency import Slot, occupying

# An engine process's own: the interpreter, torch or llama.cpp, buffers (measured: an
# engine process of the bundled 135M model holds ~250 MiB besides its weights).
PROCESS_OVERHEAD = 256 * 1024 * 1024
KV_BYTES = 2  # f16 per cached number
DEFAULT_CONTEXT = 4096  # models.DEFAULT_CONTEXT (not imported: models imports this)
MIB = 1024 * 1024


def weights_bytes(path: Path) -> int:
    """A GGUF file's size, or a model directory's weight files' sizes together."""
    if path.is_file():
        return path.stat().st_size
    files = [*path.glob("*.safetensors"), *path.glob("*.bin"), *path.glob("*.gguf"),
             *path.glob("*.pt")]
    return sum(f.stat().st_size for f in files)


def kv_shape(path: Path) -> tuple[int, int, int, int | None] | None:
    """(layers, kv heads, head dim, trained context) of a chat model, or None if unknown."""
    try:
        if path.is_file():
            return _gguf_shape(path)
        return _config_shape(path / "config.json")
    except (OSError, ValueError, KeyError, struct.error, ZeroDivisionError, TypeError):
        return None


def _config_shape(config: Path) -> tuple[int, int, int, int | None] | None:
    c = json.loads(config.read_text())
    c = c.get("text_config", c)
    if "num_hidden_layers" not in c:
        return None
    heads = c["num_attention_heads"]
    kv_heads = c.get("num_key_value_heads") or heads
    head_dim = c.get("head_dim") or c["hidden_size"] // heads
    return c["num_hidden_layers"], kv_heads, head_dim, c.get("max_position_embeddings")


def estimate_bytes(entry: ModelEntry, settings: Settings) -> int:
    """What `entry` takes once loaded with `settings` (its own already applied)."""
    total = weights_bytes(entry.path) + PROCESS_OVERHEAD
    if entry.kind != "chat":
        return total
    shape = kv_shape(entry.path)
    if shape is None:
        return total
    layers, kv_heads, head_dim, trained = shape
    context = settings.context_length or DEFAULT_CONTEXT
    context = min(context, trained) if trained else context  # the engines clamp it so
    # keys and values, every layer, every cell of every sequence's own stream
    return total + 2 * layers * kv_heads * head_dim * context * settings.max_sequences * KV_BYTES


class Budget:
    """models registry's MemoryBudget: --memory-limit, or what the kernel says is free."""

    def __init__(self, settings: Settings, *,
                 available: Callable[[], int | None] = mem_available) -> None:
        self._settings = settings
        self._limit = settings.memory_limit
        self._available = available

    def estimate(self, entry: ModelEntry) -> int:
        return estimate_bytes(entry, entry.settings(self._settings))

    def free(self, slots: list[Slot]) -> int:
        if self._limit is not None:
            return self._limit - sum(self._takes(s) for s in occupying(slots))
        available = self._available()
        if available is None:  # no /proc/meminfo: no rule
            return 1 << 62
        # a model loading now has not taken all it will yet
        return available - sum((s.estimate or 0) for s in slots if s.state == "loading")

    def frees(self, slot: Slot) -> int:
        if self._limit is not None:
            return self._takes(slot)
        pid = slot.served.pid if slot.served is not None else None
        return tree_rss(pid) if pid is not None else (slot.estimate or 0)

    def _takes(self, slot: Slot) -> int:
        if slot.estimate is None:
            slot.estimate = self.estimate(slot.entry)
        return slot.estimate

    def refusal(self, entry: ModelEntry, need: int, free: int, freeable: int) -> str:
        against = (f"--memory-limit {self._limit // MIB} MiB" if self._limit is not None
                   else "MemAvailable")
        return (f"The model '{entry.name}' needs about {need // MIB} MiB (weights "
                f"{weights_bytes(entry.path) // MIB} MiB, KV cache and process), and only "
                f"{max(free, 0) // MIB} MiB are free ({against}) plus {freeable // MIB} MiB "
                "that unloading idle models would give back. Free memory, or lower its "
                "context_length or max_sequences.")


def memory_budget(settings: Settings) -> Budget:
    return Budget(settings)


# -- GGUF metadata (the header only; no dependency) ----------------------------------------

_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?",
            10: "<Q", 11: "<q", 12: "<d"}
_STRING, _ARRAY = 8, 9


def gguf_metadata(path: Path, wanted: Callable[[str], bool]) -> dict[str, object]:
    """The header's key/value pairs whose keys `wanted` accepts (arrays are skipped)."""
    with path.open("rb") as f:
        if f.read(4) != b"GGUF":
            raise ValueError(f"{path} is not a GGUF file")
        version, = struct.unpack("<I", f.read(4))
        if version < 2:
            raise ValueError(f"GGUF version {version} is not read here")
        _tensors, count = struct.unpack("<QQ", f.read(16))
        found: dict[str, object] = {}
        for _ in range(count):
            key = _string(f)
            kind, = struct.unpack("<I", f.read(4))
            value = _value(f, kind)
            if wanted(key):
                found[key] = value
        return found


def _string(f: BinaryIO) -> str:
    n, = struct.unpack("<Q", f.read(8))
    return f.read(n).decode("utf-8", "replace")


def _value(f: BinaryIO, kind: int) -> object:
    if kind in _SCALARS:
        fmt = _SCALARS[kind]
        return struct.unpack(fmt, f.read(struct.calcsize(fmt)))[0]
    if kind == _STRING:
        return _string(f)
    if kind == _ARRAY:
        inner, n = struct.unpack("<IQ", f.read(12))
        if inner in _SCALARS:
            f.seek(n * struct.calcsize(_SCALARS[inner]), 1)
        else:
            for _ in range(n):
                _value(f, inner)
        return None
    raise ValueError(f"unknown GGUF value type {kind}")


def _gguf_shape(path: Path) -> tuple[int, int, int, int | None] | None:
    meta = gguf_metadata(path, lambda k: k == "general.architecture" or "." in k and (
        k.endswith((".block_count", ".context_length", ".embedding_length"))
        or ".attention." in k))
    arch = meta.get("general.architecture")
    if not isinstance(arch, str):
        return None
    heads = int(meta[f"{arch}.attention.head_count"])  # type: ignore[arg-type]
    kv_heads = int(meta.get(f"{arch}.attention.head_count_kv", heads))  # type: ignore[arg-type]
    head_dim = int(meta.get(f"{arch}.attention.key_length",  # type: ignore[arg-type]
                            int(meta[f"{arch}.embedding_length"]) // heads))  # type: ignore[arg-type]
    trained = meta.get(f"{arch}.context_length")
    return (int(meta[f"{arch}.block_count"]), kv_heads, head_dim,  # type: ignore[arg-type]
            int(trained) if trained is not None else None)  # type: ignore[arg-type]
