"""Per-stage manifests: every finished unit of work with its files, bytes, checksums and counts.

A manifest is the truth for resume (a unit is done only when its entry exists and its files check
out), for epoch length at training time, and for storage accounting. Saved atomically.

Its entries are typed (pydantic models, one per kind of unit): a manifest is read into them and
written from them, and a field they do not know, or one they need that is missing, is refused in
one line naming the file and the entry.
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
from typing import Any, Iterator, Literal

from pydantic import BaseModel, ConfigDict, ValidationError, model_validator

from siclip.manifests.errors import SiclipError
from siclip.manifests.io import atomic_write_json, sha256_file
from siclip.manifests.layout import DataRoot, leaves_root

SCHEMA_VERSION = 1  # written into every manifest and read back: another version is refused, not guessed at
SHARD_UNIT = re.compile(r"^\d{5,}$")  # shards, captions and teacher entries are named by shard


class Record(BaseModel):
    """A typed part of a manifest: an unknown field, a missing one or a value of another type is an error."""

    model_config = ConfigDict(extra="forbid", strict=True)

    def dump(self) -> dict:
        """The JSON the manifest file holds: the fields it was read with, or made with (one left out stays out,
        one given as None is null), so that a manifest read and saved again is the same file."""
        return self.model_dump(mode="json", exclude_unset=True)


class FileRecord(Record):
    """One finished file: its size and sha256."""

    bytes: int
    sha256: str


class Entry(Record):
    """What every unit lists: its files (by path relative to the data root), samples and when it finished."""

    files: dict[str, FileRecord]
    samples: int
    finished_at: str


class ShardEntry(Entry):
    """A stage-1 shard: img2dataset's tar, parquet and stats, or one adopted tar (`source`, no `seconds`)."""

    rows: int
    failures: dict[str, int]  # failed rows by reason (pipeline.reasons)
    seconds: float | None = None
    source: str | None = None


class Timing(Record):
    seconds: float
    started: float
    finished: float


class Worker(Record):
    pid: int
    model_loaded_at: float | None = None


class SidecarEntry(Entry):
    """A captions or teacher sidecar: how it was made, and the sha256 of the files it was made from."""

    params: dict[str, Any]
    model: str | list[str]  # the captioner, or the teachers
    revision: str | None = None
    failed: dict[str, int]  # samples without output, by reason
    inputs: dict[str, str]  # {relative path: sha256} of the shard (and captions) it was made from
    timing: Timing | None = None
    worker: Worker | None = None


class CheckpointEntry(Entry):
    """A folder under runs/: a checkpoint, a run's final model, or an export."""

    kind: Literal["checkpoint", "final", "export"]
    step: int | None = None


ENTRY_TYPES: dict[str, type[Entry]] = {"shards": ShardEntry, "captions": SidecarEntry, "teacher": SidecarEntry,
                                       "train": CheckpointEntry}


class Fitted(Record):
    """The settings --fit lowered to fit the budget (unset: as asked)."""

    quality: int | None = None
    image_size: int | None = None


class PlanRecord(Record):
    """Stage 1's plan, made on the pilot shard: what a rerun resumes."""

    rows: int
    shards: int
    bytes_per_row: float
    planned_bytes: int
    list_sha256: str
    budget_bytes: int
    reserve_bytes: int
    fitted: Fitted


class RetryRecord(Record):
    """--retry-failed: the shards whose failed rows were harvested, with the reasons retried in each, and
    the retry shards made of those rows, with their row counts."""

    harvested: list[str]
    reasons: dict[str, list[str]]
    shards: dict[str, int]

    @model_validator(mode="before")
    @classmethod
    def _no_harvest_yet(cls, data):
        if isinstance(data, dict) and "reasons" not in data:  # written before a shard was harvested
            data = {**data, "reasons": {}}
        return data

    @model_validator(mode="after")
    def _whole(self) -> "RetryRecord":
        unknown = next((u for u in self.harvested if u not in self.reasons), None)
        if unknown is not None:
            raise ValueError(f"harvested shard {unknown!r} has no recorded reasons")
        bad = next((name for name in self.shards if not SHARD_UNIT.match(name)), None)
        if bad is not None:
            raise ValueError(f"retry shard {bad!r} is not a shard name")
        return self


class AdoptRecord(Record):
    """`siclip shards --adopt`: the folders adopted, and each tar found to be the same bytes as a shard."""

    sources: list[str]
    same_as: dict[str, str]  # {source tar: the shard of its bytes}


class StageInfo(Record):
    """What a stage records beside its entries (stage 1 only): its plan, its retries, its adoptions."""

    plan: PlanRecord | None = None
    retry: RetryRecord | None = None
    adopt: AdoptRecord | None = None


class Totals(Record):
    files: int
    samples: int
    bytes: int


class ManifestFile(Record):
    """The whole file, its entries read one by one (so that an error names the entry)."""

    stage: str
    schema_version: int
    params: dict[str, Any]
    info: StageInfo
    entries: dict[str, dict]
    totals: Totals


def _problem(e: ValidationError) -> str:
    """The first thing wrong, in one line: 'field rows: missing', 'field foo: unknown', ..."""
    err = e.errors()[0]
    where = "".join(f".{x}" if isinstance(x, str) and x.isidentifier() else f"[{x!r}]" for x in err["loc"]).lstrip(".")
    what = {"missing": "missing", "extra_forbidden": "unknown"}.get(err["type"])
    if err["type"] == "value_error":
        what = err["msg"].removeprefix("Value error, ")
    elif what is None:
        what = f"{err['msg']} (got {json.dumps(err['input'], default=str)[:60]})"
    return f"field {where}: {what}" if where else what


def parse(model: type[Record], data, where: str) -> Record:
    """`data` as `model`, or one SiclipError naming `where` and the first field that is wrong."""
    try:
        return model.model_validate(data)
    except ValidationError as e:
        raise SiclipError(f"{where}: {_problem(e)}: not what this siclip writes (an edit, or a siclip before this "
                          f"release?); restore the manifest, or delete it and rerun the stage to rebuild") from None


def read_json_or_fail(path: Path) -> dict:
    try:
        return json.loads(Path(path).read_text())
    except json.JSONDecodeError as e:
        raise SiclipError(f"{path}: not valid JSON ({e.msg} at line {e.lineno}); restore it or delete it to rebuild") from None


def file_record(root: DataRoot, path: Path) -> FileRecord:
    """The record of one finished file."""
    return FileRecord(bytes=Path(path).stat().st_size, sha256=sha256_file(path))


def check_entry(root: DataRoot, path: Path, stage: str, unit, entry) -> Entry:
    """The entry of `unit`, typed; refused when it names a unit or a file outside the data root, or is
    not shaped as this stage's entries."""
    where = f"{path}: entry {unit!r}"
    problem = leaves_root(unit) if stage == "train" else (None if SHARD_UNIT.match(unit) else "is not a shard name")
    if problem:
        raise SiclipError(f"{where}: the unit name {problem}; a manifest lists only units inside its data root {root.root}")
    files = entry.get("files") if isinstance(entry, dict) else None
    for rel in files if isinstance(files, dict) else ():  # checked before anything else is read of it
        problem = leaves_root(rel)
        if problem:
            raise SiclipError(f"{where}: file {rel!r} {problem}; a manifest lists only files inside its data root "
                              f"{root.root}")
    return parse(ENTRY_TYPES[stage], entry, where)


@dataclass
class StageManifest:
    """What one stage made: `entries[unit]`, typed by stage (ENTRY_TYPES), its `params` and its `info`."""

    stage: str
    entries: dict[str, Entry] = field(default_factory=dict)
    params: dict = field(default_factory=dict)
    info: StageInfo = field(default_factory=StageInfo)

    @classmethod
    def load(cls, root: DataRoot, stage: str) -> "StageManifest":
        path = root.manifest_path(stage)
        if not path.exists():
            return cls(stage)
        d = read_json_or_fail(path)
        if not isinstance(d, dict) or d.get("stage") != stage or not isinstance(d.get("entries"), dict):
            raise SiclipError(f"{path}: not a siclip '{stage}' manifest")
        if d.get("schema_version") != SCHEMA_VERSION:
            raise SiclipError(f"{path}: manifest schema version {d.get('schema_version')!r}, this siclip reads version "
                              f"{SCHEMA_VERSION}; use the siclip that wrote it, or rerun the '{stage}' stage into a new "
                              f"data root")
        entries = {unit: check_entry(root, path, stage, unit, entry) for unit, entry in d["entries"].items()}
        f = parse(ManifestFile, d, str(path))
        return cls(stage, entries, f.params, f.info)

    def add(self, root: DataRoot, unit: str, files: list[Path], samples: int, **fields) -> Entry:
        """Hash `files` (already in their final place) and record them as unit `unit`, with the stage's
        other `fields`."""
        entry = ENTRY_TYPES[self.stage](
            files={root.rel(p): file_record(root, p) for p in files}, samples=int(samples),
            finished_at=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), **fields)
        self.entries[unit] = entry
        return entry

    def save(self, root: DataRoot) -> None:
        atomic_write_json(root.manifest_path(self.stage), ManifestFile(
            stage=self.stage, schema_version=SCHEMA_VERSION, params=self.params, info=self.info,
            entries={unit: e.dump() for unit, e in sorted(self.entries.items())},
            totals=Totals(files=self.total_files, samples=self.total_samples, bytes=self.total_bytes)).dump())

    @property
    def total_bytes(self) -> int:
        return sum(f.bytes for e in self.entries.values() for f in e.files.values())

    @property
    def total_files(self) -> int:
        return sum(len(e.files) for e in self.entries.values())

    @property
    def total_samples(self) -> int:
        return sum(e.samples for e in self.entries.values())

    def files(self) -> Iterator[tuple[str, FileRecord]]:
        for e in self.entries.values():
            yield from e.files.items()

    def entry_ok(self, root: DataRoot, unit: str, rehash: bool = False) -> bool:
        """A unit counts as done when its entry exists and its files are there at the recorded size
        (and hash, with `rehash`)."""
        e = self.entries.get(unit)
        if e is None:
            return False
        return all(check_file(root, rel, rec, rehash) is None for rel, rec in e.files.items())


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
            entry = m.entries.get(unit)
            if entry is not None:
                out.update({rel: rec.sha256 for rel, rec in entry.files.items() if rel.endswith(READ_FILES)})
        return out

    def changed(self, unit: str, entry: SidecarEntry) -> str | None:
        """The first input `entry` recorded that is gone or different now, else None."""
        now = self.of(unit)
        return next((rel for rel, sha in entry.inputs.items() if now.get(rel) != sha), None)


def check_file(root: DataRoot, rel: str, rec: FileRecord, rehash: bool = True) -> str | None:
    """None when the file matches its record, else 'missing' or the kind of corruption."""
    p = root.abs(rel)
    if not p.exists():
        return "missing"
    size = p.stat().st_size
    if size != rec.bytes:
        return f"size {size} != recorded {rec.bytes}"
    if rehash and sha256_file(p) != rec.sha256:
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
