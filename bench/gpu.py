"""`python -m bench gpu` (`make bench-gpu`; on a lent GPU machine, bench/gpu.sh): the figures of the speed issue
that need a GPU, in one run that ends with one JSON line. Four parts, each against a baseline measured in the
same run, on random tensors or generated shards (nothing downloaded):

  step     siclip's training step against open_clip_train's, same batch, bf16. siclip: `train_step` of the
           loop on the `paper` config's model (s0) with the stage-2 objective (3 captions per image, PM,
           distillation from teacher sidecars), every parameter training; the same with the stage's own
           trainable set; and like for like with open_clip (one caption, the CLIP loss alone). open_clip:
           open_clip_train's own `train_one_epoch` on MobileCLIP2-S0, the nearest open_clip model (the
           same MCi0 image tower, a 12-layer text tower against s0's 6), fed the same tensors. Samples/s,
           peak memory, and MFU: samples/s x training FLOPs per sample (torch.utils.flop_counter) over the
           card's dense bf16 peak (a table by name, or --peak-tflops), and over a measured bf16 matmul.
  loader   siclip's stage-2 loader alone (decode, replay a recorded crop, tokenise the captions, join the
           caption and teacher sidecars) with 4, 8 and 16 workers (at most the machine's cores) on generated
           shards, against the step's consumption; JPEG decoding on the GPU (torchvision.io.decode_jpeg)
           against PIL on one core.
  levers   each alone on the recipe's step against the step without it, each in a process of its own (a
           lever that crashes or hangs costs its own figure only): torch.compile of each tower, CUDA graphs
           (compile's reduce-overhead mode of both), channels_last, each SDPA backend; and, the other way
           round, AdamW unfused (the loop uses the fused kernel). Reparameterisation is recorded as not
           applying to training.
  captions bench/captions.py's BLIP-base (random weights) in bf16, batched, against transformers' pipeline
           one image at a time; CoCa ViT-L/14 (random weights, extra siclip[mobileclip]) batched against
           siclip's own captioner one image per batch (transformers' pipeline cannot run open_clip's CoCa).

    python -m bench gpu --device cuda                         all four parts (about 6 minutes on an H100)
    python -m bench gpu --device cuda --parts step,levers
    python -m bench gpu --device cpu --quick                  the same code on a CPU, small: what the tests run
A part that cannot run (open_clip or torchvision missing, out of memory, a lever that fails) records why in
its figures and the others go on. Each part stops starting new measurements after --budget-s seconds.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from bench.days import count_training_flops, random_tokens

PARTS = ("step", "loader", "captions", "levers")  # levers last: its compiles are the first cut when time runs out
# seconds after which a part starts nothing new: about 7 minutes on an H100 in all (a lever started late may run
# 90 s past its part's budget)
BUDGET_S = {"step": 90.0, "loader": 40.0, "captions": 90.0, "levers": 150.0}
TEACHER_DIM = 1536  # the seed's two ViT-L/14 teachers, concatenated
TEACHER_VIEWS = 5  # paper.toml's teacher sidecars: `siclip teacher --augmentations 5`
# dense bf16 tensor peaks (TFLOP/s) from the vendors' data sheets, matched against torch.cuda.get_device_name()
PEAK_BF16_TFLOPS = (("H200", 989.0), ("H100 PCIe", 756.0), ("H100", 989.0), ("A100", 312.0), ("L40S", 362.0),
                    ("RTX 4090", 165.0), ("RTX 3090", 71.0), ("L4", 121.0))
OPEN_CLIP_CPU_MODEL = "ViT-peer-tiny-preln"  # --device cpu: bench/configs/open_clip/, the shape of tiny_preln


def log(msg: str) -> None:
    print(f"bench gpu: {msg}", file=sys.stderr, flush=True)


def one_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}"[:300]


@contextlib.contextmanager
def recorded(figures: dict, name: str):
    """Run a measurement; an exception becomes {"error": its one line} under `name` and the run goes on."""
    try:
        yield
    except torch.cuda.OutOfMemoryError as e:
        figures[name] = {"out_of_memory": True, "error": one_line(e)}
        log(f"{name}: out of memory")
    except Exception as e:  # noqa: BLE001 - a benchmark records what failed and measures the rest
        figures[name] = {"error": one_line(e)}
        log(f"{name}: {figures[name]['error']}")
    finally:
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


@dataclass(frozen=True)
class Settings:
    device: str
    quick: bool
    config: str  # siclip's training config (its last stage's objective)
    open_clip_model: str
    batch: int
    micro: int  # gradient caching's micro-batch in the rows at the paper's effective batch (4 x micro)
    steps: int
    warmup: int
    workers: tuple
    budget_s: float | None  # None: BUDGET_S
    peak_tflops: float | None
    levers: tuple = ()  # only these levers (default: every one that applies)

    @property
    def cuda(self) -> bool:
        return self.device.startswith("cuda")


def settings(args) -> Settings:
    cuda = args.device.startswith("cuda")
    if cuda and not torch.cuda.is_available():
        raise SystemExit("bench gpu: --device cuda but torch sees no CUDA device (torch.cuda.is_available() is False)")
    cores = os.cpu_count() or 1
    workers = tuple(sorted({min(w, cores) for w in (args.workers or ((4, 8, 16) if cuda else (2,)))}))
    return Settings(
        device=args.device, quick=args.quick, config=args.config or ("paper" if cuda else "tiny"),
        open_clip_model=args.open_clip_model or ("MobileCLIP2-S0" if cuda else OPEN_CLIP_CPU_MODEL),
        batch=args.batch or (256 if cuda else 8), micro=args.micro or (128 if cuda else 4),
        steps=args.steps or ((5 if args.quick else 10) if cuda else 2), warmup=3 if cuda else 1,
        workers=workers, budget_s=args.budget_s, peak_tflops=args.peak_tflops,
        levers=tuple(args.levers.split(",")) if args.levers else ())


def spent(s: Settings, part: str, started: float) -> str | None:
    """Why a part starts no further measurement (its time budget is spent), or None."""
    budget = BUDGET_S[part] if s.budget_s is None else s.budget_s
    return f"not measured: the part's {budget:.0f} s budget was spent" if time.monotonic() - started > budget else None


def sync(s: Settings) -> None:
    if s.cuda:
        torch.cuda.synchronize()


_ACCELERATOR = []


def accelerator(s: Settings):
    """One Accelerator for the process (accelerate keeps its state per process): bf16 on a GPU, fp32 on a CPU."""
    if not _ACCELERATOR:
        from accelerate import Accelerator

        _ACCELERATOR.append(Accelerator(mixed_precision="bf16" if s.cuda else "no", cpu=not s.cuda))
    return _ACCELERATOR[0]


def timed(s: Settings, step, samples_per_step: int, context=contextlib.nullcontext) -> dict:
    """Samples/s of `step` over s.steps calls after s.warmup, and the peak GPU memory of the whole run."""
    if s.cuda:
        torch.cuda.reset_peak_memory_stats()
    with context():
        for _ in range(s.warmup):
            step()
        sync(s)
        start = time.perf_counter()
        for _ in range(s.steps):
            step()
        sync(s)
    seconds = time.perf_counter() - start
    out = {"samples_per_s": round(s.steps * samples_per_step / seconds, 1),
           "step_ms": round(1000 * seconds / s.steps, 1)}
    if s.cuda:
        out["peak_memory_gb"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    return out


# ---- step: siclip's training step and open_clip_train's


def siclip_setup(s: Settings, objective: str = "recipe", trainable: str = "all", batch: int | None = None,
                 micro: int = 0, levers: frozenset = frozenset()):
    """(step function, samples per step, model, captions per image) for siclip's `train_step` on random tensors.
    objective "recipe": the config's last stage (its synthetic captions, PM, distillation from teacher sidecars);
    "clip": one caption, the CLIP loss alone. trainable "all", or "stage": that stage's own globs."""
    from siclip.training.config import LossWeights, load_train_config
    from siclip.training.loop import train_step
    from siclip.training.model import build_model, load_config
    from siclip.training.objective import Objective, SidecarTeacher
    from siclip.training.step import adamw, decay_groups, prepare_model, set_trainable

    cfg = load_train_config(s.config, [])
    stage, batch = cfg.stages[-1], batch or s.batch
    acc = accelerator(s)
    torch.manual_seed(0)
    model = build_model(load_config(cfg.model, cfg.model_overrides()))
    model.set_grad_checkpointing(cfg.grad_checkpointing)
    if objective == "recipe":
        weights, k = stage.loss, cfg.synthetic_captions
        teacher = SidecarTeacher(TEACHER_DIM, "bench: random teacher sidecars") if weights.distillation() else None
    else:
        weights, k, teacher = LossWeights(clip_web=1.0, clip_synthetic=0.0), 0, None
    loss = Objective(weights, model.config.embed_dim, teacher.dim if teacher else None, cfg.pm_k)
    if "channels_last" in levers:
        model.visual.to(memory_format=torch.channels_last)
    plain = model
    model = prepare_model(model, acc)
    if trainable == "stage":
        set_trainable(plain, stage, set())
    mode = "reduce-overhead" if "cuda_graphs" in levers else "default"
    for tower in ("visual", "text"):
        if f"compile_{'image' if tower == 'visual' else 'text'}" in levers or "cuda_graphs" in levers:
            setattr(plain, tower, torch.compile(getattr(plain, tower), mode=mode))
    named = list(plain.named_parameters()) + [(f"objective.{n}", p) for n, p in loss.named_parameters()]
    loss.to(acc.device)
    optimizer = acc.prepare(adamw(decay_groups(named, cfg.weight_decay), lr=1e-4, betas=tuple(cfg.betas),
                                  eps=cfg.eps, fused="unfused_adamw" not in levers))
    params = [p for _, p in named]
    g = torch.Generator().manual_seed(0)
    size, context = plain.config.image.image_size, plain.config.text.context_length
    pixels = torch.randint(0, 256, (batch, 3, size, size), dtype=torch.uint8, generator=g).to(acc.device)
    if "channels_last" in levers:
        pixels = pixels.contiguous(memory_format=torch.channels_last)
    data = {"pixels": pixels, "text": random_tokens(batch, context, acc.device, g),
            "syn_text": random_tokens(batch * k, context, acc.device, g).view(batch, k, context),
            "syn_valid": torch.ones(batch, k, dtype=torch.bool, device=acc.device)}
    if teacher is not None:
        unit = lambda *shape: torch.nn.functional.normalize(torch.randn(*shape, generator=g), dim=-1).to(acc.device)
        data.update(t_image=unit(batch, TEACHER_DIM), t_text=unit(batch, TEACHER_DIM),
                    t_syn=unit(batch, k, TEACHER_DIM), t_syn_valid=data["syn_valid"])

    def step():
        train_step(model, optimizer, params, loss, teacher, data, 1e-4, cfg, micro, acc)

    return step, batch, plain, 1 + k


def open_clip_setup(s: Settings, batch: int | None = None, accum: int = 1):
    """(step function, samples per step, model, captions per image) for open_clip_train's own `train_one_epoch` on
    s.open_clip_model, set up as open_clip_train.main sets it up (its AdamW groups, ClipLoss, cosine schedule,
    the precision), fed the same random batch `accum` times per optimizer step. Needs open_clip (extra
    siclip[mobileclip])."""
    import open_clip
    from open_clip_train.params import parse_args
    from open_clip_train.scheduler import cosine_lr
    from open_clip_train.train import train_one_epoch

    from bench.open_clip_peer import register_models

    register_models()
    batch = batch or s.batch
    precision = "amp_bf16" if s.cuda else "fp32"
    args = parse_args(["--model", s.open_clip_model, "--precision", precision, "--batch-size", str(batch),
                       "--accum-freq", str(accum), "--lr", "1e-4", "--wd", "0.1", "--beta1", "0.9", "--beta2",
                       "0.98", "--eps", "1e-6", "--grad-clip-norm", "1.0", "--warmup", "10",
                       "--log-every-n-steps", str(10**6)])
    device = torch.device(s.device if s.device != "cuda" else "cuda:0")
    args.device, args.world_size, args.rank, args.local_rank, args.distributed = str(device), 1, 0, 0, False
    args.distill, args.wandb, args.horovod = False, False, False
    torch.manual_seed(0)
    model = open_clip.create_model(s.open_clip_model, precision=precision, device=device, output_dict=True)
    exclude = lambda n, p: p.ndim < 2 or "bn" in n or "ln" in n or "bias" in n or "logit_scale" in n
    named = list(model.named_parameters())
    optimizer = torch.optim.AdamW(
        [{"params": [p for n, p in named if exclude(n, p) and p.requires_grad], "weight_decay": 0.0},
         {"params": [p for n, p in named if not exclude(n, p) and p.requires_grad], "weight_decay": args.wd}],
        lr=args.lr, betas=(args.beta1, args.beta2), eps=args.eps)
    scheduler = cosine_lr(optimizer, args.lr, args.warmup, 10**6)
    loss = open_clip.create_loss(args)
    size = model.visual.image_size
    size = size[0] if isinstance(size, (tuple, list)) else size
    g = torch.Generator().manual_seed(0)
    images = torch.randn(batch, 3, size, size, generator=g).to(device)
    texts = random_tokens(batch, model.context_length, device, g)

    class Batches:
        num_batches = num_samples = 0

        def __iter__(self):
            return iter([(images, texts)] * self.num_batches)

    class Data:
        dataloader = Batches()

        def set_epoch(self, epoch):
            pass

    data = {"train": Data()}
    data["train"].dataloader.num_batches = accum
    data["train"].dataloader.num_samples = accum * batch

    def step():  # one optimizer step: train_one_epoch over `accum` batches
        train_one_epoch(model, data, loss, 0, optimizer, None, scheduler, None, args)

    return step, batch * accum, model, 1


def flops_per_sample(model, encode_image, encode_text, captions: int, device, batch: int = 2) -> float:
    size = model.config.image.image_size if hasattr(model, "config") else model.visual.image_size
    size = size[0] if isinstance(size, (tuple, list)) else size
    context = model.config.text.context_length if hasattr(model, "config") else model.context_length
    g = torch.Generator().manual_seed(1)
    pixels = torch.randn(batch, 3, size, size, generator=g).to(device)
    texts = random_tokens(batch * captions, context, device, g)
    return count_training_flops(encode_image, encode_text, pixels, texts) / batch


def peak_tflops(s: Settings) -> tuple[float | None, str]:
    if s.peak_tflops:
        return s.peak_tflops, "--peak-tflops"
    if not s.cuda:
        return None, "no dense bf16 peak for a CPU"
    name = torch.cuda.get_device_name()
    for key, peak in PEAK_BF16_TFLOPS:
        if key in name:
            return peak, f"data sheet, dense bf16 ({key})"
    return None, f"{name} is not in bench/gpu.py's table: give --peak-tflops"


def matmul_tflops(s: Settings) -> float | None:
    """A bf16 8192^3 matrix product's rate on this card: what its tensor cores reach on the easiest work."""
    if not s.cuda:
        return None
    a, b = (torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    for _ in range(3):
        a @ b
    sync(s)
    start = time.perf_counter()
    for _ in range(10):
        a @ b
    sync(s)
    return round(10 * 2 * 8192**3 / (time.perf_counter() - start) / 1e12, 1)


def step_part(s: Settings, peak: float | None, matmul: float | None) -> dict:
    big, micro = 4 * s.micro, s.micro
    rows = [  # name, setup, kwargs, counted in MFU (every parameter training, nothing recomputed)
        ("siclip_recipe", siclip_setup, {}, True),
        ("siclip_clip", siclip_setup, {"objective": "clip"}, True),
        ("open_clip", open_clip_setup, {}, True),
        (f"siclip_recipe_b{big}_micro{micro}", siclip_setup, {"batch": big, "micro": micro}, False),
        (f"siclip_stage_b{big}_micro{micro}", siclip_setup, {"batch": big, "micro": micro, "trainable": "stage"},
         False),
        (f"open_clip_b{micro}_accum4", open_clip_setup, {"batch": micro, "accum": 4}, False),
    ]
    out, started = {}, time.monotonic()
    for name, setup, kwargs, mfu in rows:
        if spent(s, "step", started):
            out[name] = {"skipped": spent(s, "step", started)}
            continue
        with recorded(out, name):
            step, samples, model, captions = setup(s, **kwargs)
            out[name] = timed(s, step, samples)
            flops = flops_per_sample(model, model.encode_image, model.encode_text, captions, s.device)
            out[name]["gflop_per_sample"] = round(flops / 1e9, 3)
            if mfu and peak:
                out[name]["mfu"] = round(out[name]["samples_per_s"] * flops / (peak * 1e12), 4)
            if mfu and matmul:
                out[name]["of_matmul"] = round(out[name]["samples_per_s"] * flops / (matmul * 1e12), 4)
            log(f"step {name}: {out[name]}")
            del step, model
    return out


# ---- loader: siclip's loader alone, and JPEG decoding on the GPU


def loader_part(s: Settings, consumption: float | None) -> dict:
    from bench.days import _jpegs
    from bench.roots import make_bench_root
    from siclip.images import decode_image
    from siclip.training.config import load_train_config
    from siclip.training.data import SampleSettings, plan_epoch, split_shards, train_loader
    from siclip.training.model import load_config

    cfg = load_train_config(s.config, [])
    mc = load_config(cfg.model, cfg.model_overrides())
    size = mc.image.image_size
    jpegs = _jpegs(32 if s.quick else 128, size)  # stage 1 stores images at the model's size
    out = {"image_size": size, "jpeg_kb": round(sum(map(len, jpegs)) / len(jpegs) / 1024, 1),
           "captions_per_image": 1 + cfg.synthetic_captions,
           "joins": f"captions sidecars and teacher sidecars ({TEACHER_DIM}-d, {TEACHER_VIEWS} recorded views "
                    "replayed)",
           "step_consumption_samples_per_s": consumption, "workers": {}}
    shards = max(8, 3 * max(s.workers))
    per_shard = max(32, (4 * s.batch if s.quick else 12288) // shards)
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="siclip-bench-gpu-") as tmp:
        root = make_bench_root(Path(tmp) / "data", shards, per_shard, jpegs=jpegs, teacher_dim=TEACHER_DIM,
                               teacher_views=TEACHER_VIEWS)
        train, _ = split_shards(root, 0)

        def rate(workers: int, teacher: bool = True) -> float | None:
            sample = SampleSettings(seed=0, image_size=size, context_length=mc.text.context_length,
                                    synthetic_captions=cfg.synthetic_captions, crop_scale=tuple(cfg.crop_scale),
                                    captions=True, teacher=teacher)
            plan = plan_epoch(train, 0, 0, 0, 1, workers, s.batch)
            n, start = 0, None
            for i, batch in enumerate(train_loader(root, plan, sample, s.batch, min(cfg.shuffle_buffer, 1000),
                                                   shuffle_initial=min(cfg.shuffle_initial, 500),
                                                   open_shards=cfg.open_shards)):
                if i == workers:  # every worker has delivered once: start-up and first buffer fills are behind
                    start = time.perf_counter()
                elif i > workers:
                    n += len(batch["keys"])
            return round(n / (time.perf_counter() - start), 1) if start and n else None

        for workers in s.workers:
            if spent(s, "loader", started):
                out["workers"][str(workers)] = {"skipped": spent(s, "loader", started)}
                continue
            r = rate(workers)
            out["workers"][str(workers)] = {"samples_per_s": r, "worker_ms_per_sample": round(1000 * workers / r, 2)
                                            if r else None, "of_step": round(r / consumption, 2) if r and consumption
                                            else None}
            log(f"loader, {workers} workers: {out['workers'][str(workers)]}")
        few = min(s.workers)  # what joining the teacher sidecars costs: the same workers without them
        if not spent(s, "loader", started):
            r = rate(few, teacher=False)
            out["without_teacher_sidecars"] = {"workers": few, "samples_per_s": r,
                                               "worker_ms_per_sample": round(1000 * few / r, 2) if r else None}
            log(f"loader, {few} workers, caption sidecars only: {out['without_teacher_sidecars']}")
    one = time.process_time()
    for j in jpegs:
        decode_image(j)
    out["pil_decode_images_per_s_one_core"] = round(len(jpegs) / (time.process_time() - one), 1)
    with recorded(out, "gpu_decode"):
        out["gpu_decode"] = gpu_decode(s, jpegs)
    return out


def gpu_decode(s: Settings, jpegs: list[bytes]) -> dict:
    if not s.cuda:
        return {"skipped": "needs --device cuda"}
    from torchvision.io import decode_jpeg

    data = [torch.frombuffer(bytearray(j), dtype=torch.uint8) for j in jpegs]
    decode_jpeg(data[:8], device="cuda")
    sync(s)
    start, reps = time.perf_counter(), 10
    for _ in range(reps):
        decode_jpeg(data, device="cuda")
    sync(s)
    return {"images_per_s": round(reps * len(data) / (time.perf_counter() - start), 1), "batch": len(data),
            "how": "torchvision.io.decode_jpeg(device='cuda'), a list of JPEGs per call"}


# ---- levers: each alone on siclip's step


# most promising first: the part's budget may leave the last ones unmeasured
LEVERS = ("unfused_adamw", "compile_image", "compile_text", "channels_last", "sdpa_efficient_attention",
          "sdpa_cudnn_attention", "sdpa_flash_attention", "sdpa_math", "cuda_graphs")
REPARAMETERISE = ("MobileOne/FastViT reparameterisation folds the training-time branches into one conv for "
                  "inference; training needs the branches")
REPO = Path(__file__).resolve().parents[1]


def one_lever(s: Settings, name: str) -> dict:
    """samples/s of siclip's step with the lever `name` alone ("baseline": none), in this process."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    context = contextlib.nullcontext
    if name.startswith("sdpa_"):
        backend = getattr(SDPBackend, name.removeprefix("sdpa_").upper())
        context = lambda: sdpa_kernel([backend])
    levers = frozenset() if name == "baseline" or name.startswith("sdpa_") else frozenset({name})
    step, samples, *_ = siclip_setup(s, levers=levers)
    return timed(s, step, samples, context)


def lever_in_child(s: Settings, name: str, timeout: float) -> dict:
    """one_lever in a process of its own: a lever that crashes the process (a kernel's fault), hangs or leaves
    compiled state behind costs that lever's figure alone."""
    import subprocess

    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p)}
    argv = [sys.executable, "-X", "faulthandler", "-m", "bench.gpu", "--one-lever", name, "--device", s.device,
            "--config", s.config, "--batch", str(s.batch), "--micro", str(s.micro), "--steps", str(s.steps),
            *(["--quick"] * s.quick)]
    try:
        done = subprocess.run(argv, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"did not finish in {timeout:.0f} s"}
    if done.returncode != 0:
        why = f"signal {-done.returncode}" if done.returncode < 0 else f"exit {done.returncode}"
        return {"error": f"its process ended with {why}" + (f" ({where})" if (where := crash_site(done.stderr))
                                                              else "")}
    return json.loads(done.stdout.strip().splitlines()[-1])


def crash_site(stderr: str) -> str:
    """The innermost frame of faulthandler's traceback in `stderr`, else its last line (at most 200 characters)."""
    lines = [x.strip() for x in stderr.splitlines() if x.strip()]
    frames = [i for i, x in enumerate(lines) if "most recent call first" in x]
    if frames and frames[0] + 1 < len(lines):
        return lines[frames[0] + 1][:200]
    return lines[-1][:200] if lines else ""


def adamw_step_ms(s: Settings) -> dict:
    """Milliseconds of the optimizer step alone over the config's model, fused and not (median of 3 runs of 20)."""
    from siclip.training.config import load_train_config
    from siclip.training.model import build_model, load_config
    from siclip.training.step import adamw, decay_groups

    cfg = load_train_config(s.config, [])
    torch.manual_seed(0)
    model = build_model(load_config(cfg.model, cfg.model_overrides())).to(s.device)
    named = list(model.named_parameters())
    for _, p in named:
        p.grad = torch.randn_like(p)
    out = {"parameters": sum(p.numel() for _, p in named), "tensors": len(named)}
    for fused in (True, False):
        optimizer = adamw(decay_groups(named, cfg.weight_decay), lr=1e-4, fused=fused)
        runs = []
        for _ in range(3):
            for _ in range(3):
                optimizer.step()
            sync(s)
            start = time.perf_counter()
            for _ in range(20):
                optimizer.step()
            sync(s)
            runs.append((time.perf_counter() - start) / 20 * 1000)
        out["fused" if fused else "unfused"] = round(sorted(runs)[1], 2)
    return out


def levers_part(s: Settings) -> dict:
    names = [n for n in LEVERS if (s.cuda or n in ("unfused_adamw", "channels_last", "sdpa_math"))
             and (not s.levers or n in s.levers)]
    if s.quick:
        names = [n for n in names if "compile" not in n and n != "cuda_graphs"]
    out = {"reparameterise": {"not_applicable": REPARAMETERISE}}
    with recorded(out, "adamw_step_ms"):  # the fused kernel's share, which a whole step's noise can hide
        out["adamw_step_ms"] = adamw_step_ms(s)
        log(f"AdamW's step alone (ms): {out['adamw_step_ms']}")
    started = time.monotonic()
    for name in ["baseline", *names]:
        if spent(s, "levers", started):
            out[name] = {"skipped": spent(s, "levers", started)}
            continue
        budget = BUDGET_S["levers"] if s.budget_s is None else s.budget_s
        out[name] = lever_in_child(s, name, timeout=max(60.0, budget - (time.monotonic() - started)) + 90)
        base = out["baseline"].get("samples_per_s")
        if name != "baseline" and base and "samples_per_s" in out[name]:
            out[name]["ratio"] = round(out[name]["samples_per_s"] / base, 3)
        log(f"lever {name}: {out[name]}")
    return out


# ---- captions: BLIP-base and CoCa ViT-L/14 on the GPU


def captions_part(s: Settings) -> dict:
    from bench.captions import bench_captions, bench_coca

    out, started = {}, time.monotonic()
    with recorded(out, "blip"):
        out["blip"] = bench_captions(s.quick, device=s.device, dtype="bfloat16")
    images = 8 if s.quick else 64
    if spent(s, "captions", started):
        out["coca"] = {"skipped": spent(s, "captions", started)}
        return out
    with recorded(out, "coca"):
        batched = bench_coca(s.quick, images=images, batch_size=images, device=s.device, dtype="bfloat16")
        single = bench_coca(s.quick, images=max(2, images // 8), batch_size=1, device=s.device, dtype="bfloat16")
        out["coca"] = {"batched": batched, "one_per_batch": single}
        if "images_per_s" in batched and "images_per_s" in single:
            out["coca"]["ratio"] = round(batched["images_per_s"] / single["images_per_s"], 2)
    return out


def ratio(a, b):
    return round(a / b, 3) if a and b else None


def bench(s: Settings, parts: list[str], partial: str | None = None) -> dict:
    peak, peak_source = peak_tflops(s)
    figures = {"device": torch.cuda.get_device_name() if s.cuda else "cpu", "torch": torch.__version__,
               "cores": os.cpu_count(), "peak_bf16_tflops": peak, "peak_source": peak_source,
               "matmul_bf16_tflops": matmul_tflops(s),
               "settings": {k: getattr(s, k) for k in ("config", "open_clip_model", "batch", "micro", "steps",
                                                        "warmup", "workers", "quick", "levers")}}
    log(f"{figures['device']}, torch {torch.__version__}, peak {peak} TFLOP/s ({peak_source}), a bf16 matmul "
        f"{figures['matmul_bf16_tflops']} TFLOP/s")
    for part in parts:
        started = time.monotonic()
        with recorded(figures, part):
            if part == "step":
                figures["step"] = step_part(s, peak, figures["matmul_bf16_tflops"])
            elif part == "loader":
                step = figures.get("step", {}).get("siclip_recipe", {})
                figures["loader"] = loader_part(s, step.get("samples_per_s"))
            elif part == "levers":
                figures["levers"] = levers_part(s)
            else:
                figures["captions"] = captions_part(s)
        log(f"{part}: {time.monotonic() - started:.0f} s")
        if partial:
            Path(partial).write_text(json.dumps(figures) + "\n")
    rate = lambda part, row: figures.get(part, {}).get(row, {}).get("samples_per_s")
    big = f"b{4 * s.micro}_micro{s.micro}"
    workers = figures.get("loader", {}).get("workers", {})
    figures["ratios"] = {
        "step_like_for_like": ratio(rate("step", "siclip_clip"), rate("step", "open_clip")),
        "step_recipe": ratio(rate("step", "siclip_recipe"), rate("step", "open_clip")),
        "step_caching_against_accum": ratio(rate("step", f"siclip_recipe_{big}"),
                                            rate("step", f"open_clip_b{s.micro}_accum4")),
        "loader_of_step": max([w["of_step"] for w in workers.values() if w.get("of_step")], default=None),
        "captions_blip": ratio(figures.get("captions", {}).get("blip", {}).get("ratio"), 1),
        "captions_coca_batched": ratio(figures.get("captions", {}).get("coca", {}).get("ratio"), 1),
    }
    log("ratios: " + ", ".join(f"{k} {v}" for k, v in figures["ratios"].items()))
    return figures


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench gpu", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda", help="cuda (default) or cpu (the same code, small)")
    p.add_argument("--quick", action="store_true", help="fewer steps and images")
    p.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated, of {','.join(PARTS)}")
    p.add_argument("--config", help="siclip's training config (default: paper on cuda, tiny on cpu)")
    p.add_argument("--open-clip-model", help=f"default: MobileCLIP2-S0 on cuda, {OPEN_CLIP_CPU_MODEL} on cpu")
    p.add_argument("--batch", type=int, help="the step's batch (default 256 on cuda, 8 on cpu)")
    p.add_argument("--micro", type=int, help="gradient caching's micro-batch at 4x it (default 128, 4 on cpu)")
    p.add_argument("--steps", type=int, help="timed steps per measurement (default 10 on cuda, 2 on cpu)")
    p.add_argument("--workers", type=lambda v: [int(x) for x in v.split(",")], help="loader workers (4,8,16)")
    p.add_argument("--budget-s", type=float, help="seconds after which a part starts no new measurement "
                   f"(default {', '.join(f'{k} {v:.0f}' for k, v in BUDGET_S.items())})")
    p.add_argument("--peak-tflops", type=float, help="the card's dense bf16 peak, where the table lacks it")
    p.add_argument("--levers", help=f"comma-separated, of {','.join(LEVERS)} (default: all that apply)")
    p.add_argument("--partial", help="a file the figures are written to after each part (kept if a part crashes)")
    p.add_argument("--one-lever", help=argparse.SUPPRESS)  # levers_part's child process
    args = p.parse_args(argv)
    if args.one_lever:
        figures = {}
        with recorded(figures, args.one_lever):
            figures[args.one_lever] = one_lever(settings(args), args.one_lever)
        print(json.dumps(figures[args.one_lever]), flush=True)
        return 0
    parts = [x for x in args.parts.split(",") if x]
    unknown = [x for x in parts if x not in PARTS]
    if unknown:
        p.error(f"--parts: unknown {', '.join(unknown)} (known: {', '.join(PARTS)})")
    unknown = [x for x in (args.levers or "").split(",") if x and x not in LEVERS]
    if unknown:
        p.error(f"--levers: unknown {', '.join(unknown)} (known: {', '.join(LEVERS)})")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    print(json.dumps(bench(settings(args), parts, args.partial)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
