"""`siclip train`: the lean Accelerate loop, read top to bottom.

    prepare:   config -> data (shards, sidecars, epoch plan) -> model (+ inheritance) -> teachers and
               each stage's objective -> room for the first checkpoint -> the run folder (written only once
               every check has passed) -> AdamW -> resume from the latest checkpoint
    each step: stage (what trains, which losses, which teacher) -> batch -> teacher embeddings ->
               forward/backward over the whole batch with gradient caching -> gradients averaged
               across processes -> clip -> AdamW step -> logit_scale clamped in place -> log,
               eval, checkpoint

Gradient caching (`micro_batch`): the embeddings of the whole per-process batch are computed
without activations, micro-batch by micro-batch; the loss over the gathered global batch and its
gradient with respect to those embeddings follow; each micro-batch is then recomputed with
activations and the embedding gradients pushed through it. Every contrastive term sees the
whole batch while activations are held for one micro-batch at a time.

Several processes (`accelerate launch`): the objective gathers features from every process, so
each holds the same loss; the model is not wrapped in DDP (its all-reduce would fire once per
micro-batch); instead the gradients of the model and of the loss terms' own parameters are
averaged once per step, which gives every process the gradient of the global loss.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import resource
import time
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn

from siclip.manifests.errors import SiclipError
from siclip.manifests.layout import DataRoot
from siclip.manifests.manifest import StageManifest, stage_lock
from siclip.manifests.progress import Progress, format_duration
from siclip.manifests.storage import format_size
from siclip.config import to_toml
from siclip.training.config import StageConfig, TrainConfig, match_globs
from siclip.training.data import (SampleSettings, check_shards_intact, check_sidecars, plan_epoch, shared_tokenizer,
                           split_shards, train_loader)
from siclip.images import Preprocess
from siclip.training.evaluate import ModelEncoder, retrieval, to_input, zeroshot_results, zeroshot_set
from siclip.teachers import in_data_root, parse_teacher
from siclip.training.objective import Features, Objective, load_teacher, stage_objectives
from siclip.training.runs import FINAL, STATE, Run, checkpoint_name, failpoint, folder_bytes, write_plots
from siclip.training.tracking import check_trackers, start_tracking, tracker_settings
from siclip.manifests.messages import log, first_line

# keys a resumed run may change; the rest decide the data order or the numbers
RESUMABLE_CHANGES = {"eval_every", "checkpoint_every", "keep_checkpoints", "log_every", "record_keys", "threads",
                     "zeroshot_every", "zeroshot_folders", "zeroshot_classnames", "zeroshot_templates", "report_to",
                     "tracking_project"}
HELD_OUT_KEYS = {"val_samples", "val_shards"}  # two ways to name the held-out shards: compared by the shards
EXIT_BUDGET = 3


# ----------------------------------------------------------------------------- pieces of a step


def resolve_precision(precision: str) -> str:
    """Accelerate's mixed_precision: bf16 on a GPU that has it, fp16 (with a loss scaler) on one without, fp32 on CPU."""
    if precision != "auto":
        return precision
    if torch.cuda.is_available():
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "no"


def choose_precision(precision: str) -> tuple[str | None, str]:
    """What to ask Accelerator for, and why: a precision the config names wins; "auto" leaves the choice to
    Accelerate when it has one (ACCELERATE_MIXED_PRECISION, which `accelerate launch` sets from its
    --mixed_precision flag or `accelerate config`'s file), else takes siclip's choice for the device."""
    if precision != "auto":
        return precision, f"precision = {precision!r} in the config"
    if os.environ.get("ACCELERATE_MIXED_PRECISION"):
        return None, (f"Accelerate's: ACCELERATE_MIXED_PRECISION={os.environ['ACCELERATE_MIXED_PRECISION']}, as "
                      f"accelerate launch sets it from --mixed_precision or accelerate config")
    return resolve_precision("auto"), "siclip's for this device (precision = \"auto\" and none from Accelerate)"


def chunks(n: int, size: int) -> list[slice]:
    return [slice(i, min(i + size, n)) for i in range(0, n, size)]


def student_inputs(batch: dict, device, mean, std):
    """(normalised pixels, every caption's token ids: web then the valid synthetic ones, synthetic validity)."""
    valid = batch["syn_valid"]
    texts = torch.cat([batch["text"], batch["syn_text"][valid]])
    return to_input(batch["pixels"].to(device), mean, std), texts.to(device), valid.to(device)


def assemble(image: torch.Tensor, texts: torch.Tensor, valid: torch.Tensor, teacher: dict | None) -> Features:
    """Split the caption embeddings back into web (B, D) and synthetic (B, k, D) with zeros where there is none."""
    B = len(image)
    syn = texts.new_zeros(*valid.shape, texts.shape[-1])
    syn[valid] = texts[B:]
    return Features(image, texts[:B], syn, valid, **(teacher or {}))


def forward_backward(model, objective: Objective, pixels, texts, valid, teacher: dict | None, micro: int,
                     accelerator) -> dict[str, torch.Tensor]:
    """The stage's loss over the whole batch and its gradients, holding activations for `micro` images (and `micro`
    captions) at a time; `micro` 0, or at least the batch's images, is one plain forward and backward."""
    scale = model.scale()
    if not micro or micro >= len(pixels):  # no gradient caching: the batch, captions and all, fits
        with accelerator.autocast():
            image, text = model.encode_image(pixels), model.encode_text(texts)
        terms = objective(assemble(image.float(), text.float(), valid, teacher), scale)
        accelerator.backward(terms["loss"])
        return terms
    with torch.no_grad(), accelerator.autocast(), batchnorm_statistics_kept(model):
        image = torch.cat([model.encode_image(pixels[s]) for s in chunks(len(pixels), micro)]).float()
        text = torch.cat([model.encode_text(texts[s]) for s in chunks(len(texts), micro)]).float()
    image.requires_grad_(True)
    text.requires_grad_(True)
    terms = objective(assemble(image, text, valid, teacher), scale)
    accelerator.backward(terms["loss"])  # gradients of the loss terms' own parameters, logit_scale, and the embeddings
    for encode, inputs, cached in ((model.encode_image, pixels, image), (model.encode_text, texts, text)):
        for s in chunks(len(inputs), micro):
            with accelerator.autocast():
                out = encode(inputs[s])
            if not out.requires_grad:  # a tower frozen whole has nothing to learn from its embeddings' gradient
                break
            out.float().backward(cached.grad[s])
    return terms


@contextmanager
def batchnorm_statistics_kept(model: nn.Module):
    """BatchNorm running statistics as they were before the block: the pass without gradients of gradient
    caching sees every micro-batch once more, and must not count it twice (MCi0 has BatchNorm)."""
    kept = [(m, [b.clone() for b in m.buffers(recurse=False)]) for m in model.modules()
            if isinstance(m, BATCH_NORMS) and m.training and m.track_running_stats]
    try:
        yield
    finally:
        for m, buffers in kept:
            for b, before in zip(m.buffers(recurse=False), buffers):
                b.copy_(before)


def frozen_batchnorm_to_eval(model: nn.Module) -> int:
    """BatchNorm layers whose parameters are all frozen run in eval mode, so their running statistics stay as
    they are too (a frozen module is left bit-identical); returns how many. Call after `model.train()`."""
    n = 0
    for m in model.modules():
        params = list(m.parameters(recurse=False))
        if isinstance(m, BATCH_NORMS) and params and not any(p.requires_grad for p in params):
            m.eval()
            n += 1
    return n


BATCH_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)


def average_gradients(params: list[nn.Parameter], world: int) -> None:
    """Every process ends with the mean of the processes' gradients (one all-reduce per step)."""
    if world == 1:
        return
    import torch.distributed as dist

    grads = [p.grad for p in params if p.grad is not None]
    flat = torch.cat([g.reshape(-1) for g in grads])  # one buffer, one all-reduce
    dist.all_reduce(flat)
    flat /= world
    for g, mean in zip(grads, flat.split([g.numel() for g in grads])):
        g.copy_(mean.view_as(g))


def decay_groups(params: list[tuple[str, nn.Parameter]], weight_decay: float) -> list[dict]:
    """AdamW's groups: weight decay on weight matrices and tables; none on gains, biases, norms, logit_scale."""
    decay = [p for n, p in params if p.ndim >= 2 and "logit_scale" not in n]
    rest = [p for n, p in params if not (p.ndim >= 2 and "logit_scale" not in n)]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": rest, "weight_decay": 0.0}]


@dataclass
class StageSpan:
    """A stage placed on the step axis: steps [start, end)."""

    index: int
    cfg: StageConfig
    start: int
    end: int

    def lr(self, step: int) -> float:
        """Linear warm-up to the stage's peak, then cosine to min_lr (or constant)."""
        s, local, length = self.cfg, step - self.start, self.end - self.start
        if local < s.warmup_steps:
            return s.lr * (local + 1) / s.warmup_steps
        if s.schedule == "constant" or length <= s.warmup_steps:
            return s.lr
        progress = (local - s.warmup_steps) / (length - s.warmup_steps)
        return s.min_lr + 0.5 * (s.lr - s.min_lr) * (1 + math.cos(math.pi * progress))


def place_stages(stages: list[StageConfig], steps_per_epoch: int) -> list[StageSpan]:
    spans, start = [], 0
    for i, s in enumerate(stages):
        length = s.steps or max(1, round(s.epochs * steps_per_epoch))
        spans.append(StageSpan(i, s, start, start + length))
        start += length
    return spans


def set_trainable(model: nn.Module, stage: StageConfig, frozen_inherited: set[str]) -> tuple[int, int]:
    """requires_grad per the stage's globs (a tensor shared by several layers trains if any of its names is
    listed in `train` and none in `freeze` or `frozen_inherited`); returns (trainable, all) parameter counts."""
    named = list(model.named_parameters(remove_duplicate=False))
    names = [n for n, _ in named]
    train, freeze = match_globs(names, stage.train), match_globs(names, stage.freeze)
    by_tensor: dict[int, tuple[nn.Parameter, list[str]]] = {}
    for n, p in named:
        by_tensor.setdefault(id(p), (p, []))[1].append(n)
    trainable = total = 0
    for p, tensor_names in by_tensor.values():
        on = any(n in train for n in tensor_names) and not any(n in freeze or n in frozen_inherited
                                                                for n in tensor_names)
        p.requires_grad_(on)
        total += p.numel()
        trainable += p.numel() if on else 0
    return trainable, total


def peak_memory_mb(device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KB on Linux: the process's high-water RSS


def config_digest(cfg: TrainConfig) -> dict:
    """The keys a resumed run must keep; the held-out split is compared by the shards it holds out (data.json)."""
    d = cfg.to_dict()
    return {k: v for k, v in d.items() if k not in RESUMABLE_CHANGES | HELD_OUT_KEYS}


def loader_error(e: SiclipError) -> SiclipError:
    """A loader worker's error arrives with its traceback; keep the one line that says what and where."""
    last = str(e).strip().splitlines()[-1]
    return SiclipError(last.split(": ", 1)[1] if last.split(": ", 1)[0].endswith("Error") else last)


# ----------------------------------------------------------------------------- the run


@dataclass
class TrainResult:
    """How `train` ended: its exit status, and (in the main process) the summary `siclip train --json` prints."""

    status: int  # 0: the schedule or --max-steps done; EXIT_BUDGET: stopped at the storage budget
    summary: dict


def run_summary(run: Run, status: str, start_step: int, step: int, total: int, seconds: float,
                batch_size: int) -> dict:
    """The end of a `train` call: the steps it trained and how fast, the last logged losses and evaluation,
    and where the run's files are."""
    records = run.read_metrics()
    logged = [r for r in records if "loss" in r]
    evals = [r for r in records if "eval" in r]
    latest = run.latest()
    return {
        "run": run.name, "status": status, "steps": step - start_step, "step": step, "total_steps": total,
        "seconds": round(seconds, 3),
        "samples_per_s": round((step - start_step) * batch_size / seconds, 2) if seconds > 0 else 0.0,
        "loss": logged[-1]["loss"] if logged else None, "terms": logged[-1].get("terms") if logged else None,
        "logged_step": logged[-1]["step"] if logged else None,
        "eval": {"step": evals[-1]["step"], **evals[-1]["eval"]} if evals else None,
        "paths": {"run": str(run.path), "config": str(run.path / "config.toml"),
                  "final_model": str(run.path / FINAL) if (run.path / FINAL / STATE).is_file() else None,
                  "checkpoint": str(latest[1]) if latest else None, "metrics": str(run.metrics_path),
                  "plots": sorted(str(p) for p in (run.path / "plots").glob("*.png"))},
    }


def train(cfg: TrainConfig, data: str | Path, out: str | Path | None = None, max_steps: int | None = None,
          resume: bool = False, config_name: str = "run") -> TrainResult:
    """Train per `cfg` on the data root; status 0 when the schedule (or max_steps) is done, 3 when stopped at the
    budget (before it trains when even the first checkpoint would not fit)."""
    from accelerate import Accelerator

    from siclip.training.inherit import inherit_weights
    from siclip.training.model import build_model, load_config

    # -- prepare: the processes, the run folder, the config ---------------------------------------------
    root = DataRoot(data)
    if not root.manifest_path("shards").is_file():
        raise SiclipError(f"{root.manifest_path('shards')} does not exist: run 'siclip shards --data {root.root}' first")
    run = Run.at(root, out or config_name)
    check_trackers(cfg.report_to)
    precision, chosen_by = choose_precision(cfg.precision)
    accelerator = Accelerator(mixed_precision=precision, **tracker_settings(cfg.report_to, run.path))
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    main, rank, world, device = (accelerator.is_main_process, accelerator.process_index,
                                 accelerator.num_processes, accelerator.device)
    say = log if main else (lambda msg: None)
    if cfg.batch_size % world:
        raise SiclipError(f"batch_size {cfg.batch_size} does not split evenly over {world} processes")
    local_batch = cfg.batch_size // world
    micro = min(cfg.micro_batch, local_batch)  # 0: no gradient caching

    with ExitStack() as stack:
        locked = None
        if main:
            try:
                stack.enter_context(stage_lock(root, "train"))
            except SiclipError as e:
                locked = str(e)
        locked = _broadcast_message(locked, accelerator)  # every process stops, none waits for the others
        if locked:
            raise SiclipError(locked)
        saved = run.path / "config.json"
        # a folder whose start failed before its first step holds nothing to keep: it starts afresh; a run that
        # trained is continued only by --resume with a config that gives the same data order and numbers
        afresh = saved.is_file() and not run.started()
        protected = saved.is_file() and not afresh
        if protected and not resume:
            raise SiclipError(f"{run.path} already holds a run; pass --resume to continue it, or choose another --out")
        if protected:
            before = json.loads(saved.read_text())
            changed = sorted(k for k, v in config_digest(cfg).items() if before.get(k) != v)
            if changed:
                raise SiclipError(f"--resume with a config that differs from the run's in {', '.join(changed)} "
                                  f"(see {run.path / 'config.toml'}); these decide the data order or the numbers")
        say(f"# siclip train: resolved config ({run.path / 'config.toml'})\n{to_toml(cfg)}")
        say(f"train: mixed precision {accelerator.mixed_precision}, {chosen_by}")

        # -- data ---------------------------------------------------------------------------------------
        train_shards, val_shards = split_shards(root, cfg.val_shards, cfg.val_samples)
        if protected:  # val_shards and val_samples may change, as long as they hold out the same shards
            before_held = json.loads((run.path / "data.json").read_text())["val_shards"] \
                if (run.path / "data.json").is_file() else None
            if before_held is not None and before_held != [s.name for s in val_shards]:
                raise SiclipError(f"--resume with a config that holds out {[s.name for s in val_shards]}, but the run "
                                  f"held out {before_held} (see {run.path / 'data.json'}); choose the same shards")
        check_shards_intact(train_shards + val_shards)
        zeroshot_sets = [zeroshot_set(in_data_root(str(f), root), cfg.zeroshot_classnames or None,
                                      cfg.zeroshot_templates or None, "zeroshot_folders") for f in cfg.zeroshot_folders]
        use_captions = cfg.synthetic_captions > 0 and any(s.loss.clip_synthetic > 0 for s in cfg.stages)
        if use_captions:
            check_sidecars(root, "captions", train_shards, "clip_synthetic > 0")
        use_teacher_sidecar = any(s.teacher == "sidecar" for s in cfg.stages)
        if use_teacher_sidecar:
            check_sidecars(root, "teacher", train_shards, "teacher = 'sidecar'")
            made = StageManifest.load(root, "teacher").params
            if made.get("augmentations") and made.get("flip", True) and not cfg.flip:
                say("train: the teacher sidecars were made with flips on; with flip = false a view recorded "
                    "mirrored is not replayed (its embedding is of the mirror image), so fewer views are used")

        # -- model, inheritance, teachers, objectives ---------------------------------------------------
        try:
            model_config = load_config(cfg.model, cfg.model_overrides())
        except (FileNotFoundError, ValueError) as e:
            raise SiclipError(f"model {cfg.model!r}: {e}") from None
        torch.manual_seed(cfg.seed)
        model = build_model(model_config)
        model.set_grad_checkpointing(cfg.grad_checkpointing)
        report_path = run.path / "inherit_report.json"
        resume_from = run.latest() if resume else None
        # inherit_freeze: what inherit_weights freezes (inherited tensors, not logit_scale nor new modules) stays
        # frozen through the first stage; the later stages' globs alone decide what trains
        frozen_inherited: set[str] = set()
        report = None
        if cfg.inherit_from and resume_from is None:  # step 0: every process inherits the same way
            try:
                report = inherit_weights(model, parse_teacher(cfg.inherit_from, root, "inherit_from"),
                                         freeze=cfg.inherit_freeze)  # its report is saved with the run folder
            except (OSError, ValueError, RuntimeError, ImportError) as e:
                raise SiclipError(f"inherit_from {cfg.inherit_from!r}: {first_line(e)}") from None
            say(f"train: {report.summary()} (report: {report_path})")
            frozen_inherited = set(report.frozen_names())
        elif cfg.inherit_from:  # the checkpoint holds the weights; the report says which were frozen
            frozen_inherited = {t["name"] for t in json.loads(report_path.read_text())["tensors"] if t["frozen"]}

        teachers, loaded = {}, {}
        for s in cfg.stages:
            if s.teacher not in loaded:
                loaded[s.teacher] = load_teacher(s.teacher, root)
            teachers[s.name] = loaded[s.teacher]
        torch.manual_seed(cfg.seed + 1)
        objectives = stage_objectives(cfg.stages, model_config.embed_dim, teachers, cfg.pm_k)
        for i, s in enumerate(cfg.stages):  # unknown module globs stop the run now, not at a stage boundary
            set_trainable(model, s, frozen_inherited if i == 0 else set())

        online = [t for t in loaded.values() if t is not None and t.image_size]
        settings = SampleSettings(
            seed=cfg.seed, image_size=model_config.image.image_size, context_length=model_config.text.context_length,
            synthetic_captions=cfg.synthetic_captions if use_captions else 0, crop_scale=tuple(cfg.crop_scale),
            flip=cfg.flip, captions=use_captions, teacher=use_teacher_sidecar,
            teacher_image_size=max((t.image_size for t in online), default=0))
        plan0 = plan_epoch(train_shards, cfg.seed, 0, rank, world, cfg.workers, local_batch)
        steps_per_epoch = plan0.steps
        spans = place_stages(cfg.stages, steps_per_epoch)
        total = spans[-1].end
        stop = min(total, max_steps) if max_steps else total
        if plan0.note:
            say(f"train: loader: {plan0.note}")
        held_samples = sum(s.samples for s in val_shards)

        # -- the budget: a first checkpoint that would not fit stops the run before it trains --------------
        begin = resume_from[0] if resume_from is not None else 0
        if begin < stop:
            first = min(stop, (begin // cfg.checkpoint_every + 1) * cfg.checkpoint_every)
            refusal = run.room_for(first, _estimate_checkpoint(run, model, objectives), cfg.keep_checkpoints) \
                if main else None
            refusal = _broadcast_message(refusal, accelerator)
            if refusal:
                say(f"train: {refusal}")
                return TrainResult(EXIT_BUDGET, run_summary(run, "budget", begin, begin, total, 0.0, cfg.batch_size)
                                   if main else {})

        # -- the run folder: written only now that every check has passed -----------------------------------
        accelerator.wait_for_everyone()  # every process has looked at the run folder before it changes
        if main:
            if afresh:
                say(f"train: {run.path} holds a start that failed before its first step (no checkpoint, no "
                    f"metrics): starting it afresh with this config")
                run.clear_failed_start()
            run.path.mkdir(parents=True, exist_ok=True)
            run.reconcile(log=say)
            (run.path / "config.toml").write_text(to_toml(cfg))
            saved.write_text(json.dumps(cfg.to_dict(), indent=1) + "\n")
            if report is not None:
                report.save(report_path)
            (run.path / "data.json").write_text(json.dumps({
                "data_root": str(root.root), "train_shards": [s.name for s in train_shards], "val_shards": [s.name for s in val_shards],
                "train_samples": sum(s.samples for s in train_shards), "val_samples": held_samples,
                "steps_per_epoch": steps_per_epoch,
                "global_batch": cfg.batch_size, "processes": world, "precision": accelerator.mixed_precision,
                "loader_workers": len(plan0.workers),
                "samples_per_epoch_used": steps_per_epoch * cfg.batch_size, "total_steps": total,
                "stages": [{"name": sp.cfg.name, "start": sp.start, "end": sp.end} for sp in spans]}, indent=1) + "\n")
        accelerator.wait_for_everyone()  # the others read the run folder only once it is in order
        held = (f"{len(val_shards)} held out ({held_samples:,} samples: {val_shards[0].name}"
                + (f" … {val_shards[-1].name})" if len(val_shards) > 1 else ")")) if val_shards else "none held out"
        say(f"train: {len(train_shards)} training shards ({sum(s.samples for s in train_shards):,} samples), "
            f"{held}; {steps_per_epoch} steps of {cfg.batch_size} per epoch, {total} steps in {len(spans)} stage(s)")
        preprocess = Preprocess(model_config.image.image_size, list(cfg.image_mean), list(cfg.image_std))

        # -- optimizer, devices ---------------------------------------------------------------------------
        named = list(model.named_parameters()) + [(f"objective.{n}", p) for n, p in objectives.named_parameters()]
        optimizer = torch.optim.AdamW(decay_groups(named, cfg.weight_decay), lr=spans[0].cfg.lr,
                                      betas=tuple(cfg.betas), eps=cfg.eps)
        model.to(device)
        objectives.to(device)
        for t in loaded.values():
            if t is not None:
                t.to(device)
        optimizer = accelerator.prepare(optimizer)
        all_params = [p for _, p in named]

        # -- resume ----------------------------------------------------------------------------------------
        step = 0
        if resume_from is not None:
            step = _load_checkpoint(resume_from[1], model, objectives, accelerator, world)
            say(f"train: resuming from {resume_from[1].name} (step {step} of {total})")
        else:
            if resume:
                say(f"train: nothing to resume in {run.path}; starting at step 0")
            if world > 1:  # the same seed built the same weights; make sure of it
                from accelerate.utils import broadcast

                for p in list(model.parameters()) + list(objectives.parameters()):
                    p.data.copy_(broadcast(p.data.clone(), from_process=0))
        keys_path = run.path / f"keys-rank{rank}.jsonl"
        if main:
            run.truncate_metrics(step)
        if cfg.record_keys:
            run.truncate_metrics(step, keys_path)
        if (run.path / FINAL / "state.json").is_file() and step >= total:
            say(f"train: {run.name} already finished all {total} steps; final model in {run.path / FINAL}")
            return TrainResult(0, run_summary(run, "finished", step, step, total, 0.0, cfg.batch_size) if main else {})
        start_tracking(accelerator, run, cfg.tracking_project,
                       {**cfg.to_dict(), "processes": world, "mixed_precision": accelerator.mixed_precision}, step)

        # -- the loop --------------------------------------------------------------------------------------
        progress = Progress("train", stop, unit="steps") if main else None
        started, start_step, span, last = time.monotonic(), step, None, {}
        status = 0
        while step < stop:
            epoch, in_epoch = divmod(step, steps_per_epoch)
            plan = plan_epoch(train_shards, cfg.seed, epoch, rank, world, cfg.workers, local_batch)
            loader = train_loader(root, plan, settings, local_batch, cfg.shuffle_buffer, in_epoch,
                                  in_process=cfg.workers == 0, shuffle_initial=cfg.shuffle_initial,
                                  open_shards=cfg.open_shards)
            expected = plan.order(in_epoch)
            try:
                for batch in loader:
                    if batch["position"] != (epoch, next(expected, None)):
                        raise RuntimeError(f"loader out of order at step {step}: got {batch['position']}")
                    if span is None or not span.start <= step < span.end:
                        span = next(sp for sp in spans if sp.start <= step < sp.end)
                        trainable, count = set_trainable(model, span.cfg,
                                                         frozen_inherited if span.index == 0 else set())
                        model.train()
                        frozen_batchnorm_to_eval(model)
                        teacher = teachers[span.cfg.name]
                        crd = objectives[span.cfg.name].crd
                        say(f"train: stage {span.index + 1}/{len(spans)} {span.cfg.name!r}, steps {span.start}-"
                            f"{span.end - 1}: {trainable:,} of {count:,} parameters train; teacher: "
                            f"{teacher.name if teacher else 'none'}; loss: " + ", ".join(
                                f"{k}={v:g}" for k, v in vars(span.cfg.loss).items() if v)
                            + (f"; CRD teacher scale {crd.teacher_scale:.4g}" if crd is not None else ""))
                    t0 = time.perf_counter()
                    lr = span.lr(step)
                    for group in optimizer.param_groups:
                        group["lr"] = lr
                    pixels, texts, valid = student_inputs(batch, device, cfg.image_mean, cfg.image_std)
                    with accelerator.autocast():
                        feats = teacher.embed(batch, device) if teacher is not None else None
                    terms = forward_backward(model, objectives[span.cfg.name], pixels, texts, valid, feats, micro,
                                             accelerator)
                    average_gradients(all_params, world)
                    norm = accelerator.clip_grad_norm_([p for p in all_params if p.grad is not None],
                                                       cfg.grad_clip) if cfg.grad_clip else None
                    failpoint(f"step:{step + 1}")
                    optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
                    model.clamp_logit_scale_()  # after the step, so the parameter keeps its gradient
                    step += 1
                    seconds = time.perf_counter() - t0
                    last = {k: float(v.detach()) for k, v in terms.items()}
                    if cfg.record_keys:
                        with open(keys_path, "a") as f:
                            f.write(json.dumps({"step": step, "keys": batch["keys"]}) + "\n")
                    if main and (step % cfg.log_every == 0 or step == stop):
                        run.append_metrics({
                            "step": step, "epoch": round(step / steps_per_epoch, 4), "stage": span.cfg.name,
                            "loss": last["loss"], "terms": {k: v for k, v in last.items() if k != "loss"},
                            "lr": lr, "temperature": float(model.scale().detach()),
                            "grad_norm": None if norm is None else float(norm),
                            "samples_per_s": round(cfg.batch_size / seconds, 2),
                            "seconds": round(time.monotonic() - started, 3),
                            "peak_memory_mb": round(peak_memory_mb(device), 1),
                            "no_synthetic": batch["no_synthetic"]})
                    if progress and (progress.due() or step == stop):
                        progress.update(step - start_step, f"{span.cfg.name} | loss {last['loss']:.3f} | lr {lr:.2e} | "
                                        f"{(step - start_step) * cfg.batch_size / (time.monotonic() - started):,.1f} "
                                        f"samples/s", force=step == stop)
                    due = val_shards and ((cfg.eval_every and step % cfg.eval_every == 0) or step == total)
                    zeroshot_due = zeroshot_sets and (step % cfg.zeroshot_every == 0 or step == total)
                    if due or zeroshot_due:
                        _evaluate(run, model, root, val_shards if due else [], preprocess, model_config, device, step,
                                  accelerator, zeroshot_sets if zeroshot_due else [])
                        frozen_batchnorm_to_eval(model)  # evaluation put the whole model back in train mode
                    if step % cfg.checkpoint_every == 0 or step == stop:
                        if not _checkpoint(run, cfg, step, epoch, span, model, objectives, preprocess, accelerator):
                            status = EXIT_BUDGET
                            break
                    if step == stop or step % steps_per_epoch == 0:
                        break
            except SiclipError as e:
                raise loader_error(e) from None
            finally:
                del loader
            if status:
                break
        if progress:
            progress.close()

        # -- the end ------------------------------------------------------------------------------------
        if status == 0 and step == total:
            if not _export_final(run, model, preprocess, step, accelerator):
                status = EXIT_BUDGET
        summary = {}
        if main:
            write_plots(run)
            elapsed = time.monotonic() - started
            summary = run_summary(run, "budget" if status else "done" if step == total else "max_steps", start_step,
                                  step, total, elapsed, cfg.batch_size)
            last_eval = summary["eval"]
            ev = (f"; held-out retrieval i2t R@1 {last_eval['i2t_r1']:.3f}, t2i R@1 {last_eval['t2i_r1']:.3f} "
                  f"(chance {last_eval['chance_r1']:.3f})") if last_eval and "i2t_r1" in last_eval else ""
            where = run.path / FINAL if step == total else run.latest()[1] if run.latest() else run.path
            how = ("stopped at the budget after" if status else "done:" if step == total
                   else f"stopped at --max-steps {stop} (--resume goes on) after")
            say(f"train: {how} {step - start_step} steps "
                f"(to step {step} of {total}) in {format_duration(time.monotonic() - started)}, "
                f"{(step - start_step) * cfg.batch_size / max(elapsed, 1e-9):,.1f} samples/s; "
                f"loss {last.get('loss', float('nan')):.4f}{ev}; model: {where}; plots: {run.path / 'plots'}")
        accelerator.wait_for_everyone()
        accelerator.end_training()  # the trackers' last records out; the processes' group closed
        return TrainResult(status, summary)


def _evaluate(run: Run, model, root, val_shards, preprocess, model_config, device, step, accelerator,
              zeroshot_sets=()) -> None:
    problem = None
    if accelerator.is_main_process:
        try:
            metrics = retrieval(model, root, val_shards, preprocess, model_config.text.context_length, device,
                                where=f"{run.path} at step {step}") if val_shards else {}
            if zeroshot_sets:  # in the shape `siclip eval --json` gives, which the plots read
                encoder = ModelEncoder(model, shared_tokenizer(), preprocess, device)
                metrics["zeroshot"] = zeroshot_results(encoder, zeroshot_sets, progress=False, log=log)
            run.append_metrics({"step": step, "eval": metrics})
            write_plots(run)
        except SiclipError as e:  # a diverged model: every process stops, none waits for the main one
            problem = str(e)
    problem = _broadcast_message(problem, accelerator)
    if problem:
        raise SiclipError(problem)
    accelerator.wait_for_everyone()


def _estimate_checkpoint(run: Run, model, objectives) -> int:
    latest = run.latest()
    if latest is not None:
        return folder_bytes(latest[1])
    params = sum(p.numel() * p.element_size() for p in model.state_dict().values()) + \
        sum(p.numel() * p.element_size() for p in objectives.state_dict().values())
    return 3 * params + 256 * 1024  # weights, AdamW's two moments, small files


def _broadcast_message(msg: str | None, accelerator) -> str | None:
    from accelerate.utils import broadcast_object_list

    box = [msg]
    if accelerator.num_processes > 1:
        broadcast_object_list(box, from_process=0)
    return box[0]


def _checkpoint(run: Run, cfg: TrainConfig, step: int, epoch: int, span: StageSpan, model, objectives, preprocess,
                accelerator) -> bool:
    """Write a checkpoint atomically after checking the budget; False (nothing written) when it would not fit."""
    from safetensors.torch import save_model

    main = accelerator.is_main_process
    refusal = run.room_for(step, _estimate_checkpoint(run, model, objectives), cfg.keep_checkpoints) if main else None
    refusal = _broadcast_message(refusal, accelerator)
    if refusal:
        log(f"train: {refusal}") if main else None
        return False
    tmp = run.checkpoints_dir / f".tmp-{checkpoint_name(step)}"
    if main:
        run.drop_old(cfg.keep_checkpoints)
        tmp.mkdir(parents=True, exist_ok=True)
        model.save_pretrained(tmp)
        preprocess.save(tmp)
        save_model(objectives, str(tmp / "objective.safetensors"))  # the stages' shared PM term stored once
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp / "accelerate"))
    accelerator.wait_for_everyone()
    if main:
        run.publish(tmp, run.checkpoints_dir / checkpoint_name(step),
                    {"step": step, "epoch": epoch, "stage": span.cfg.name, "processes": accelerator.num_processes,
                     "config": hashlib.sha256(json.dumps(config_digest(cfg), sort_keys=True).encode()).hexdigest()})
        run.drop_old(cfg.keep_checkpoints, after_write=True)
    accelerator.wait_for_everyone()
    return True


def _load_checkpoint(folder: Path, model, objectives, accelerator, world: int) -> int:
    from safetensors.torch import load_model

    state = json.loads((folder / "state.json").read_text())
    if state.get("processes", 1) != world:
        raise SiclipError(f"{folder} was written by {state.get('processes')} process(es); resume with the same "
                          f"number (the data split depends on it), not {world}")
    device = "cpu" if accelerator.device.type == "cpu" else str(accelerator.device)  # safetensors refuses "cpu:0"
    load_model(model, str(folder / "model.safetensors"), device=device)
    try:
        load_model(objectives, str(folder / "objective.safetensors"), device=device)
    except RuntimeError as e:
        raise SiclipError(f"{folder}: the loss terms' parameters it holds do not fit this run's "
                          f"({str(e).strip().splitlines()[-1].strip()}); a checkpoint written before the stages "
                          f"shared one pair-matching term cannot be resumed when several stages use pm") from None
    accelerator.load_state(str(folder / "accelerate"))
    return int(state["step"])


def _export_final(run: Run, model, preprocess, step: int, accelerator) -> bool:
    """The model at the end of the schedule into RUN/final (recorded and counted like a checkpoint)."""
    main = accelerator.is_main_process
    refusal = None
    if main:
        from siclip.manifests.storage import StorageBudget

        budget = StorageBudget.load(run.root)
        need = sum(p.numel() * p.element_size() for p in model.state_dict().values()) + 64 * 1024
        if budget.budget_bytes and need > budget.remaining_bytes:
            refusal = (f"stopped at the budget: the final model needs about {format_size(need)} but only "
                       f"{format_size(budget.remaining_bytes)} is left; the last checkpoint holds the same weights")
    refusal = _broadcast_message(refusal, accelerator)
    if refusal:
        log(f"train: {refusal}") if main else None
        return False
    if main:
        tmp = run.path / f".tmp-{FINAL}"
        tmp.mkdir(parents=True, exist_ok=True)
        model.save_pretrained(tmp)
        preprocess.save(tmp)
        run.publish(tmp, run.path / FINAL, {"step": step})
    accelerator.wait_for_everyone()
    return True
