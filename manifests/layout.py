"""Where each stage's files live under one data root."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

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
        return self.root / rel
