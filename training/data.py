"""The training data: shards from the manifests, split by process and loader worker, read with
webdataset's pipeline stages, joined by key with their caption and teacher sidecars, augmented,
tokenised and batched.

One epoch, top to bottom:
  1. `split_shards`: the finished shards of the manifest, less the held-out ones (`val_samples`, `val_shards`);
  2. `plan_epoch`: the shards in a seeded order, dealt to processes, then to loader workers;
     every worker's batch count, and so the epoch's step count, follows from the manifest's
     sample counts (no sample-count flag);
  3. `WorkerStream`: per worker, a webdataset `DataPipeline`: its shards read `open_shards` at a
     time and interleaved (each through `manifests.samples`, then its sidecar join) -> seeded
     shuffle -> skip what a resumed run already used -> decode, crop, tokenise -> chunks, a
     fraction of a batch each;
  4. `Batches`: torch's DataLoader takes chunks from its workers in turn (skipping those that have
     finished), and consecutive chunks are joined into a batch, so that each batch holds samples
     of every worker's shards: batches mix even when the URL list was sorted by category.
The position in the data is the global step alone: which worker yields each chunk of a step, and
how many it yielded before, follow from the plan, so a resumed run continues at the exact next
sample. On resume the workers are renumbered so that the DataLoader's first turn falls on the
worker that is due.
"""

from __future__ import annotations

import functools
import hashlib
import itertools
import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from siclip.manifests.errors import SiclipError
from siclip.manifests.layout import DataRoot
from siclip.manifests.manifest import SIDECAR_INPUTS, FileRecord, Inputs, StageManifest
from siclip.manifests.samples import ShardSidecars, embeddings, finished_shards, shard_samples
from siclip.images import UnreadableImage, decode_image, image_member, random_resized_box, view_box, view_pixels
from siclip.training.config import TrainConfig


@dataclass(frozen=True)
class Shard:
    name: str
    tar: str
    samples: int
    tar_bytes: int
    tar_sha256: str = ""  # the shards manifest's record: each reader checks the tar against it first

    def source(self) -> dict:
        """The item `manifests.samples.shard_samples` reads."""
        return {"url": self.tar, "record": FileRecord(bytes=self.tar_bytes, sha256=self.tar_sha256)}


def all_shards(root: DataRoot) -> list[Shard]:
    """Every finished shard the shards manifest lists, by name."""
    shards = [Shard(s.name, str(s.tar), s.samples, s.tar_record.bytes, s.tar_record.sha256)
              for s in finished_shards(root)]
    if not shards:
        raise SiclipError(f"{root.root}: no finished shards in {root.manifest_path('shards')} (run 'siclip shards' first)")
    return shards


def split_shards(root: DataRoot, val_shards=0, val_samples: int = 0) -> tuple[list[Shard], list[Shard]]:
    """(training shards, held-out shards). `val_samples`: the last shards by name, empty ones skipped, that
    together hold at least that many samples; `val_shards`: a count (the last N by name) or a list of names."""
    shards = all_shards(root)
    names = [s.name for s in shards]
    if val_samples:
        held, count = set(), 0
        for s in reversed([s for s in shards if s.samples]):
            if count >= val_samples:
                break
            held.add(s.name)
            count += s.samples
        if count < val_samples or not any(s.samples for s in shards if s.name not in held):
            raise SiclipError(f"val_samples = {val_samples}: the {len(shards)} shards of {root.manifest_path('shards')} "
                              f"hold {sum(s.samples for s in shards):,} samples, too few to hold out that many and "
                              f"train on the rest; lower val_samples")
    elif isinstance(val_shards, int):
        if val_shards >= len(shards):
            raise SiclipError(f"val_shards = {val_shards} holds out every one of the {len(shards)} shards; "
                              f"leave at least one to train on")
        held = set(names[len(names) - val_shards:]) if val_shards else set()
    else:
        missing = [n for n in val_shards if n not in names]
        if missing:
            raise SiclipError(f"val_shards names {missing}, which {root.manifest_path('shards')} does not list "
                              f"(shards: {names[0]} … {names[-1]})")
        held = set(val_shards)
        if len(held) == len(shards):
            raise SiclipError("val_shards holds out every shard; leave at least one to train on")
    train, val = [s for s in shards if s.name not in held], [s for s in shards if s.name in held]
    if val and not sum(s.samples for s in val):
        raise SiclipError(f"val_shards = {val_shards!r} holds out {', '.join(s.name for s in val)}, which hold no "
                          f"samples: nothing to evaluate; hold out by samples instead (val_samples = N, val_shards = 0)")
    return train, val


def check_shards_intact(shards: list[Shard]) -> None:
    """A cheap check against silent corruption: each tar still has the size its manifest recorded."""
    for s in shards:
        p = Path(s.tar)
        if not p.is_file():
            raise SiclipError(f"shard {s.name}: {p} is missing (siclip manifest DATA --verify lists what is damaged)")
        if p.stat().st_size != s.tar_bytes:
            raise SiclipError(f"shard {s.name}: {p} is {p.stat().st_size} bytes, the manifest says {s.tar_bytes} "
                              f"(siclip manifest DATA --verify)")


def check_sidecars(root: DataRoot, stage: str, shards: list[Shard], why: str) -> None:
    """Every shard has a finished sidecar of `stage`, or one clear error naming the first that has none."""
    manifest = StageManifest.load(root, stage)
    lacking = [s.name for s in shards if not manifest.entry_ok(root, s.name)]
    if lacking:
        raise SiclipError(f"{why} needs {stage} sidecars, but {len(lacking)} of {len(shards)} shards have none "
                          f"(first: {lacking[0]}); run 'siclip {stage} --data {root.root}' first")
    inputs = Inputs(root, SIDECAR_INPUTS[stage])
    for s in shards:
        changed = inputs.changed(s.name, manifest.entries[s.name])
        if changed:
            raise SiclipError(f"the {stage} sidecar of shard {s.name} was made from another {changed} than the one "
                              f"there now (redone since); run 'siclip {stage} --data {root.root}' to redo it")


# ----------------------------------------------------------------------------- the plan of one epoch


def _rng(*parts) -> random.Random:
    """A Random seeded by its parts, the same on every machine and in every process."""
    digest = hashlib.sha256("\x00".join(map(str, parts)).encode()).digest()
    return random.Random(int.from_bytes(digest[:8], "little"))


@dataclass
class EpochPlan:
    """Which shards each loader worker of one process reads in one epoch, and how it hands them over.

    A worker yields chunks of `chunk` samples; the DataLoader takes one chunk from each worker in
    turn, skipping those that are done, and `per_batch` consecutive chunks make one batch. So every
    batch holds samples of several workers' shards, and which chunks make a step follows from the plan.
    """

    epoch: int
    rank: int
    world: int
    stripe: bool  # fewer shards than processes: every process reads every shard and keeps every world-th sample
    workers: list[list[Shard]]  # per worker of this process
    batches: list[int]  # per worker: the full batches' worth of samples it yields (batches * per_batch chunks)
    steps: int  # the epoch's steps: the fewest full batches any process has
    samples: int  # samples this process's workers read
    chunk: int  # samples per chunk, a divisor of the batch
    per_batch: int  # chunks per batch
    note: str = ""

    def deliveries(self):
        """(worker, its chunk index) of every chunk of the epoch, in the order the DataLoader delivers them."""
        quota = [b * self.per_batch for b in self.batches]
        used, w, n = [0] * len(quota), 0, len(quota)
        for _ in range(sum(quota)):
            while used[w] >= quota[w]:
                w = (w + 1) % n
            yield w, used[w]
            used[w] += 1
            w = (w + 1) % n

    def order(self, start: int = 0):
        """The chunks of each step from `start` on: per step, a tuple of (worker, its chunk index)."""
        chunks = itertools.islice(self.deliveries(), start * self.per_batch, None)
        while len(step := tuple(itertools.islice(chunks, self.per_batch))) == self.per_batch:
            yield step

    def position(self, step: int) -> tuple[list[int], int]:
        """(chunks each worker has yielded, the worker due next) after `step` steps of this epoch."""
        used, chunks = [0] * len(self.batches), self.deliveries()
        for w, i in itertools.islice(chunks, step * self.per_batch):
            used[w] = i + 1
        return used, next(chunks, (0, 0))[0]


def chunk_size(local_batch: int, workers: int) -> int:
    """The largest divisor of the batch that lets every worker give at least one chunk to each batch."""
    return max(c for c in range(1, max(local_batch // workers, 1) + 1) if local_batch % c == 0)


def _deal(shards: list[Shard], parts: int) -> list[list[Shard]]:
    """Shards into `parts` lists of about equal sample counts: largest first, each to the lightest list."""
    out, load = [[] for _ in range(parts)], [0] * parts
    for shard in sorted(shards, key=lambda s: (-s.samples, s.name)):
        i = load.index(min(load))
        out[i].append(shard)
        load[i] += shard.samples
    return [sorted(part, key=lambda s: s.name) for part in out]


def plan_epoch(shards: list[Shard], seed: int, epoch: int, rank: int, world: int, workers: int,
               local_batch: int) -> EpochPlan:
    """Deal the shards to processes, then to loader workers, and order each worker's shards for this epoch.

    The deal balances sample counts and is the same every epoch, so every epoch has the same
    number of steps; the order of each worker's shards and of its samples changes per epoch.
    Fewer shards than processes: every process reads every shard and keeps every world-th
    sample (more reading, no idle process). Fewer shards in a process than loader workers: that
    process starts only as many workers as it has shards (a worker with nothing to read would
    sit idle), and the note says so. Each worker hands over its samples in chunks small enough
    for every worker to give one to each batch.
    """
    workers = max(workers, 1)
    stripe = len(shards) < world
    per_rank_batches, mine, notes = [], None, []
    for r, rank_shards in enumerate([list(shards)] * world if stripe else _deal(shards, world)):
        if stripe:
            total = sum(s.samples for s in rank_shards)
            assignment, counts = [rank_shards], [len(range(r, total, world))]
        else:
            assignment = _deal(rank_shards, min(workers, len(rank_shards)))
            counts = [sum(s.samples for s in part) for part in assignment]
        batches = [c // local_batch for c in counts]
        per_rank_batches.append(sum(batches))
        if r == rank:
            mine = (assignment, batches, sum(counts))
    assignment, batches, samples = mine
    if stripe:
        order = sorted(shards, key=lambda s: s.name)
        _rng(seed, "shards", epoch).shuffle(order)  # one common order, so the processes' stripes are disjoint
        assignment = [order]
        notes.append(f"{len(shards)} training shard(s) for {world} processes: each process reads every shard and "
                     f"keeps every {world}th sample, with one loader worker")
    else:
        for w, part in enumerate(assignment):
            _rng(seed, "shards", epoch, rank, w).shuffle(part)
        if len(assignment) < workers:
            notes.append(f"process {rank} has {len(assignment)} shard(s) for {workers} loader workers: starting "
                         f"{len(assignment)} (a worker needs a shard of its own to read)")
    steps = min(per_rank_batches)
    chunk = chunk_size(local_batch, len(assignment))
    if steps == 0:
        raise SiclipError(f"an epoch has no full batch: {sum(s.samples for s in shards)} training samples for a "
                          f"batch of {local_batch} per process across {world} process(es) and {workers} worker(s); "
                          f"lower batch_size or workers")
    return EpochPlan(epoch, rank, world, stripe, assignment, batches, steps, samples, chunk, local_batch // chunk,
                     "; ".join(notes))


# ----------------------------------------------------------------------------- one sample


@dataclass
class SampleSettings:
    """What turns a raw sample into tensors; the same in every worker."""

    seed: int
    image_size: int
    context_length: int
    synthetic_captions: int
    crop_scale: tuple[float, float] = (1.0, 1.0)
    flip: bool = False
    captions: bool = False  # join the caption sidecars
    teacher: bool = False  # join the teacher sidecars (and replay their recorded views; without one, crop_scale and flip)
    teacher_image_size: int = 0  # >0: also a view at this size for an online teacher
    train: bool = True  # False: center crop, web caption only (evaluation)


def _decode(sample: dict):
    ext = image_member(sample)
    if ext is None:
        raise SiclipError(f"{sample.get('__url__')}: sample {sample['__key__']} has no image member")
    try:
        return decode_image(sample[ext])
    except UnreadableImage as e:
        raise SiclipError(f"{sample.get('__url__')}: sample {sample['__key__']}: cannot decode its {ext} "
                          f"({e.reason}); siclip manifest DATA --verify checks the shards") from None


@functools.lru_cache(maxsize=1)
def shared_tokenizer():
    """One tokenizer per process; built before the loader forks its workers, they inherit it (no reload per epoch)."""
    from siclip.training.tokenizer import ClipTokenizer

    return ClipTokenizer()


class SampleMaker:
    """Decode, crop, pick captions and teacher rows, tokenise: one raw sample in, one dict of arrays out."""

    def __init__(self, settings: SampleSettings, epoch: int):
        self.s, self.epoch = settings, epoch

    @property
    def tokenizer(self):
        return shared_tokenizer()

    def __call__(self, sample: dict) -> dict:
        s, key = self.s, sample["__key__"]
        rng = _rng(s.seed, "sample", self.epoch, key)
        img = _decode(sample)
        web = sample.get("txt", b"").decode("utf-8", errors="replace")
        out = {"key": key, "web": web}

        synthetic, have = [], False
        if s.captions and s.train:
            row = sample["captions"]
            have = row["status"] in (None, "ok") and bool(row["captions"])
            if have:
                picks = rng.sample(range(len(row["captions"])), min(s.synthetic_captions, len(row["captions"])))
                synthetic = [(i, row["captions"][i]) for i in picks]
        out["has_synthetic"] = have

        view, flip, v = None, False, 0
        if s.teacher and s.train:
            t = sample["teacher"]
            # A view recorded mirrored is replayed only where the config flips: its teacher embedding is of the
            # mirror image, which flip = false forbids (captions name left and right).
            usable = [i for i, params in enumerate(t["aug"], start=1) if s.flip or float(params[4]) < 0.5]
            v = usable[rng.randrange(len(usable))] if usable else 0  # 0: the plain image's row
            if v:
                view, flip = view_box(t["aug"][v - 1], *img.size)
            out["t_image"] = t["image"][v]
            texts = t["text"]
            out["t_text"] = texts[0]
            out["t_syn"] = [texts[1 + i] if 1 + i < len(texts) else None for i, _ in synthetic]
        if s.train and not v:  # no recorded view to replay: the config's own augmentation
            if tuple(s.crop_scale) != (1.0, 1.0):
                view = random_resized_box(*img.size, s.crop_scale, rng)
            if s.flip:
                flip = rng.random() < 0.5
        out["pixels"] = view_pixels(img, view, s.image_size, flip)
        if s.teacher_image_size:
            out["teacher_pixels"] = view_pixels(img, view, s.teacher_image_size, flip)
        out["synthetic"] = [c for _, c in synthetic]
        return out


def collate(samples: list[dict], settings: SampleSettings, tokenizer) -> dict:
    """A batch: uint8 pixels, token ids, synthetic captions padded to k with a validity mask, teacher rows."""
    k, L = settings.synthetic_captions if settings.captions and settings.train else 0, settings.context_length
    B = len(samples)
    batch = {
        "keys": [x["key"] for x in samples],
        "web": [x["web"] for x in samples],
        "synthetic": [x["synthetic"] for x in samples],
        "pixels": torch.from_numpy(np.stack([x["pixels"] for x in samples])),
        "text": tokenizer([x["web"] for x in samples], context_length=L),
        "syn_valid": torch.zeros(B, k, dtype=torch.bool),
        "syn_text": torch.zeros(B, k, L, dtype=torch.long),
        "no_synthetic": sum(1 for x in samples if not x["has_synthetic"]) if k else 0,
    }
    for i, x in enumerate(samples):
        for j, caption in enumerate(x["synthetic"]):
            batch["syn_valid"][i, j] = True
            batch["syn_text"][i, j] = tokenizer([caption], context_length=L)[0]
    if "teacher_pixels" in samples[0]:
        batch["teacher_pixels"] = torch.from_numpy(np.stack([x["teacher_pixels"] for x in samples]))
    if "t_image" in samples[0]:
        dim = samples[0]["t_image"].shape[-1]
        batch["t_image"] = torch.from_numpy(np.stack([x["t_image"] for x in samples]))
        batch["t_text"] = torch.from_numpy(np.stack([x["t_text"] for x in samples]))
        batch["t_syn"] = torch.zeros(B, k, dim)
        batch["t_syn_valid"] = torch.zeros(B, k, dtype=torch.bool)
        for i, x in enumerate(samples):
            for j, emb in enumerate(x["t_syn"]):
                if emb is not None:
                    batch["t_syn"][i, j] = torch.from_numpy(emb)
                    batch["t_syn_valid"][i, j] = True
    return batch


# ----------------------------------------------------------------------------- pipeline stages


def join_sidecars(samples, root: DataRoot, captions: bool, teacher: bool):
    """Attach each sample's caption and teacher sidecar rows, looked up by key (one shard's sidecars at a time)."""
    stages = tuple(n for n, on in (("captions", captions), ("teacher", teacher)) if on)
    current: ShardSidecars | None = None
    for sample in samples:
        if stages:
            shard = Path(sample["__url__"]).stem
            if current is None or current.shard != shard:
                current = ShardSidecars(root, shard, stages)
            key = sample["__key__"]
            if captions:
                sample["captions"] = current.values("captions", key, ("captions", "status"))
            if teacher:
                table, i = current.tables["teacher"], current.row("teacher", key)
                sample["teacher"] = {
                    "image": embeddings(table, "image_emb", i),
                    "text": embeddings(table, "text_emb", i),
                    "aug": embeddings(table, "aug_params", i) if "aug_params" in table.column_names else [],
                }
        yield sample


def interleave(shards: list[Shard], read, open_shards: int, rng: random.Random):
    """The samples of `shards`, `open_shards` of them read at once: each sample comes from an open shard
    drawn in proportion to the samples it has left (all open: a uniformly random merge, so no shard is
    left to end the epoch alone); a shard that ends makes room for the next in the list."""
    waiting, reading = list(shards), []  # reading: [samples left by the manifest, sample iterator]
    while waiting or reading:
        while waiting and len(reading) < open_shards:
            shard = waiting.pop(0)
            reading.append([shard.samples, read(shard)])
        i = rng.choices(range(len(reading)), weights=[max(left, 1) for left, _ in reading])[0]
        sample = next(reading[i][1], None)
        if sample is None:
            del reading[i]
            continue
        reading[i][0] -= 1
        yield sample


def keep_every(samples, world: int, rank: int):
    """Striping for fewer shards than processes: this process's share of one common stream."""
    for i, sample in enumerate(samples):
        if i % world == rank:
            yield sample


def skip(samples, n: int):
    """Drop the first n samples (those a resumed run already trained on), before any decoding."""
    for i, sample in enumerate(samples):
        if i >= n:
            yield sample


class WorkerStream(torch.utils.data.IterableDataset):
    """The chunks of one process for one epoch; each DataLoader worker reads its own shards."""

    def __init__(self, root: DataRoot, plan: EpochPlan, settings: SampleSettings, shuffle_buffer: int,
                 shuffle_initial: int, open_shards: int, start_step: int = 0):
        super().__init__()
        self.root, self.plan, self.settings = root, plan, settings
        self.shuffle_buffer, self.shuffle_initial, self.open_shards = shuffle_buffer, shuffle_initial, open_shards
        self.used, self.first = plan.position(start_step)

    def read(self, shard: Shard):
        """One shard's samples with their sidecar rows."""
        s = self.settings
        return join_sidecars(shard_samples([shard.source()]), self.root, s.captions, s.teacher)

    def pipeline(self, worker: int):
        import webdataset as wds

        plan, s = self.plan, self.settings
        maker = SampleMaker(s, plan.epoch)
        # striped, every process interleaves alike, so that their shares of the one stream stay disjoint
        mix = _rng(s.seed, "interleave", plan.epoch, *(() if plan.stripe else (plan.rank, worker)))
        stages = [lambda: interleave(plan.workers[worker], self.read, self.open_shards, mix)]
        if plan.stripe:
            stages.append(wds.filters.pipelinefilter(keep_every)(plan.world, plan.rank))
        stages += [
            wds.shuffle(self.shuffle_buffer, initial=min(self.shuffle_initial, self.shuffle_buffer),
                        rng=_rng(s.seed, "shuffle", plan.epoch, plan.rank, worker)),
            wds.filters.pipelinefilter(skip)(self.used[worker] * plan.chunk),
            wds.map(maker),
            wds.batched(plan.chunk, collation_fn=lambda xs: collate(xs, s, maker.tokenizer), partial=False),
        ]
        quota = plan.batches[worker] * plan.per_batch
        for index, chunk in enumerate(wds.DataPipeline(*stages), start=self.used[worker]):
            if index >= quota:
                return
            chunk["position"] = (plan.epoch, worker, index)
            yield chunk

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        n = len(self.plan.workers)
        if info is not None:
            # renumbered so that the DataLoader's first turn goes to the worker that is due
            yield from self.pipeline((info.id + self.first) % n)
            return
        # in the training process: every worker's chunks in the DataLoader's order, one from each in turn
        streams = [self.pipeline((i + self.first) % n) for i in range(n)]
        while streams:
            for stream in list(streams):
                chunk = next(stream, None)
                if chunk is None:
                    streams.remove(stream)
                else:
                    yield chunk


def join_chunks(chunks: list[dict]) -> dict:
    """One batch of consecutive chunks: tensors joined on the sample axis, lists concatenated, counts
    added; `position` becomes (epoch, ((worker, chunk index), ...)), as EpochPlan.order gives a step."""
    batch = {}
    for name, first in chunks[0].items():
        values = [c[name] for c in chunks]
        if name == "position":
            batch[name] = (int(first[0]), tuple((int(p[1]), int(p[2])) for p in values))
        elif isinstance(first, torch.Tensor):  # numpy's copy: torch.cat's thread pool spins on a busy CPU
            batch[name] = torch.from_numpy(np.concatenate([v.numpy() for v in values]))
        elif isinstance(first, list):
            batch[name] = [x for v in values for x in v]
        else:
            batch[name] = sum(values)
    return batch


class Batches:
    """The training batches of one epoch: each joins `per_batch` consecutive chunks of the DataLoader."""

    def __init__(self, loader: torch.utils.data.DataLoader, per_batch: int):
        self.loader, self.per_batch = loader, per_batch

    def __iter__(self):
        chunks = iter(self.loader)
        while len(group := list(itertools.islice(chunks, self.per_batch))) == self.per_batch:
            yield join_chunks(group)


def _loader_worker_init(worker_id: int) -> None:
    """A loader worker dies with the training process: a killed job leaves no worker holding its files
    (or the stage lock, whose descriptor a forked worker shares) while a rerun starts."""
    import ctypes
    import os
    import signal
    import sys

    torch.set_num_threads(1)
    if sys.platform.startswith("linux"):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    info = torch.utils.data.get_worker_info()
    if info is not None and os.getppid() == 1:  # the trainer died before prctl took effect
        os._exit(1)


def train_loader(root: DataRoot, plan: EpochPlan, settings: SampleSettings, local_batch: int, shuffle_buffer: int,
                 start_step: int = 0, in_process: bool = False, shuffle_initial: int = TrainConfig.shuffle_initial,
                 open_shards: int = TrainConfig.open_shards) -> Batches:
    """The batches of one epoch of this process, from `start_step` of the epoch on.

    Each worker reads `open_shards` of its shards at once, interleaved, through a shuffle buffer of
    `shuffle_buffer` samples (`shuffle_initial` before the first); a batch joins chunks of every
    worker. `in_process`: read in the training process (for debugging and tests)."""
    if local_batch != plan.chunk * plan.per_batch:
        raise ValueError(f"the plan was made for batches of {plan.chunk * plan.per_batch}, not {local_batch}")
    stream = WorkerStream(root, plan, settings, shuffle_buffer, shuffle_initial, open_shards, start_step)
    workers = 0 if in_process else len(plan.workers)
    shared_tokenizer()
    # as many samples in flight as two batches per worker
    loader = torch.utils.data.DataLoader(stream, batch_size=None, num_workers=workers,
                                         prefetch_factor=2 * plan.per_batch if workers else None,
                                         persistent_workers=False,
                                         worker_init_fn=_loader_worker_init if workers else None)
    return Batches(loader, plan.per_batch)


def eval_batches(root: DataRoot, shards: list[Shard], settings: SampleSettings, batch_size: int, samples=None):
    """Batches of the held-out shards in order: center crop, web captions (evaluation). `samples`: a stage over
    the shards' raw samples before they are made (eval's: decode each image once, leaving out unreadable ones)."""
    import webdataset as wds

    tokenizer = shared_tokenizer()
    maker = SampleMaker(settings, 0)
    pipe = wds.DataPipeline(lambda: iter([s.source() for s in shards]), shard_samples, *([samples] if samples else []),
                            wds.map(maker),
                            wds.batched(batch_size, collation_fn=lambda xs: collate(xs, settings, tokenizer),
                                        partial=True))
    yield from pipe
