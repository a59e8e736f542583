"""Small helpers the captioning tests share."""

from __future__ import annotations

import pyarrow.ipc as ipc

from manifests.cli import main
from manifests.samples import iter_shard


def captions(root, *extra: str) -> int:
    """Run `siclip captions` in this process on `root` with the tiny captioner and short captions."""
    return main(["captions", "--data", str(root.root), "--model", "tiny", "--max-new-tokens", "12", *extra])


def sidecar_rows(path) -> dict:
    with open(path, "rb") as f:
        table = ipc.open_file(f).read_all()
    return {r["key"]: (r["captions"], r["status"]) for r in table.to_pylist()}


def tar_keys(path) -> list[str]:
    return [s["__key__"] for s in iter_shard(path)]


def all_sidecars(root) -> dict:
    return {p.name: sidecar_rows(p) for p in sorted(root.captions.glob("*.arrow"))}
