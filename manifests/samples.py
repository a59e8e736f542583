"""Reading a shard's samples, alone or joined by key with their sidecars (captions, teacher).

A shard is a webdataset tar (`<key>.jpg`, `<key>.txt`, `<key>.json`, members of one sample next to
each other); a sidecar is an Arrow IPC file under `DATA/<stage>/<shard>.arrow` with one row per
sample and a `key` column. Training reads shards and sidecars through this module only.
"""

from __future__ import annotations

import functools
import json
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

from siclip.manifests.errors import SiclipError
from siclip.manifests.io import sha256_file
from siclip.manifests.layout import DataRoot
from siclip.manifests.manifest import FileRecord, StageManifest

SIDECAR_STAGES = ("captions", "teacher")
REPAIR = "siclip manifest DATA --verify --repair drops it so that its stage's rerun redoes it"
SIDECAR_META_KEY = b"siclip"  # schema metadata key holding the sidecar's provenance as JSON


class CorruptShardError(SiclipError):
    """A shard tar that cannot be read to the end."""


class SidecarMismatchError(SiclipError):
    """A sidecar whose keys do not match its shard's samples."""


@dataclass(frozen=True)
class ShardRef:
    """One finished stage-1 shard, as its manifest lists it."""

    name: str
    tar: Path
    samples: int
    tar_record: FileRecord  # from the shards manifest


def finished_shards(root: DataRoot | str | Path) -> list[ShardRef]:
    """The shards stage 1 finished, by name; a shard missing from its manifest is not finished."""
    root = _data_root(root)
    m = StageManifest.load(root, "shards")
    out = []
    for name, entry in sorted(m.entries.items()):
        tars = [rel for rel in entry.files if rel.endswith(".tar")]
        if len(tars) != 1:
            raise SiclipError(f"{root.manifest_path('shards')}: entry {name!r} lists {len(tars)} tar files, expected 1")
        out.append(ShardRef(name, root.abs(tars[0]), entry.samples, entry.files[tars[0]]))
    return out


def _data_root(root: DataRoot | str | Path) -> DataRoot:
    return root if isinstance(root, DataRoot) else DataRoot(root)


@functools.lru_cache(maxsize=8)
def _manifest_as_of(root: DataRoot, stage: str, signature: tuple) -> StageManifest:
    return StageManifest.load(root, stage)


def stage_manifest(root: DataRoot, stage: str) -> StageManifest:
    """The stage's manifest, parsed again only when its file changed: a loader worker opens one shard
    after another, and a large data root's manifest takes a while to read."""
    try:
        st = root.manifest_path(stage).stat()
        signature = (st.st_ino, st.st_size, st.st_mtime_ns)
    except FileNotFoundError:
        signature = ()
    return _manifest_as_of(root, stage, signature)


def check_whole(path: Path, record: FileRecord, what: str) -> None:
    """Refuse a file that is not as its manifest recorded it: size, then sha256 (one read of the file;
    the reader's own read that follows finds it in the page cache)."""
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        raise CorruptShardError(f"{what} {path} is missing ({REPAIR})") from None
    if size != record.bytes:
        raise CorruptShardError(f"{what} {path} is {size} bytes, its manifest says {record.bytes} ({REPAIR})")
    if sha256_file(path) != record.sha256:
        raise CorruptShardError(f"{what} {path} changed since its manifest recorded it (sha256 differs; {REPAIR})")


def sidecar_path(root: DataRoot, stage: str, shard: str) -> Path:
    if stage not in SIDECAR_STAGES:
        raise SiclipError(f"unknown sidecar stage {stage!r}; valid: {', '.join(SIDECAR_STAGES)}")
    return getattr(root, stage) / f"{shard}.arrow"


def _split_member(name: str) -> tuple[str, str] | None:
    """'dir/000010001.jpg' -> ('dir/000010001', 'jpg'): the key ends at the first dot of the basename."""
    slash = name.rfind("/") + 1
    dot = name.find(".", slash)
    if dot < 0:
        return None
    return name[:dot], name[dot + 1:]


def iter_shard(tar_path: Path | str, record: FileRecord | None = None) -> Iterator[dict]:
    """Yield `{"__key__": key, "__url__": tar, ext: bytes, ...}` per sample of a webdataset tar, in tar order.

    The tar is read by webdataset's own member iterator (the one reader of the project: stage 2
    and the training loader both come through here). Raises CorruptShardError (naming the tar)
    when it cannot be read to its end or a key appears twice, and, given its manifest `record`
    (size, sha256), before the first sample when the tar is not the one recorded.
    """
    from webdataset.tariterators import tar_file_iterator

    tar_path = Path(tar_path)
    if record is not None:
        check_whole(tar_path, record, "shard")
    current: dict | None = None
    seen: set[str] = set()
    try:
        with open(tar_path, "rb") as stream:
            for member in tar_file_iterator(stream):
                parts = _split_member(member["fname"])
                if parts is None or Path(member["fname"]).name.startswith("."):
                    continue
                key, ext = parts
                if current is not None and key != current["__key__"]:
                    yield current
                    current = None
                if current is None:
                    if key in seen:
                        raise CorruptShardError(f"{tar_path}: key {key} appears twice (members not grouped by key)")
                    seen.add(key)
                    current = {"__key__": key, "__url__": str(tar_path)}
                if ext in current:  # the later member would silently replace the earlier one
                    raise CorruptShardError(f"{tar_path}: member {member['fname']} appears twice (key {key})")
                current[ext] = member["data"]
    except (tarfile.TarError, EOFError, OSError, ValueError) as e:
        msg = str(e.args[0]) if e.args else type(e).__name__
        raise CorruptShardError(f"{tar_path}: unreadable tar ({type(e).__name__}: {msg.split(' @ ')[0]})") from None
    if current is not None:
        yield current


def shard_samples(shards: Iterable[dict]) -> Iterator[dict]:
    """A webdataset pipeline stage: `{"url": tar path, "record": manifest record or absent}` items in,
    their samples out (see iter_shard)."""
    for shard in shards:
        yield from iter_shard(shard["url"], shard.get("record"))


def read_sidecar(path: Path):
    """(pyarrow Table, provenance dict) of one sidecar; a clear error when it is not one."""
    import pyarrow as pa
    import pyarrow.ipc as ipc

    path = Path(path)
    if not path.is_file():
        raise SiclipError(f"sidecar {path} does not exist")
    try:
        with pa.memory_map(str(path)) as src:
            table = ipc.open_file(src).read_all()
    except (pa.ArrowInvalid, OSError) as e:
        raise SiclipError(f"{path}: not a readable Arrow IPC file ({e})") from None
    if "key" not in table.column_names:
        raise SiclipError(f"{path}: sidecar has no 'key' column")
    meta = table.schema.metadata or {}
    try:
        info = json.loads(meta[SIDECAR_META_KEY]) if SIDECAR_META_KEY in meta else {}
    except json.JSONDecodeError:
        raise SiclipError(f"{path}: sidecar provenance metadata is not valid JSON") from None
    return table, info


def _fixed_rows(values, shape: list[int]):
    """Flatten nested fixed-size lists into a numpy array of `shape + inner sizes`, decoding bfloat16 bits."""
    import numpy as np
    import pyarrow as pa

    typ = values.type
    while pa.types.is_fixed_size_list(typ):
        shape.append(typ.list_size)
        values = values.flatten()
        typ = typ.value_type
    arr = values.to_numpy(zero_copy_only=False)
    if arr.dtype == np.uint16:  # bfloat16 bits: the high half of a float32
        arr = (arr.astype(np.uint32) << 16).view(np.float32)
    return arr.astype(np.float32).reshape(shape)


def embeddings(table, column: str, row: int | None = None):
    """A teacher embedding column as float32 numpy: every row (rows, ..., dim), or one row (..., dim).

    Stored as float16, or as bfloat16 bits in uint16 (Arrow has no bfloat16). A variable-length
    column (text_emb: one embedding per caption) gives one row's (texts, dim); it needs `row`.
    """
    import pyarrow as pa

    col = table.column(column)
    if row is None:
        col = col.combine_chunks()
        if pa.types.is_list(col.type):
            raise ValueError(f"column {column!r} has a variable number of embeddings per row; read it one row at a time")
        return _fixed_rows(col, [len(col)])
    values = col.slice(row, 1).combine_chunks()
    if pa.types.is_list(values.type):  # one row of a list<fixed_size_list>: its items become the first axis
        values = values.flatten()
        return _fixed_rows(values, [len(values)])
    return _fixed_rows(values, [])


class ShardSidecars:
    """The sidecars of one shard, loaded once and looked up by sample key (memory-mapped Arrow)."""

    def __init__(self, root: DataRoot, shard: str, stages: tuple[str, ...]):
        self.shard, self.tables, self.paths, self.index = shard, {}, {}, {}
        for stage in stages:
            path = sidecar_path(root, stage, shard)
            if not path.exists():
                raise SidecarMismatchError(f"shard {shard}: no {stage} sidecar at {path}")
            # read whole against its record: a sidecar is small beside its shard, and a changed byte in
            # an Arrow buffer reads as a different caption or embedding, with no error of its own
            entry = stage_manifest(root, stage).entries.get(shard)
            record = entry.files.get(root.rel(path)) if entry else None
            if record is None:
                raise SidecarMismatchError(f"shard {shard}: {stage} sidecar {path} is not listed in "
                                           f"{root.manifest_path(stage)} (run 'siclip {stage}' to finish it)")
            check_whole(path, record, f"{stage} sidecar")
            table, _ = read_sidecar(path)
            keys = table.column("key").to_pylist()
            index = {k: i for i, k in enumerate(keys)}
            if len(index) != len(keys):
                dup = next(k for i, k in enumerate(keys) if index[k] != i)
                raise SidecarMismatchError(f"shard {shard}: {stage} sidecar {path} has key {dup} twice")
            self.tables[stage], self.paths[stage], self.index[stage] = table, path, index

    def row(self, stage: str, key: str) -> int:
        """The row of `key` in the stage's sidecar; SidecarMismatchError naming shard, sidecar and key."""
        i = self.index[stage].get(key)
        if i is None:
            raise SidecarMismatchError(f"shard {self.shard}: sample key {key} has no row in {stage} sidecar "
                                       f"{self.paths[stage]}")
        return i

    def values(self, stage: str, key: str, columns: tuple[str, ...] | None = None) -> dict:
        """`{column: python value}` of the key's row (all columns but the key, or `columns`)."""
        table, i = self.tables[stage], self.row(stage, key)
        names = columns or [c for c in table.column_names if c != "key"]
        return {c: table.column(c)[i].as_py() for c in names if c in table.column_names}

    def check_all_used(self, used: set[str]) -> None:
        """Every sidecar row was matched by a sample of the shard."""
        for stage, index in self.index.items():
            if len(used) != len(index) or not used.issuperset(index):
                extra = next(k for k in index if k not in used)
                raise SidecarMismatchError(f"shard {self.shard}: {stage} sidecar {self.paths[stage]} has key "
                                           f"{extra} that the shard does not")


def iter_samples(root: DataRoot | str | Path, shard: str, sidecars: tuple[str, ...] = ("captions",),
                 tar_path: Path | None = None) -> Iterator[dict]:
    """Yield each sample of `shard` (tar members by extension) with `sample[stage] = {column: value}`
    for every sidecar in `sidecars`, joined by key.

    The shard and its sidecars must be listed in their manifests and be the files recorded there
    (CorruptShardError otherwise, before the first sample). Raises SidecarMismatchError naming the
    shard, the sidecar and the first key without a match.
    """
    root = _data_root(root)
    tar_path = Path(tar_path) if tar_path else root.shards / f"{shard}.tar"
    entry = stage_manifest(root, "shards").entries.get(shard)
    if entry is None or root.rel(tar_path) not in entry.files:
        raise CorruptShardError(f"shard {shard}: {tar_path} is not a finished shard of {root.manifest_path('shards')}")
    lookup = ShardSidecars(root, shard, tuple(sidecars))
    used: set[str] = set()
    for sample in iter_shard(tar_path, entry.files[root.rel(tar_path)]):
        key = sample["__key__"]
        for stage in sidecars:
            sample[stage] = lookup.values(stage, key)
        used.add(key)
        yield sample
    if sidecars:
        lookup.check_all_used(used)
