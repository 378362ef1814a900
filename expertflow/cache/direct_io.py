"""Reading file ranges with O_DIRECT: the device DMAs straight into our buffer, skipping the OS page cache.

A buffered read that is then dropped from the page cache (posix_fadvise DONTNEED) also reaches the device,
but the kernel first copies every byte through the page cache and then frees those pages: ~2.5-3.5 ms of
CPU per 6 MiB expert on this machine, taken from the model on a 2-core box. O_DIRECT skips both, at the
price of alignment: the file offset, the length and the buffer's address must be multiples of the
device's logical block size. `ALIGN` (one page) covers every common device. A safetensors tensor starts
wherever the header's length puts it, so its first byte is rarely on a block boundary. Two ways round that:
- zero-copy: a destination whose address has the same offset within a page as the file range
  (`placement_skip` finds one in a slot of `SLOT_SLACK` spare bytes) takes the range's whole blocks
  straight from the device; only the blocks it shares with its neighbours pass through a bounce buffer;
- otherwise the aligned range around the tensor is read into a bounce buffer and its bytes copied out:
  ~0.7-1.3 ms of CPU per 6 MiB expert on this machine, spent inside the read, so its wall time too.
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
