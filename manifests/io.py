"""Atomic file writes and hashing: a file under the data root is either complete or absent."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import signal
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable

from siclip.manifests.errors import DiskError

# what the disk, not the program, refused: the fix is room (or a writable mount), then the same command
DISK_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS)


def disk_error(e: OSError, path) -> DiskError | None:
    """The DiskError for an OSError the disk raised while writing `path`, else None."""
    if not isinstance(e, OSError) or e.errno not in DISK_ERRNOS:
        return None
    return DiskError(f"cannot write {path}: {os.strerror(e.errno)} (errno {e.errno}); make room and rerun the same "
                     "command: what was written before is kept")


@contextmanager
def writing(path):
    """Turn the disk's refusal of a write to `path` into a one-line DiskError naming it."""
    try:
        yield
    except OSError as e:
        err = disk_error(e, path)
        if err is None:
            raise
        raise err from None


def fsync_dir(path: Path) -> None:
    """Make a rename inside `path` durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    """Call `write(tmp_path)`, fsync the result, then rename it over `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with writing(path):
            write(tmp)
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
            os.replace(tmp, path)
    finally:
        if tmp.exists():  # a partial temp file frees its space at once
            tmp.unlink()
    fsync_dir(path.parent)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    atomic_write(path, lambda tmp: tmp.write_bytes(data))


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=1, sort_keys=True) + "\n").encode())


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def remove_stale_temps(folder: Path) -> int:
    """Delete temp files that a killed atomic write left behind; return how many."""
    n = 0
    if folder.is_dir():
        for p in folder.glob(".*.tmp-*"):
            p.unlink(missing_ok=True)
            n += 1
    return n


def failpoint(name: str) -> None:
    """Tests kill the job at a named moment (SICLIP_FAILPOINT=name): a real SIGKILL, no cleanup, as a crash."""
    if os.environ.get("SICLIP_FAILPOINT") == name:
        os.kill(os.getpid(), signal.SIGKILL)
