"""`python -m bench train`: the training loop against named baselines measured in the same run.

CPU (default), on generated shards with caption sidecars, the `tiny` preset:
- `ratio`: samples/s of `siclip train` (loader, objective, AdamW, logging, checkpoints at the end) over
  a plain PyTorch loop on the same model, batch and objective with the data already in memory;
- `loader_ratio`: samples/s the loader delivers (decode, crop, join, tokenise, its worker processes) over
  samples/s the training step consumes;
- `caching_memory_ratio`: activation memory (the peak of what autograd holds for the backward pass) of
  gradient caching at an effective batch of 8 micro-batches, over plain training at one micro-batch:
  gradient caching keeps memory flat in the effective batch.
`--device cuda`: the `paper` preset's model (s0, needs timm) with every loss term, on random tensors, in
bf16: samples/s and peak GPU memory at effective batch 256 and 512 through gradient caching, and plain
training at 256 for comparison.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from pathlib import Path

import torch

from bench.roots import make_bench_root
from siclip.manifests.layout import DataRoot
from siclip.manifests.messages import log


def _plain_loop(cfg, batch: dict, steps: int, warmup: int) -> float:
    """Samples/s of a plain PyTorch loop: the same model, objective, batch and AdamW kernel (the loop's, fused
    where torch has one), the data in memory."""
    from siclip.training.evaluate import to_input
    from siclip.training.step import adamw, assemble
    from siclip.training.model import build_model, load_config
    from siclip.training.objective import Objective

    torch.manual_seed(cfg.seed)
    model = build_model(load_config(cfg.model))
    objective = Objective(cfg.stages[0].loss, model.config.embed_dim, None, cfg.pm_k)
    optimizer = adamw([{"params": list(model.parameters()) + list(objective.parameters()),
                        "weight_decay": cfg.weight_decay}], lr=1e-4)
    pixels = to_input(batch["pixels"], cfg.image_mean, cfg.image_std)
    valid = batch["syn_valid"]
    texts = torch.cat([batch["text"], batch["syn_text"][valid]])
    start = None
    for step in range(warmup + steps):
        if step == warmup:
            start = time.perf_counter()
        terms = objective(assemble(model.encode_image(pixels), model.encode_text(texts), valid, None), model.scale())
        terms["loss"].backward()
        torch.nn.utils.clip_grad_norm_(list(model.parameters()) + list(objective.parameters()), cfg.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return steps * len(pixels) / (time.perf_counter() - start)


def _siclip_train(cfg, root: DataRoot, out: str, steps: int, warmup: int) -> float:
    """Samples/s of `siclip train` itself, from its own metrics (wall clock between steps, loader waits included)."""
    from siclip.training.loop import train

    train(cfg, root.root, out, max_steps=warmup + steps)
    records = [json.loads(x) for x in (root.runs / out / "metrics.jsonl").read_text().splitlines()]
    times = {r["step"]: r["seconds"] for r in records if "seconds" in r}
    return steps * cfg.batch_size / (times[warmup + steps] - times[warmup])


def _loader_rate(cfg, root: DataRoot, batches: int) -> tuple[float, dict]:
    """Samples/s the loader delivers with the config's workers, and one batch to train the plain loop on."""
    from siclip.training.data import SampleSettings, plan_epoch, split_shards, train_loader
    from siclip.training.model import load_config

    mc = load_config(cfg.model)
    shards, _ = split_shards(root, 0)
    settings = SampleSettings(seed=0, image_size=mc.image.image_size, context_length=mc.text.context_length,
                              synthetic_captions=cfg.synthetic_captions, crop_scale=tuple(cfg.crop_scale),
                              captions=True)
    plan = plan_epoch(shards, 0, 0, 0, 1, cfg.workers, cfg.batch_size)
    first, n, start = None, 0, None
    for i, batch in enumerate(train_loader(root, plan, settings, cfg.batch_size, cfg.shuffle_buffer,
                                           shuffle_initial=cfg.shuffle_initial, open_shards=cfg.open_shards)):
        if i == 1:  # after the workers' start-up and the shuffle buffer's first fill
            start = time.perf_counter()
        first = first or batch
        n += len(batch["keys"]) if i >= 1 else 0
        if i == batches:
            break
    return n / (time.perf_counter() - start), first


class SavedActivations:
    """Counts the bytes autograd holds for the backward pass (tensors saved by the graph), now and at the peak.

    Device-independent and exact where process RSS is not: a saved tensor counts from the moment
    the forward pass saves it until its graph is freed; tensors sharing storage count once; the
    storages of `exclude` (the parameters, the input batch: held anyway) do not count.
    """

    def __init__(self, exclude=()):
        self.live: dict[int, list] = {}  # storage pointer -> [bytes, references]
        self.now = self.peak = 0
        self.exclude = {t.untyped_storage().data_ptr() for t in exclude}

    def _release(self, ptr: int) -> None:
        entry = self.live[ptr]
        entry[1] -= 1
        if entry[1] == 0:
            self.now -= entry[0]
            del self.live[ptr]

    def pack(self, tensor: torch.Tensor):
        import weakref

        storage = tensor.untyped_storage()
        ptr = storage.data_ptr()
        if ptr in self.exclude:
            return _Box([tensor])
        if ptr in self.live:
            self.live[ptr][1] += 1
        else:
            self.live[ptr] = [storage.nbytes(), 1]
            self.now += storage.nbytes()
            self.peak = max(self.peak, self.now)
        holder = [tensor]
        box = _Box(holder)
        weakref.finalize(box, self._release, ptr)
        return box

    @staticmethod
    def unpack(box):
        return box.holder[0]

    def __enter__(self):
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self.pack, self.unpack)
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc):
        self._hooks.__exit__(*exc)


class _Box:
    __slots__ = ("holder", "__weakref__")

    def __init__(self, holder):
        self.holder = holder


def _activation_memory(batch: int, micro: int) -> int:
    """Peak bytes autograd holds in one training step of the tiny model (96 px) at `batch`, `micro` at a time."""
    from accelerate import Accelerator

    from siclip.training.config import LossWeights
    from siclip.training.step import forward_backward
    from siclip.training.model import build_model, load_config
    from siclip.training.objective import Objective

    torch.manual_seed(0)
    model = build_model(load_config("tiny", {"image.image_size": 96, "image.patch_size": 8}))
    objective = Objective(LossWeights(clip_web=1.0, clip_synthetic=0.0, pm=0.1), model.config.embed_dim, None, 8)
    pixels, texts = torch.randn(batch, 3, 96, 96), torch.randint(1, 49000, (batch, 77))
    texts[:, 30] = 49407
    with SavedActivations(exclude=[pixels, texts, *model.parameters(), *objective.parameters()]) as saved:
        forward_backward(model, objective, pixels, texts, torch.zeros(batch, 0, dtype=torch.bool), None, micro,
                         Accelerator(cpu=True))
    return saved.peak


def bench_train(quick: bool = False, device: str = "cpu") -> dict:
    """Run the benchmark; print a short table to stderr and return the figures."""
    if device.startswith("cuda"):
        return bench_train_gpu(quick)
    from siclip.training.config import load_train_config

    steps, warmup = (6, 2) if quick else (30, 5)
    micro = 16 if quick else 32
    with tempfile.TemporaryDirectory(prefix="siclip-bench-train-") as tmp:
        shards = 4
        per_shard = max(64, (steps + warmup + 2) * 64 // shards + 64)
        root = make_bench_root(Path(tmp) / "data", shards, per_shard)
        cfg = load_train_config("tiny", ["val_samples=0", "eval_every=0", f"checkpoint_every={10**6}",
                                         "stages.0.epochs=1", "log_every=1"])
        loader_rate, batch = _loader_rate(cfg, root, 8 if quick else 24)
        plain = _plain_loop(cfg, batch, steps, warmup)
        real = _siclip_train(cfg, root, "bench", steps, warmup)
    plain_mem = _activation_memory(micro, micro)
    cached_mem = _activation_memory(8 * micro, micro)
    out = {
        "ratio": real / plain, "loader_ratio": loader_rate / plain, "caching_memory_ratio": cached_mem / plain_mem,
        "samples_per_s": {"siclip_train": real, "plain_loop": plain, "loader": loader_rate},
        "activation_bytes": {f"plain_batch_{micro}": plain_mem, f"caching_batch_{8 * micro}_micro_{micro}": cached_mem},
        "setup": {"preset": "tiny", "batch": cfg.batch_size, "workers": cfg.workers, "steps": steps,
                  "threads": torch.get_num_threads(), "load_average": round(os.getloadavg()[0], 2)},
    }
    log(f"train: siclip train {real:.1f} samples/s vs a plain loop {plain:.1f} (ratio {out['ratio']:.3f}); loader "
         f"{loader_rate:.1f} samples/s ({out['loader_ratio']:.2f}x the step's need); gradient caching at batch "
         f"{8 * micro} in micro-batches of {micro}: {cached_mem / 2**20:.0f} MB of activations vs {plain_mem / 2**20:.0f}"
         f" MB plain at {micro} (x{out['caching_memory_ratio']:.2f}); load average {out['setup']['load_average']}")
    return out


def bench_train_gpu(quick: bool = False, config: str = "paper",
                    batches: tuple = ((256, 0), (512, 0), (256, 256))) -> dict:
    """A training config's model and last stage's objective (teacher sidecars included) on random tensors on a
    GPU, through the loop's own step (bench/gpu.py's step rows): samples/s and peak memory per (effective batch,
    micro-batch; 0 = the config's). Runs on the CPU too, for checking it (no memory figure)."""
    from bench.gpu import Settings, accelerator, siclip_setup, timed
    from siclip.training.config import load_train_config

    cuda = torch.cuda.is_available()
    s = Settings(device="cuda" if cuda else "cpu", quick=quick, config=config, open_clip_model="", batch=0, micro=0,
                 steps=10 if quick else 40, warmup=3, workers=(), budget_s=None, peak_tflops=None)
    cfg = load_train_config(config, [])
    results = {}
    for batch, micro in batches:
        micro = micro or cfg.micro_batch or batch
        name = f"batch_{batch}_micro_{micro}"
        try:
            step, samples, *_ = siclip_setup(s, batch=batch, micro=micro)
            results[name] = timed(s, step, samples)
            del step
        except torch.cuda.OutOfMemoryError:
            results[name] = {"out_of_memory": True}
        if cuda:
            torch.cuda.empty_cache()
        log(f"train ({torch.cuda.get_device_name() if cuda else 'CPU'}): {config} config's model, batch {batch} "
            f"in micro-batches of {micro}, every loss term: {results[name]}")
    return {"device": torch.cuda.get_device_name() if cuda else "cpu", "config": config,
            "precision": accelerator(s).mixed_precision, **results}
