"""Small data roots for the training tests: real webdataset tars with real JPEGs, listed in a real shards
manifest, with caption and teacher sidecars written by stage 2's own writers."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch

from siclip.manifests.layout import DataRoot, shard_name
from siclip.manifests.manifest import StageManifest
from siclip.manifests.storage import write_storage

# four quadrant colours: a recorded crop of quadrant q shows colour q (see quadrant_image)
QUADRANTS = [(230, 20, 20), (20, 200, 40), (30, 40, 230), (240, 220, 30)]


def quadrant_image(size: int = 64) -> bytes:
    """A JPEG whose four quadrants (top-left, top-right, bottom-left, bottom-right) have distinct colours."""
    from PIL import Image

    img = Image.new("RGB", (size, size))
    h = size // 2
    for q, colour in enumerate(QUADRANTS):
        img.paste(colour, (h * (q % 2), h * (q // 2), h * (q % 2) + h, h * (q // 2) + h))
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=95)
    return buf.getvalue()


def quadrant_crop(q: int) -> list[float]:
    """The recorded augmentation [x0, y0, w, h, flip] that shows quadrant q (shrunk a little off the edges)."""
    return [0.5 * (q % 2) + 0.05, 0.5 * (q // 2) + 0.05, 0.4, 0.4, 0.0]


def key_of(shard: int, i: int) -> str:
    return f"{shard:05d}{i:04d}"


def make_root(folder: Path, sizes: list[int], captions: int = 0, missing_captions: set[str] = frozenset(),
              teacher_views: int = -1, dim: int = 8, budget: int = 10**9, recorded: list | None = None) -> DataRoot:
    """A data root with one shard per entry of `sizes` (that many samples each).

    captions > 0: caption sidecars with that many captions per sample (keys in `missing_captions` get a
    failure status instead); teacher_views >= 0: teacher sidecars with that many recorded views, where
    view v (1-based) crops quadrant v-1 and its image embedding is the one-hot vector e_v (e_0: the plain image).
    `recorded`: the views' augmentations [x0, y0, w, h, flip] instead, the same for every sample.
    """
    from siclip.captioning.sidecar import write_caption_sidecar, write_teacher_sidecar

    root = DataRoot(folder)
    root.shards.mkdir(parents=True, exist_ok=True)
    manifest = StageManifest.load(root, "shards")
    image = quadrant_image()
    cap_manifest, t_manifest = StageManifest.load(root, "captions"), StageManifest.load(root, "teacher")
    for s, n in enumerate(sizes):
        name = shard_name(s)
        tar = root.shards / f"{name}.tar"
        keys = [key_of(s, i) for i in range(n)]
        with tarfile.open(tar, "w") as tf:
            for k in keys:
                for ext, data in (("jpg", image), ("txt", f"web caption of {k}".encode()), ("json", b"{}")):
                    info = tarfile.TarInfo(f"{k}.{ext}")
                    info.size = len(data)
                    tf.addfile(info, io.BytesIO(data))
        manifest.add(root, name, [tar], n, rows=n, failures={})
        if captions:
            path = root.captions / f"{name}.arrow"
            caps = [[] if k in missing_captions else [f"synthetic {j} of {k}" for j in range(captions)] for k in keys]
            status = ["cannot decode jpg" if k in missing_captions else "ok" for k in keys]
            write_caption_sidecar(path, keys, caps, status, {"stage": "captions", "shard": name})
            cap_manifest.add(root, name, [path], n, params={}, model="made-up", failed={}, inputs={})
        if teacher_views >= 0 or recorded is not None:
            views = teacher_views if recorded is None else len(recorded)
            image_emb = np.zeros((n, 1 + views, dim), np.float16)
            for v in range(1 + views):
                image_emb[:, v, v % dim] = 1
            text = [np.eye(1 + captions, dim, dtype=np.float16) for _ in keys]  # text j = e_j
            per_sample = recorded if recorded is not None else [quadrant_crop(v % 4) for v in range(views)]
            aug = np.array([per_sample for _ in keys], np.float32).reshape(n, views, 5)
            path = root.teacher / f"{name}.arrow"
            write_teacher_sidecar(path, keys, image_emb, text, aug, ["ok"] * n, "float16",
                                  {"stage": "teacher", "shard": name, "dim": dim, "teachers": [{"id": "made-up"}]})
            t_manifest.add(root, name, [path], n, params={}, model=["made-up"], failed={}, inputs={})
    manifest.save(root)
    if captions:
        cap_manifest.save(root)
    if teacher_views >= 0 or recorded is not None:
        t_manifest.save(root)
    write_storage(root, budget_bytes=budget, reserve_bytes=0)
    return root


def weights(folder: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(folder / "model.safetensors"))


def losses(run: Path) -> list[tuple[int, float]]:
    return [(r["step"], r["loss"]) for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())
            if "loss" in r]


def assert_same_end(a: Path, b: Path) -> None:
    """Two runs of one config (one of them killed and resumed) end with the same weights, losses and samples."""
    wa, wb = weights(a / "final"), weights(b / "final")
    assert wa.keys() == wb.keys()
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], atol=1e-6, rtol=0, msg=lambda m: f"{k}: {m}")
    assert [s for s, _ in losses(a)] == [s for s, _ in losses(b)]
    assert [v for _, v in losses(a)] == pytest.approx([v for _, v in losses(b)], abs=1e-6)
    ka = (a / "keys-rank0.jsonl").read_text().splitlines()
    kb = (b / "keys-rank0.jsonl").read_text().splitlines()
    assert ka == kb, "the resumed run trained on other samples, or repeated or skipped some"


# a small SiCLIP (16 px images, two blocks per tower sharing attention) for runs whose point is the bookkeeping
SMALL_MODEL = ['image.image_size=16', 'image.patch_size=8', 'image.width=32', 'image.depth=2', 'image.heads=2',
               'image.share_attention=[[1, 2]]', 'text.width=32', 'text.depth=2', 'text.heads=2',
               'text.share_attention=[[1, 2]]', 'text.context_length=16', 'embed_dim=16']


def small_config(path: Path, body: str = "", steps: int = 2) -> Path:
    """A one-stage config of SMALL_MODEL on web captions, batches of 8, no loader workers; `body`: more keys."""
    path.write_text(f"model_set = {json.dumps(SMALL_MODEL)}\nbatch_size = 8\nworkers = 0\nsynthetic_captions = 0\n"
                    f"{body}\n[[stages]]\nname = 'one'\nsteps = {steps}\nlr = 1e-3\n"
                    f"[stages.loss]\nclip_web = 1.0\nclip_synthetic = 0.0\n")
    return path
