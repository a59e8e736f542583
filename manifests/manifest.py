"""Per-stage manifests: every finished unit of work with its files, bytes, checksums and counts.

A manifest is the truth for resume (a unit is done only when its entry exists and its files check
out), for epoch length at training time, and for storage accounting. Saved atomically.
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

from siclip.manifests.errors import SiclipError
from siclip.manifests.io import atomic_write_json, sha256_file
from siclip.manifests.layout import DataRoot, leaves_root

SCHEMA_VERSION = 1  # written into every manifest and read back: another version is refused, not guessed at


def read_json_or_fail(path: Path) -> dict:
    try:
        return json.loads(Path(path).read_text())
    except json.JSONDecodeError as e:
        raise SiclipError(f"{path}: not valid JSON ({e.msg} at line {e.lineno}); restore it or delete it to rebuild") from None


def file_record(root: DataRoot, path: Path) -> dict:
    """{'bytes', 'sha256'} of one finished file."""
    return {"bytes": Path(path).stat().st_size, "sha256": sha256_file(path)}


SHARD_UNIT = re.compile(r"^\d{5,}$")  # shards, captions and teacher entries are named by shard


def check_entry(root: DataRoot, path: Path, stage: str, unit, entry) -> None:
    """Refuse an entry that names a unit or a file outside the data root, or is not shaped as one."""
    where = f"{path}: entry {unit!r}"
    problem = leaves_root(unit) if stage == "train" else (None if SHARD_UNIT.match(unit) else "is not a shard name")
    if problem:
        raise SiclipError(f"{where}: the unit name {problem}; a manifest lists only units inside its data root {root.root}")
    files = entry.get("files") if isinstance(entry, dict) else None
    if not isinstance(files, dict):
        raise SiclipError(f"{where}: has no 'files' table; restore the manifest or delete it to rebuild")
    for rel, rec in files.items():
        problem = leaves_root(rel)
        if problem:
            raise SiclipError(f"{where}: file {rel!r} {problem}; a manifest lists only files inside its data root "
                              f"{root.root}")
        if not (isinstance(rec, dict) and isinstance(rec.get("bytes"), int) and isinstance(rec.get("sha256"), str)):
            raise SiclipError(f"{where}: file {rel!r} has no whole record (bytes, sha256)")


@dataclass
class StageManifest:
    """What one stage made: `entries[unit] = {"files": {rel_path: {"bytes", "sha256"}}, "samples": n, ...}`."""

    stage: str
    entries: dict[str, dict] = field(default_factory=dict)
    params: dict = field(default_factory=dict)
    info: dict = field(default_factory=dict)

    @classmethod
    def load(cls, root: DataRoot, stage: str) -> "StageManifest":
        path = root.manifest_path(stage)
        if not path.exists():
            return cls(stage)
        d = read_json_or_fail(path)
        if d.get("stage") != stage or not isinstance(d.get("entries"), dict):
            raise SiclipError(f"{path}: not a siclip '{stage}' manifest")
        if d.get("schema_version") != SCHEMA_VERSION:
            raise SiclipError(f"{path}: manifest schema version {d.get('schema_version')!r}, this siclip reads version "
                              f"{SCHEMA_VERSION}; use the siclip that wrote it, or rerun the '{stage}' stage into a new "
                              f"data root")
        for unit, entry in d["entries"].items():
            check_entry(root, path, stage, unit, entry)
        return cls(stage, d["entries"], d.get("params", {}), d.get("info", {}))

    def add(self, root: DataRoot, unit: str, files: list[Path], samples: int, **extra) -> dict:
        """Hash `files` (already in their final place) and record them as unit `unit`."""
        entry = {"files": {root.rel(p): file_record(root, p) for p in files}, "samples": int(samples),
                 "finished_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), **extra}
        self.entries[unit] = entry
        return entry

    def save(self, root: DataRoot) -> None:
        atomic_write_json(root.manifest_path(self.stage), {
            "stage": self.stage, "schema_version": SCHEMA_VERSION, "params": self.params, "info": self.info,
            "entries": dict(sorted(self.entries.items())),
            "totals": {"files": self.total_files, "samples": self.total_samples, "bytes": self.total_bytes},
        })

    @property
    def total_bytes(self) -> int:
        return sum(f["bytes"] for e in self.entries.values() for f in e["files"].values())

    @property
    def total_files(self) -> int:
        return sum(len(e["files"]) for e in self.entries.values())

    @property
    def total_samples(self) -> int:
        return sum(int(e.get("samples", 0)) for e in self.entries.values())

    def files(self) -> Iterator[tuple[str, dict]]:
        for e in self.entries.values():
            yield from e["files"].items()

    def entry_ok(self, root: DataRoot, unit: str, rehash: bool = False) -> bool:
        """A unit counts as done when its entry exists and its files are there at the recorded size
        (and hash, with `rehash`)."""
        e = self.entries.get(unit)
        if e is None:
            return False
        return all(check_file(root, rel, rec, rehash) is None for rel, rec in e["files"].items())


# A sidecar is made from files of earlier stages. Its entry records their sha256 ("inputs"), so that a
# rerun redoes it when they changed (a shard downloaded again after a repair, a shard recaptioned) and
# training refuses it until then.
SIDECAR_INPUTS = {"captions": ("shards",), "teacher": ("shards", "captions")}
READ_FILES = (".tar", ".arrow")  # what stage 2 and training read of an entry (not img2dataset's records)


class Inputs:
    """The files a unit of `stages` is made from, as their manifests record them now."""

    def __init__(self, root: DataRoot, stages: tuple[str, ...]):
        self.manifests = [StageManifest.load(root, s) for s in stages]

    def of(self, unit: str) -> dict[str, str]:
        """{relative path: sha256} of the unit's files that the next stage reads."""
        out = {}
        for m in self.manifests:
            entry = m.entries.get(unit, {"files": {}})
            out.update({rel: rec["sha256"] for rel, rec in entry["files"].items() if rel.endswith(READ_FILES)})
        return out

    def changed(self, unit: str, entry: dict) -> str | None:
        """The first input `entry` recorded that is gone or different now, else None (entries made
        before inputs were recorded say nothing, and count as unchanged)."""
        now = self.of(unit)
        return next((rel for rel, sha in entry.get("inputs", {}).items() if now.get(rel) != sha), None)


def check_file(root: DataRoot, rel: str, rec: dict, rehash: bool = True) -> str | None:
    """None when the file matches its record, else 'missing' or the kind of corruption."""
    p = root.abs(rel)
    if not p.exists():
        return "missing"
    size = p.stat().st_size
    if size != rec["bytes"]:
        return f"size {size} != recorded {rec['bytes']}"
    if rehash and sha256_file(p) != rec["sha256"]:
        return "sha256 mismatch"
    return None


@contextmanager
def stage_lock(root: DataRoot, stage: str):
    """One job per stage and data root at a time; the lock dies with the process, so a killed job
    never leaves a stale lock behind."""
    root.manifests.mkdir(parents=True, exist_ok=True)
    path = root.manifests / f".{stage}.lock"
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise SiclipError(f"another 'siclip {stage}' job is running on {root.root} (lock {path})") from None
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode())
        yield
    finally:
        os.close(fd)
