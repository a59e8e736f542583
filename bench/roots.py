"""Generated data roots for the benchmarks: shards of JPEGs in stage 1's layout with caption sidecars, and teacher
sidecars where asked, listed in manifests and counted against a budget as the stages would."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import numpy as np

from siclip.manifests.layout import DataRoot, shard_name
from siclip.manifests.manifest import StageManifest
from siclip.manifests.storage import write_storage


def make_bench_root(folder: Path, shards: int, per_shard: int, size: int = 160, seed: int = 0,
                    jpegs: list[bytes] | None = None, teacher_dim: int = 0, teacher_views: int = 5) -> DataRoot:
    """Shards of noisy JPEGs (the decode cost of real photos), or of `jpegs` taken in turn, with captions
    sidecars (3 captions each), listed in manifests. teacher_dim > 0: teacher sidecars too, as `siclip teacher
    --augmentations teacher_views` writes them (random unit embeddings in float16, random crops recorded)."""
    import pyarrow as pa
    import pyarrow.ipc as ipc
    from PIL import Image

    rng = np.random.default_rng(seed)
    root = DataRoot(folder)
    root.shards.mkdir(parents=True, exist_ok=True)
    root.captions.mkdir(parents=True, exist_ok=True)
    shards_m, captions_m = StageManifest.load(root, "shards"), StageManifest.load(root, "captions")
    for s in range(shards):
        name, keys = shard_name(s), [f"{s:05d}{i:04d}" for i in range(per_shard)]
        tar = root.shards / f"{name}.tar"
        with tarfile.open(tar, "w") as tf:
            for i, k in enumerate(keys):
                if jpegs:
                    jpeg = jpegs[(s * per_shard + i) % len(jpegs)]
                else:
                    buf = io.BytesIO()
                    Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(buf, "JPEG",
                                                                                                 quality=90)
                    jpeg = buf.getvalue()
                for ext, data in (("jpg", jpeg), ("txt", f"a photo of sample {k}".encode())):
                    info = tarfile.TarInfo(f"{k}.{ext}")
                    info.size = len(data)
                    tf.addfile(info, io.BytesIO(data))
        shards_m.add(root, name, [tar], per_shard, rows=per_shard, failures={})
        table = pa.table({"key": keys, "captions": [[f"synthetic {j} of {k}" for j in range(3)] for k in keys],
                          "status": ["ok"] * per_shard})
        path = root.captions / f"{name}.arrow"
        with pa.OSFile(str(path), "wb") as sink, ipc.new_file(sink, table.schema) as w:
            w.write_table(table)
        captions_m.add(root, name, [path], per_shard, params={}, model="bench", failed={}, inputs={})
        if teacher_dim:
            _teacher_sidecar(root, name, keys, teacher_dim, teacher_views, rng)
    shards_m.save(root)
    captions_m.save(root)
    write_storage(root, budget_bytes=10**12, reserve_bytes=0)
    return root


def _teacher_sidecar(root: DataRoot, name: str, keys: list[str], dim: int, views: int, rng) -> None:
    from siclip.captioning.sidecar import write_teacher_sidecar

    def unit(*shape):
        x = rng.standard_normal(shape).astype(np.float32)
        return (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float16)

    n = len(keys)
    side = rng.uniform(0.6, 1.0, (n, views, 1))
    corner = rng.uniform(0, 1, (n, views, 2)) * (1 - side)
    aug = np.concatenate([corner, side, side, rng.integers(0, 2, (n, views, 1))], axis=-1).astype(np.float32)
    path = root.teacher / f"{name}.arrow"
    path.parent.mkdir(parents=True, exist_ok=True)
    write_teacher_sidecar(path, keys, unit(n, 1 + views, dim), [unit(4, dim) for _ in keys], aug, ["ok"] * n,
                          "float16", {"stage": "teacher", "shard": name, "dim": dim, "teachers": [{"id": "bench"}]})
    m = StageManifest.load(root, "teacher")
    m.add(root, name, [path], n, params={}, model=["bench"], failed={}, inputs={})
    m.save(root)
