"""Small helpers the captioning tests share."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.ipc as ipc

from siclip.cli import main
from siclip.manifests.samples import embeddings, iter_shard


def captions(root, *extra: str) -> int:
    """Run `siclip captions` in this process on `root` with the tiny captioner and short captions."""
    return main(["captions", "--data", str(root.root), "--model", "tiny", "--max-new-tokens", "12", *extra])


def teacher(root, *extra: str) -> int:
    """Run `siclip teacher` in this process on `root`."""
    return main(["teacher", "--data", str(root.root), "--workers", "0", *extra])


def text_embeddings(table) -> list[np.ndarray]:
    """text_emb of each row as a float32 (texts, dim) array, decoded as `embeddings` decodes image_emb."""
    col = table.column("text_emb").combine_chunks()
    flat = embeddings(pa.table({"e": col.flatten()}), "e")
    offsets = col.offsets.to_numpy()
    return [flat[a:b] for a, b in zip(offsets[:-1], offsets[1:])]


def sidecar_rows(path) -> dict:
    with open(path, "rb") as f:
        table = ipc.open_file(f).read_all()
    return {r["key"]: (r["captions"], r["status"]) for r in table.to_pylist()}


def tar_keys(path) -> list[str]:
    return [s["__key__"] for s in iter_shard(path)]


def all_sidecars(root) -> dict:
    return {p.name: sidecar_rows(p) for p in sorted(root.captions.glob("*.arrow"))}
