"""Where commands write: the check every output path passes before any work, and atomic writes.

The rule: an existing file, or a directory that holds anything, is written over only with --overwrite; a
file never becomes a directory nor a directory a file; and nothing a command does not produce is ever
deleted. Files appear whole (a temp sibling, then os.replace), so a reader never sees half of one.
"""

from __future__ import annotations

import errno
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from expertflow.errors import ExpertflowError

FILE_MODE, DIR_MODE = 0o644, 0o755  # mkstemp/mkdtemp create 0600/0700; outputs are ordinary shared artefacts


def check_output_file(path: str | Path, overwrite: bool, flag: str = "--out") -> None:
    """Refuse `path` as a file to write unless it is new, or an existing file and `overwrite`."""
    path = Path(path)
    _check_parent(path, flag)
    if path.is_dir():
        raise ExpertflowError(f"{flag} {path} is a directory; give the path of a file to write")
    if path.exists() or path.is_symlink():
        if not overwrite:
            raise ExpertflowError(f"{flag} {path} already exists; pass --overwrite to replace it, or choose a new path")
        if not path.is_file():
            raise ExpertflowError(f"{flag} {path} exists and is not a regular file; choose a new path")


def check_output_dir(path: str | Path, overwrite: bool, flag: str = "--out") -> None:
    """Refuse `path` as a directory to write unless it is new or empty, or a directory and `overwrite`."""
    path = Path(path)
    _check_parent(path, flag)
    if path.exists() and not path.is_dir():
        raise ExpertflowError(f"{flag} {path} is a file, not a directory; choose a new path")
    if path.is_dir():
        if any(path.iterdir()) and not overwrite:
            raise ExpertflowError(f"{flag} {path} is a non-empty directory; pass --overwrite to write into it, "
                                  "or choose a new path")
        if not os.access(path, os.W_OK | os.X_OK):
            raise ExpertflowError(f"{flag} {path}: cannot write in {path} (permission denied); choose a writable path")


def _check_parent(path: Path, flag: str) -> None:
    """The nearest existing ancestor must be a directory we may write in (temp siblings and new folders go there)."""
    absolute = Path(os.path.abspath(path))
    if absolute.parent == absolute:
        raise ExpertflowError(f"{flag} {path} is the filesystem root; choose a path below it")
    for parent in absolute.parents:
        if parent.exists():
            if not parent.is_dir():
                raise ExpertflowError(f"{flag} {path} is under {parent}, which is a file; choose a path in a directory")
            if not os.access(parent, os.W_OK | os.X_OK):
                raise ExpertflowError(f"{flag} {path}: cannot write in {parent} (permission denied); "
                                      "choose a writable path")
            return


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """A temp sibling of `path` to write (for writers that want a file name); it replaces `path` on success
    and is removed on failure."""
    path = Path(os.path.abspath(path))
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, FILE_MODE)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_atomic(path: str | Path, data: str | bytes) -> None:
    with atomic_path(path) as tmp:
        if isinstance(data, bytes):
            tmp.write_bytes(data)
        else:
            tmp.write_text(data)


def write_dir(directory: str | Path, fill: Callable[[Path], None]) -> Path:
    """`fill(tmp)` writes the output into a temp sibling of `directory`, which then takes its place: renamed
    to it when it is missing (atomic as a whole), otherwise merged in, each file replacing its namesake
    atomically while the directory's other files stay. An existing directory is never renamed over: it may
    be someone's working directory or a mount point."""
    directory = Path(directory)
    target = Path(os.path.abspath(directory))
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
    try:
        staging.chmod(DIR_MODE)
        fill(staging)
        if target.is_dir():
            _merge(staging, target)
        else:
            os.replace(staging, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)  # gone already after a rename; only our own files otherwise
    return directory


def _merge(src: Path, dst: Path) -> None:
    for entry in sorted(src.iterdir()):
        there = dst / entry.name
        if entry.is_dir() and there.is_dir():
            _merge(entry, there)
            continue
        try:
            os.replace(entry, there)
        except OSError as exc:  # a file over a directory of the same name, or the other way round
            if exc.errno not in (errno.EISDIR, errno.ENOTDIR, errno.ENOTEMPTY, errno.EEXIST):
                raise
            kind = "directory" if entry.is_dir() else "file"
            raise ExpertflowError(f"{there} is in the way of the {kind} this command writes there; move it "
                                  "and run again") from None
