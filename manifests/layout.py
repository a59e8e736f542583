"""Where each stage's files live under one data root."""

from __future__ import annotations

import errno
import os
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from siclip.manifests.errors import SiclipError

STAGES = ("shards", "captions", "teacher", "train")


def shard_name(shard_id: int) -> str:
    """img2dataset's shard naming: zero-padded to five digits."""
    return f"{shard_id:05d}"


@dataclass(frozen=True)
class DataRoot:
    """The folders of one data root (see DESIGN.md, 'Data on disk')."""

    root: Path

    def __post_init__(self):
        object.__setattr__(self, "root", Path(self.root).absolute())

    @property
    def shards(self) -> Path:
        return self.root / "shards"

    @property
    def captions(self) -> Path:
        return self.root / "captions"

    @property
    def teacher(self) -> Path:
        return self.root / "teacher"

    @property
    def runs(self) -> Path:
        return self.root / "runs"

    @property
    def manifests(self) -> Path:
        return self.root / "manifests"

    @property
    def work(self) -> Path:
        """Scratch space of running jobs (staging, input splits); never holds finished outputs."""
        return self.root / "work"

    def manifest_path(self, stage: str) -> Path:
        return self.manifests / f"{stage}.json"

    def rel(self, path: Path) -> str:
        return str(Path(path).absolute().relative_to(self.root))

    def abs(self, rel: str) -> Path:
        """The path a manifest's `rel` names; SiclipError when it leaves the root (see `inside`)."""
        problem = leaves_root(rel)
        if problem:
            raise SiclipError(f"{rel!r} {problem}, outside the data root {self.root}")
        return self.inside(self.root / rel)

    def inside(self, path: Path) -> Path:
        """`path` once checked to resolve inside the root, links followed, so that what a data root
        holds (a crafted manifest, a link) cannot make a stage read or delete files elsewhere."""
        real, top = Path(path).resolve(), self.root.resolve()
        if real != top and top not in real.parents:
            raise SiclipError(f"{path} leads to {real}, outside the data root {self.root}; "
                              "siclip reads and deletes only files inside it")
        return Path(path)


def leaves_root(rel) -> str | None:
    """Why a manifest's relative path would leave its data root ('is absolute', 'goes up with ..'),
    or None when it stays inside, as far as its text goes."""
    if not isinstance(rel, str) or not rel:
        return "is not a relative path"
    p = PurePosixPath(rel)
    if p.is_absolute():
        return "is absolute"
    if ".." in p.parts:
        return "goes up with '..'"
    return None


# kernel file systems that hold no files: a data root there could never be written or kept
VIRTUAL_FS = {"proc", "sysfs", "devtmpfs", "devpts", "cgroup", "cgroup2", "debugfs", "tracefs", "securityfs",
              "pstore", "bpf", "configfs", "fusectl", "mqueue", "hugetlbfs", "binfmt_misc", "autofs", "efivarfs"}


def _file_system(path: Path) -> tuple[str, str]:
    """(mount point, type) of the file system holding `path` (an existing path), from /proc/self/mounts."""
    best = ("/", "")
    try:
        lines = Path("/proc/self/mounts").read_text().splitlines()
    except OSError:
        return best
    real = str(path.resolve())
    for line in lines:
        parts = line.split()
        if len(parts) < 3:
            continue
        mnt = parts[1].replace("\\040", " ")
        if (real == mnt or real.startswith(mnt.rstrip("/") + "/")) and len(mnt) >= len(best[0]):
            best = (mnt, parts[2])
    return best


def open_data_root(path, create: bool = False, write: bool = True) -> DataRoot:
    """The data root at `path`, checked to be a folder on a real file system that this process can
    write (when `write`; made when `create`), or a one-line SiclipError naming the path and what is
    wrong with it."""
    p = Path(path).absolute()
    where = f"data root {p}"
    existing = p
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    mount, fs = _file_system(existing)
    if fs in VIRTUAL_FS:
        raise SiclipError(f"{where} is on {mount}, a {fs} file system the kernel makes up: choose a folder on a disk")
    if existing.exists() and not existing.is_dir():
        if existing == p:
            raise SiclipError(f"{where} is a file, not a folder")
        raise SiclipError(f"{where}: {existing} is a file, so no folder can be made under it")
    if not p.exists():
        if not create:
            raise SiclipError(f"{where} does not exist")
        try:
            p.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise SiclipError(f"{where} cannot be made: {_why(e, existing)}") from None
    if write and not os.access(p, os.W_OK | os.X_OK):
        raise SiclipError(f"{where} cannot be written: {_why(OSError(errno.EACCES, 'Permission denied'), p)}")
    return DataRoot(p)


def _why(e: OSError, path: Path) -> str:
    """An OSError in words, saying read-only file system when that is what it is."""
    try:
        if os.statvfs(path).f_flag & os.ST_RDONLY:
            return f"{_file_system(path)[0]} is mounted read-only"
    except OSError:
        pass
    return e.strerror or str(e)
