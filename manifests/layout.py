"""Where each stage's files live under one data root."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from manifests.errors import SiclipError

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
