"""One task per shard, run on a worker that holds the model: read the tar, run the model in batches
while a thread decodes and preprocesses the next batch, report the rows done after each batch, write
the sidecar atomically.

A task never raises: it returns {"ok": False, "error": ...} for a shard it cannot finish, so the
other shards go on.
"""

from __future__ import annotations

import queue
import random
import threading
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

from siclip.manifests.errors import SiclipError
from siclip.manifests.manifest import FileRecord
from siclip.manifests.samples import CorruptShardError, iter_samples, iter_shard
from siclip.images import UnreadableImage, apply_view, decode_image, draw_view, image_member
from siclip.captioning.models import seed_for
from siclip.captioning.sidecar import OK

_END = object()



@dataclass
class ShardTask:
    """One shard's work in stage 2, as the stage hands it to a worker (it pickles to dask workers)."""

    shard: str
    tar: str
    out: str  # the sidecar to write
    root: str  # the data root
    params: dict  # the stage's parameters, which decide the sidecar's content
    batch_size: int
    expected_samples: int | None = None  # the shards manifest's count, checked against the tar
    tar_record: FileRecord | None = None  # the shard's manifest record, checked before reading
    inputs: dict = field(default_factory=dict)  # the input files' records, written into the sidecar

def _decode_image(sample: dict):
    """(RGB image, None), or (None, why) for a sample whose image is missing or does not decode."""
    ext = image_member(sample)
    if ext is None:
        return None, "no image member"
    try:
        return decode_image(sample[ext]), None
    except UnreadableImage as e:  # a bad image is a status, never a crash
        return None, f"cannot decode {ext}: {e.reason}"


def _prefetch(produce, depth: int = 2):
    """Run generator `produce()` on a thread, `depth` items ahead; re-raise its exception here."""
    q: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def work():
        try:
            for item in produce():
                while not stop.is_set():
                    try:
                        q.put(item, timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if stop.is_set():
                    return
            q.put(_END)
        except BaseException as e:  # handed to the consumer
            q.put(e)

    t = threading.Thread(target=work, daemon=True)
    t.start()
    try:
        while True:
            item = q.get()
            if item is _END:
                return
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()


def build_captioner(**kwargs):
    """The captioner a worker holds (captioning.generate, imported on the worker, not where the stage runs)."""
    from siclip.captioning.generate import build_captioner as build

    return build(**kwargs)


def build_teachers(**kwargs):
    """The teacher ensemble a worker holds (captioning.embed, imported on the worker)."""
    from siclip.captioning.embed import build_teachers as build

    return build(**kwargs)


def _shard_failure(task: ShardTask, e: BaseException) -> dict:
    if isinstance(e, SiclipError):
        msg = str(e)
    else:
        tb = traceback.extract_tb(e.__traceback__)[-1] if e.__traceback__ else None
        msg = f"{type(e).__name__}: {e}" + (f" (at {Path(tb.filename).name}:{tb.lineno})" if tb else "")
    return {"shard": task.shard, "ok": False, "error": msg}


def _check_count(task: ShardTask, rows: int) -> None:
    if task.expected_samples is not None and rows != task.expected_samples:
        raise CorruptShardError(f"{task.tar}: {rows} samples in the tar, the shards manifest says {task.expected_samples}")


def _no_report(rows: int) -> None:
    pass


def caption_shard(task: ShardTask, captioner, report=_no_report) -> dict:
    """Caption every sample of one shard into `task.out`; `report(rows)` after each batch."""
    t0, started = time.perf_counter(), time.time()
    order: list[str] = []
    status: dict[str, str] = {}
    captions: dict[str, list[str]] = {}

    def batches():
        keys, images = [], []
        for sample in iter_shard(Path(task.tar), task.tar_record):
            key = sample["__key__"]
            order.append(key)
            img, why = _decode_image(sample)
            if img is None:
                status[key] = why
                continue
            keys.append(key)
            images.append(img)
            if len(keys) == task.batch_size:
                yield keys, captioner.prepare(images), len(order)  # the rows read so far, failed ones too
                keys, images = [], []
        if keys:
            yield keys, captioner.prepare(images), len(order)

    try:
        for keys, pixels, read in _prefetch(batches):
            for key, caps in zip(keys, captioner.caption(pixels, keys)):
                captions[key] = caps
            report(read)
        _check_count(task, len(order))
        from siclip.captioning.sidecar import write_caption_sidecar

        provenance = {"stage": "captions", "shard": task.shard, "model": captioner.model_id,
                      "revision": captioner.revision, "params": task.params, "inputs": task.inputs}
        write_caption_sidecar(Path(task.out), order, [captions.get(k, []) for k in order],
                              [status.get(k, OK) for k in order], provenance)
    except Exception as e:
        return _shard_failure(task, e)
    failed: dict[str, int] = {}
    for why in status.values():
        failed[why] = failed.get(why, 0) + 1
    return {"shard": task.shard, "ok": True, "rows": len(order), "failed": failed,
            "model": captioner.model_id, "revision": captioner.revision,
            "timing": {"seconds": round(time.perf_counter() - t0, 3), "started": started, "finished": time.time()}}


def teacher_shard(task: ShardTask, teachers, report=_no_report) -> dict:
    """Image embeddings (plain + K augmentations) and text embeddings (web + synthetic captions);
    `report(rows)` after each batch."""
    import numpy as np
    import torch

    from siclip.captioning.sidecar import storage_array, write_teacher_sidecar
    from siclip.manifests.layout import DataRoot

    t0, started = time.perf_counter(), time.time()
    p = task.params
    K, dim = p["augmentations"], teachers.dim
    out_keys, statuses, img_rows, txt_rows, augs = [], [], [], [], []

    def samples():
        if p["captions"]:
            yield from iter_samples(DataRoot(task.root), task.shard, ("captions",), tar_path=Path(task.tar))
        else:
            yield from iter_shard(Path(task.tar), task.tar_record)

    def batches():
        batch = []
        for sample in samples():
            key = sample["__key__"]
            img, why = _decode_image(sample)
            texts = [sample.get("txt", b"").decode("utf-8", errors="replace")]
            if "captions" in sample:
                texts += sample["captions"]["captions"]
            params = [draw_view(random.Random(seed_for(p["seed"], key, 1000 + k)), tuple(p["crop_scale"]),
                                p.get("flip", True)) for k in range(K)]
            views = [img] + [apply_view(img, q) for q in params] if img is not None else None
            batch.append((key, why, views, texts, params))
            if len(batch) == task.batch_size:
                yield batch, teachers.prepare([v for b in batch if b[2] for v in b[2]])
                batch = []
        if batch:
            yield batch, teachers.prepare([v for b in batch if b[2] for v in b[2]])

    try:
        for batch, pixels in _prefetch(batches):
            img_emb = teachers.embed_images(pixels) if pixels is not None else None
            texts = [t for b in batch for t in b[3]]
            txt_emb = teachers.embed_texts(texts)
            i = t = 0
            for key, why, views, tx, params in batch:
                out_keys.append(key)
                statuses.append(why or OK)
                if views:
                    img_rows.append(img_emb[i:i + 1 + K])
                    i += 1 + K
                else:  # no image: zeros, and the status says why
                    img_rows.append(torch.zeros(1 + K, dim))
                txt_rows.append(txt_emb[t:t + len(tx)])
                t += len(tx)
                augs.append(params if params else [[0.0] * 5] * K)
            report(len(out_keys))
        _check_count(task, len(out_keys))
        image = storage_array(torch.stack(img_rows), p["dtype"]) if img_rows else np.zeros((0, 1 + K, dim), np.float16)
        text = [storage_array(x, p["dtype"]) for x in txt_rows]
        aug = np.asarray(augs, np.float32).reshape(len(out_keys), K, 5) if K else None
        provenance = {"stage": "teacher", "shard": task.shard, "teachers": teachers.describe(), "dim": dim,
                      "dtype": p["dtype"], "augmentations": K, "aug_params": ["x0", "y0", "w", "h", "flip"],
                      "text_emb": "web caption first, then each synthetic caption in caption-sidecar order",
                      "image_emb": "plain image first, then each augmentation; each teacher L2-normalised, concatenated, "
                                   "normalised again (unit length: the mean-cosine ensemble)",
                      "params": p, "inputs": task.inputs}
        write_teacher_sidecar(Path(task.out), out_keys, image, text, aug, statuses, p["dtype"], provenance)
    except Exception as e:
        return _shard_failure(task, e)
    failed: dict[str, int] = {}
    for s in statuses:
        if s != OK:
            failed[s] = failed.get(s, 0) + 1
    return {"shard": task.shard, "ok": True, "rows": len(out_keys), "failed": failed,
            "model": [d["id"] for d in teachers.describe()],
            "timing": {"seconds": round(time.perf_counter() - t0, 3), "started": started, "finished": time.time()}}
