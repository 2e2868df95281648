"""Memory as Linux reports it: a process tree's resident set, and what is available."""

from __future__ import annotations

from pathlib import Path

_PROC = Path("/proc")


def _status_kib(path: Path, key: str) -> int | None:
    try:
        for line in path.read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return None


def _children(pid: int) -> list[int]:
    kids: list[int] = []
    try:
        for task in (_PROC / str(pid) / "task").iterdir():
            text = (task / "children").read_text()
            kids += [int(c) for c in text.split()]
    except (OSError, ValueError):
        pass
    return kids


def tree_pids(pid: int) -> list[int]:
    """`pid` and every process below it (as far as /proc shows them now)."""
    found, todo = [], [pid]
    while todo:
        p = todo.pop()
        if p in found:
            continue
        found.append(p)
        todo += _children(p)
    return found


def tree_rss(pid: int) -> int:
    """Bytes resident in `pid` and its descendants (0 for a process gone)."""
    return sum((_status_kib(_PROC / str(p) / "status", "VmRSS") or 0) * 1024
               for p in tree_pids(pid))


def mem_available() -> int | None:
    """MemAvailable from /proc/meminfo, in bytes (None where there is none)."""
    kib = _status_kib(_PROC / "meminfo", "MemAvailable")
    return kib * 1024 if kib is not None else None
