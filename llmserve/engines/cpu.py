"""What the CPU can do, read from /proc/cpuinfo, and the choices that depend on it."""

from __future__ import annotations

import math
import os
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


def usable_cpus(cgroup_root: Path = Path("/sys/fs/cgroup")) -> int:
    """The CPUs this process may use: its affinity, capped by a cgroup CPU quota (a container's
    `--cpus`). `os.cpu_count()` is the host's: llama.cpp with 64 threads under a 2-CPU quota
    spends its time throttled, each step waiting for its slowest thread."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cpus = os.cpu_count() or 1
    quota = _cgroup_quota(cgroup_root)
    return max(1, min(cpus, math.ceil(quota))) if quota else max(1, cpus)


def _cgroup_quota(root: Path) -> float | None:
    """CPUs' worth of the cgroup's quota (v2 `cpu.max`, else v1 `cpu.cfs_quota_us`); None
    when unlimited or unreadable."""
    try:
        quota, _, period = (root / "cpu.max").read_text().partition(" ")
        return int(quota) / int(period) if quota != "max" else None
    except (OSError, ValueError):
        pass
    try:
        quota_us = int((root / "cpu" / "cpu.cfs_quota_us").read_text())
        period_us = int((root / "cpu" / "cpu.cfs_period_us").read_text())
    except (OSError, ValueError):
        return None
    return quota_us / period_us if quota_us > 0 and period_us > 0 else None
