"""Reading file ranges with O_DIRECT: the device DMAs straight into our buffer, skipping the OS page cache.

Offset, length and buffer address must be multiples of `ALIGN`. A destination placed at the file range's offset
within a page (`placement_skip`, in a slot's `SLOT_SLACK` spare bytes) takes whole blocks straight from the
device; the rest goes through a per-thread bounce buffer. `open_direct` returns None where O_DIRECT is
refused. Design: docs/design/disk-reads.md.
"""

from __future__ import annotations

import errno
import mmap
import os
import threading
from pathlib import Path

from expertflow.errors import ExpertflowError

ALIGN = 4096
SLOT_SLACK = ALIGN  # spare bytes in a fast-tier slot, so that an expert can be placed for a zero-copy read


def placement_skip(address: int, file_offset: int) -> int:
    """Bytes to skip from `address` so that the destination sits at the file offset's place within a page:
    then every whole block of the range can be read straight into it."""
    return (file_offset - address) % ALIGN


def open_direct(path: Path) -> int | None:
    """An O_DIRECT descriptor for `path`, or None where the OS or file system refuses it (tmpfs, macOS)."""
    if not hasattr(os, "O_DIRECT"):
        return None
    try:
        return os.open(path, os.O_RDONLY | os.O_DIRECT)
    except OSError as e:
        if e.errno in (errno.EINVAL, errno.EOPNOTSUPP):
            return None
        raise


def read_exact(fd: int, view: memoryview, offset: int, nbytes: int, path: Path) -> None:
    """Fill `view[:nbytes]` from `offset`. With O_DIRECT the last block may come back short at the end of
    the file; fewer than `nbytes` bytes means the file is truncated."""
    readv_exact(fd, [view], offset, nbytes, path)


def readv_exact(fd: int, views: list[memoryview], offset: int, nbytes: int, path: Path) -> None:
    """Fill `views`, back to back, from `offset` with one scattered read (more if the device returns fewer
    bytes); at least `nbytes` must arrive (the last block may be short at the end of the file)."""
    done = 0
    while done < nbytes:
        n = os.preadv(fd, views, offset + done)
        if n <= 0:
            raise ExpertflowError(f"{path} ended early while reading an expert; the file is truncated")
        done += n
        while views and n >= len(views[0]):
            n -= len(views[0])
            views = views[1:]
        if views and n:
            views = [views[0][n:], *views[1:]]


class BounceBuffers:
    """One page-aligned scratch buffer per reader thread, for ranges that do not land aligned in their
    destination: the aligned superset is read here, then the wanted bytes are copied out."""

    def __init__(self) -> None:
        self._local = threading.local()

    def get(self, nbytes: int) -> memoryview:
        buffer: mmap.mmap | None = getattr(self._local, "buffer", None)
        if buffer is None or len(buffer) < nbytes:
            # Anonymous maps start on a page boundary, which is what O_DIRECT needs.
            buffer = self._local.buffer = mmap.mmap(-1, -(-nbytes // ALIGN) * ALIGN)
        return memoryview(buffer)
