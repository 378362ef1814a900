"""Holding a bench run to a memory budget the OS enforces, page cache included.

`MemoryLimit` runs a block inside a child memory cgroup capped at the budget: a cgroup is charged the page cache
its members fault in, so offloaded weights read through the page cache come from disk again once they no longer
fit. Only what the run touches after joining counts. Where no cgroup v1/v2 limit can be written the run goes on
unbounded and `MemoryLimit.method` says why. Design: docs/design/disk-reads.md.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

CGROUP_ROOT = Path("/sys/fs/cgroup")
MiB = 1 << 20


@dataclass(frozen=True)
class _Hierarchy:
    version: int
    own: Path            # this process's cgroup directory
    limit_file: str
    peak_file: str


def _hierarchies(root: Path, proc_cgroup: str) -> list[_Hierarchy]:
    """The memory hierarchies this process belongs to, v1 first (its limit also caps page cache in v1)."""
    found = []
    for line in proc_cgroup.splitlines():
        parts = line.strip().split(":", 2)
        if len(parts) != 3:
            continue
        _, controllers, path = parts
        if "memory" in controllers.split(","):
            found.append(_Hierarchy(1, root / "memory" / path.lstrip("/"), "memory.limit_in_bytes",
                                    "memory.max_usage_in_bytes"))
        elif controllers == "":
            unified = root / "unified" if (root / "unified").is_dir() else root
            found.append(_Hierarchy(2, unified / path.lstrip("/"), "memory.max", "memory.peak"))
    return sorted(found, key=lambda h: h.version)


class MemoryLimit:
    """`with MemoryLimit(limit_bytes) as limit:` runs the block inside a fresh memory cgroup capped at
    `limit_bytes`; `limit.method` says what held it (or why nothing did), `limit.peak_bytes()` what the
    block was charged at most. On leaving, the process moves back and the group is removed."""

    def __init__(self, limit_bytes: int, root: Path = CGROUP_ROOT, proc_cgroup: Path = Path("/proc/self/cgroup"),
                 name: str | None = None) -> None:
        if limit_bytes <= 0:
            raise ValueError(f"a memory limit must be positive, got {limit_bytes}")
        self.limit_bytes = limit_bytes
        self._root = root
        self._proc_cgroup = proc_cgroup
        self._name = name or f"expertflow-bench-{os.getpid()}"
        self._group: Path | None = None
        self._hierarchy: _Hierarchy | None = None
        self._peak: int | None = None
        self.bounded = False
        self.method = "unbounded: not entered"

    def __enter__(self) -> "MemoryLimit":
        try:
            text = self._proc_cgroup.read_text()
        except OSError as e:
            self.method = f"unbounded: cannot read {self._proc_cgroup} ({e.strerror})"
            return self
        reasons = []
        for hierarchy in _hierarchies(self._root, text):
            group = hierarchy.own / self._name
            try:
                group.mkdir()
            except OSError as e:
                reasons.append(f"cgroup v{hierarchy.version}: cannot create a group ({e.strerror})")
                continue
            try:
                (group / hierarchy.limit_file).write_text(str(self.limit_bytes))
                (group / "cgroup.procs").write_text(str(os.getpid()))
            except OSError as e:
                reasons.append(f"cgroup v{hierarchy.version}: cannot cap or join a group ({e.strerror})")
                _remove(group)
                continue
            self._group, self._hierarchy, self.bounded = group, hierarchy, True
            self.method = (f"cgroup v{hierarchy.version} {hierarchy.limit_file} = {self.limit_bytes // MiB} MiB, "
                           "page cache included")
            return self
        self.method = "unbounded: " + ("; ".join(reasons) if reasons else "no memory cgroup hierarchy")
        return self

    def peak_bytes(self) -> int | None:
        """The most the group was charged, so far or until it was left (None: unbounded, or the kernel does
        not report it)."""
        if self._group is None:
            return self._peak
        try:
            return int((self._group / self._hierarchy.peak_file).read_text())
        except (OSError, ValueError):
            return None

    def __exit__(self, *exc) -> None:
        if self._group is None:
            return
        self._peak = self.peak_bytes()
        try:
            (self._hierarchy.own / "cgroup.procs").write_text(str(os.getpid()))
        finally:
            _remove(self._group)
            self._group = None


def _remove(group: Path) -> None:
    try:
        group.rmdir()
    except OSError:
        pass  # still populated (leaving failed): the empty-of-us group stays behind; nothing reads it again


def drop_cached(paths: Iterable[Path]) -> None:
    """Write back and drop the files' pages from the page cache, so the next read of them reaches the
    device and is charged to whoever reads them then."""
    if not hasattr(os, "posix_fadvise"):
        return
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
