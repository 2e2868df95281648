"""What the CPU can do, read from /proc/cpuinfo, and the choices that depend on it."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

WeightRepack = Literal["auto", "on", "off"]

# llama.cpp's AMX weight repack (llama-cpp-python 0.3.36) segfaults in llama_decode.
_UNSAFE_REPACK_FLAGS = frozenset({"amx_tile", "amx_int8", "amx_bf16"})


def cpu_flags(cpuinfo: str | None = None) -> frozenset[str]:
    """The first CPU's feature flags (`flags` on x86, `Features` on ARM); empty where
    /proc/cpuinfo is not there to read."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text(errors="replace")
        except OSError:
            return frozenset()
    for line in cpuinfo.splitlines():
        key, sep, value = line.partition(":")
        if sep and key.strip().lower() in ("flags", "features"):
            return frozenset(value.split())
    return frozenset()


def weight_repack_enabled(setting: WeightRepack, flags: frozenset[str] | None = None) -> bool:
    """Whether llama.cpp may repack weights into its CPU-specific layouts: `auto` is on
    except on CPUs whose repack path is known to crash (AMX)."""
    if setting != "auto":
        return setting == "on"
    flags = cpu_flags() if flags is None else flags
    return not (flags & _UNSAFE_REPACK_FLAGS)
