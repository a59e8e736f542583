"""Arrow sidecars: `CaptionSidecar` (key, captions, status) and `TeacherSidecar` (key, embeddings, …).

A sidecar is written to a temp file and renamed into place, so it exists only when complete; its
provenance (model, revision, parameters) sits in the schema metadata under b'siclip'.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.ipc as ipc

from siclip.manifests.io import atomic_write
from siclip.manifests.samples import SIDECAR_META_KEY, read_sidecar

OK = "ok"


def _write_table(path: Path, table: pa.Table) -> None:
    def write(tmp: Path) -> None:
        with pa.OSFile(str(tmp), "wb") as sink, ipc.new_file(sink, table.schema) as writer:
            writer.write_table(table)

    atomic_write(path, write)


def _with_meta(schema: pa.Schema, provenance: dict) -> pa.Schema:
    return schema.with_metadata({SIDECAR_META_KEY: json.dumps(provenance, sort_keys=True).encode()})


def write_caption_sidecar(path: Path, keys: list[str], captions: list[list[str]], statuses: list[str],
                          provenance: dict) -> None:
    """One row per sample: its key, its captions (empty when it failed) and 'ok' or the reason."""
    schema = _with_meta(pa.schema([("key", pa.string()), ("captions", pa.list_(pa.string())), ("status", pa.string())]),
                        provenance)
    table = pa.Table.from_arrays([pa.array(keys, pa.string()), pa.array(captions, pa.list_(pa.string())),
                                  pa.array(statuses, pa.string())], schema=schema)
    _write_table(path, table)


def _fixed(values: np.ndarray, dims: list[int]) -> pa.Array:
    """A flat numpy array as nested fixed-size lists with inner sizes `dims` (outermost first)."""
    arr = pa.array(values.reshape(-1))
    for d in reversed(dims):
        arr = pa.FixedSizeListArray.from_arrays(arr, d)
    return arr


def storage_array(emb, dtype: str) -> np.ndarray:
    """A float torch tensor as float16, or as bfloat16 bits in uint16 (Arrow has no bfloat16)."""
    import torch

    if dtype == "bfloat16":
        return emb.to(torch.bfloat16).contiguous().view(torch.int16).numpy().view(np.uint16)
    return emb.to(torch.float16).numpy()


def write_teacher_sidecar(path: Path, keys: list[str], image_emb: np.ndarray, text_emb: list[np.ndarray],
                          aug_params: np.ndarray | None, statuses: list[str], dtype: str, provenance: dict) -> None:
    """`image_emb` (rows, 1 + K, dim): row 0 the plain image, then the K recorded augmentations;
    `text_emb[i]` (texts_i, dim): the web caption, then each synthetic caption."""
    n, views, dim = image_emb.shape
    field_meta = {b"dtype": dtype.encode()}
    img = _fixed(image_emb, [views, dim])
    flat_text = np.concatenate(text_emb) if text_emb else np.zeros((0, dim), image_emb.dtype)
    offsets = np.concatenate([[0], np.cumsum([len(t) for t in text_emb])]).astype(np.int32)
    txt = pa.ListArray.from_arrays(pa.array(offsets), _fixed(flat_text, [dim]))
    fields = [pa.field("key", pa.string()), pa.field("image_emb", img.type, metadata=field_meta),
              pa.field("text_emb", txt.type, metadata=field_meta), pa.field("status", pa.string())]
    arrays = [pa.array(keys, pa.string()), img, txt, pa.array(statuses, pa.string())]
    if aug_params is not None and aug_params.shape[1] > 0:
        aug = _fixed(aug_params.astype(np.float32), [aug_params.shape[1], aug_params.shape[2]])
        fields.append(pa.field("aug_params", aug.type))
        arrays.append(aug)
    schema = _with_meta(pa.schema(fields), provenance)
    _write_table(path, pa.Table.from_arrays(arrays, schema=schema))


def complete_sidecar(path: Path, params: dict) -> int | None:
    """Rows of a readable sidecar made with `params`, else None: lets a rerun adopt a sidecar whose
    manifest entry a kill prevented."""
    try:
        table, info = read_sidecar(path)
    except Exception:
        return None
    return table.num_rows if info.get("params") == params else None
