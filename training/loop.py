"""`siclip train`: the lean Accelerate loop, read top to bottom in `train`.

    start:     the processes and the run folder -> the checks (lock, --resume) -> data, model (+ inheritance),
               teachers and each stage's objective -> room for the first checkpoint -> the run folder (written
               only once every check has passed) -> AdamW -> resume from the latest checkpoint   (training/start.py)
    each step: stage (what trains, which losses, which teacher) -> batch -> teacher embeddings ->
               forward/backward over the whole batch with gradient caching, DDP averaging the gradients
               across processes -> clip -> AdamW step -> logit_scale clamped in place   (training/step.py)
               -> log, evaluate, checkpoint
    the end:   the final model, the plots, the summary
"""

from __future__ import annotations

import hashlib
import json
import resource
import time
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import torch

from siclip.manifests.errors import SiclipError
from siclip.manifests.messages import log
from siclip.manifests.progress import Progress, format_duration
from siclip.manifests.storage import format_size
from siclip.training.config import TrainConfig
from siclip.training.data import plan_epoch, shared_tokenizer, train_loader
from siclip.training.evaluate import ModelEncoder, retrieval, zeroshot_results
from siclip.training.runs import FINAL, STATE, Run, checkpoint_name, folder_bytes, write_plots
from siclip.training.start import (Parts, broadcast_message, build, check_start, config_digest, open_run, say,
                                   write_run_folder)
from siclip.training.step import (StageSpan, adamw, decay_groups, forward_backward, frozen_batchnorm_to_eval,
                                  prepare_model, set_trainable, student_inputs)
from siclip.training.tracking import start_tracking

EXIT_BUDGET = 3


@dataclass
class TrainResult:
    """How `train` ended: its exit status, and (in the main process) the summary `siclip train --json` prints."""

    status: int  # 0: the schedule or --max-steps done; EXIT_BUDGET: stopped at the storage budget
    summary: dict


def train(cfg: TrainConfig, data: str | Path, out: str | Path | None = None, max_steps: int | None = None,
          resume: bool = False, config_name: str = "run") -> TrainResult:
    """Train per `cfg` on the data root; status 0 when the schedule (or max_steps) is done, 3 when stopped at the
    budget (before it trains when even the first checkpoint would not fit)."""
    root, run, accelerator = open_run(cfg, data, out or config_name)
    with ExitStack() as stack:
        afresh, protected = check_start(cfg, root, run, resume, accelerator, stack)
        parts = build(cfg, root, run, resume, protected, accelerator, max_steps)
        begin = parts.resume_from[0] if parts.resume_from is not None else 0
        if not room_for_first_checkpoint(cfg, run, parts, begin, accelerator):
            return TrainResult(EXIT_BUDGET, run_summary(run, "budget", begin, begin, parts.total, 0.0,
                                                        cfg.batch_size) if accelerator.is_main_process else {})
        write_run_folder(cfg, root, run, parts, afresh, accelerator)
        model, optimizer, params = prepare(cfg, parts, accelerator)  # model: in DDP under several processes
        step = resume_state(cfg, run, parts, resume, accelerator)
        if (run.path / FINAL / STATE).is_file() and step >= parts.total:
            say(accelerator, f"train: {run.name} already finished all {parts.total} steps; final model in "
                f"{run.path / FINAL}")
            return TrainResult(0, run_summary(run, "finished", step, step, parts.total, 0.0, cfg.batch_size)
                               if accelerator.is_main_process else {})
        start_tracking(accelerator, run, cfg.tracking_project, {**cfg.to_dict(), "processes": accelerator.num_processes,
                                                                "mixed_precision": accelerator.mixed_precision}, step)
        records, span, status = StepRecords(run, cfg, parts, step, accelerator), None, 0
        for epoch, batch in batches(cfg, root, parts, step, accelerator):
            if span is None or not span.start <= step < span.end:
                span = enter_stage(parts, step, accelerator)
            lr = span.lr(step)
            terms, norm, seconds = train_step(model, optimizer, params, parts.objectives[span.cfg.name],
                                              parts.teachers[span.cfg.name], batch, lr, cfg, parts.micro, accelerator)
            step += 1
            records.add(step, span, lr, terms, norm, seconds, batch)
            if not evaluate_or_checkpoint(cfg, root, run, parts, step, epoch, span, accelerator):
                status = EXIT_BUDGET
                break
        records.close()
        return finish(cfg, run, parts, step, status, records, accelerator)


# ----------------------------------------------------------------------------- the named steps of `train`


def room_for_first_checkpoint(cfg: TrainConfig, run: Run, parts: Parts, begin: int, accelerator) -> bool:
    """Whether the budget holds the first checkpoint this call would write; a run that could not keep it stops
    before it trains."""
    if begin >= parts.stop:
        return True
    first = min(parts.stop, (begin // cfg.checkpoint_every + 1) * cfg.checkpoint_every)
    refusal = run.room_for(first, _estimate_checkpoint(run, parts.model, parts.objectives), cfg.keep_checkpoints) \
        if accelerator.is_main_process else None
    refusal = broadcast_message(refusal, accelerator)
    if refusal:
        say(accelerator, f"train: {refusal}")
    return not refusal


def prepare(cfg: TrainConfig, parts: Parts, accelerator):
    """(model, optimizer, every trained parameter): the model and AdamW over it and the loss terms' own parameters
    through accelerator.prepare, the objectives and teachers on the device."""
    objectives = parts.objectives
    model = prepare_model(parts.model, accelerator)
    # not modules DDP could wrap (the objective is called once per step on gathered features; a teacher does not
    # train): placed by hand, before AdamW, whose fused kernel checks where every parameter is
    objectives.to(accelerator.device)
    named = list(parts.model.named_parameters()) + [(f"objective.{n}", p) for n, p in objectives.named_parameters()]
    optimizer = accelerator.prepare(adamw(decay_groups(named, cfg.weight_decay), lr=parts.spans[0].cfg.lr,
                                          betas=tuple(cfg.betas), eps=cfg.eps))
    for t in parts.teachers.values():
        if t is not None:
            t.to(accelerator.device)
    accelerator.register_for_checkpointing(objectives)  # save_state and load_state carry the loss terms' parameters
    # the checkpoint holds the model once, as a siclip model folder (model.safetensors, which resume loads): not
    # a second copy in save_state's folder
    accelerator.register_save_state_pre_hook(lambda models, weights, folder: weights.clear())
    accelerator.register_load_state_pre_hook(lambda models, folder: models.clear())
    return model, optimizer, [p for _, p in named]


def keys_file(run: Run, accelerator) -> Path:
    """With record_keys: the sample keys of each of this process's steps."""
    return run.path / f"keys-rank{accelerator.process_index}.jsonl"


def resume_state(cfg: TrainConfig, run: Run, parts: Parts, resume: bool, accelerator) -> int:
    """The step this call starts at: the latest checkpoint's with --resume (its weights, optimizer and RNG
    loaded), else 0; the run's records after it are dropped, since they are written again."""
    step = 0
    if parts.resume_from is not None:
        step = _load_checkpoint(parts.resume_from[1], parts.model, parts.objectives, accelerator,
                                accelerator.num_processes)
        say(accelerator, f"train: resuming from {parts.resume_from[1].name} (step {step} of {parts.total})")
    elif resume:  # DDP gave every process the model's weights at wrapping; the objective's come from the seed
        say(accelerator, f"train: nothing to resume in {run.path}; starting at step 0")
    if accelerator.is_main_process:
        run.truncate_metrics(step)
    if cfg.record_keys:
        run.truncate_metrics(step, keys_file(run, accelerator))
    return step


def loader_error(e: SiclipError) -> SiclipError:
    """A loader worker's error arrives with its traceback; keep the one line that says what and where."""
    last = str(e).strip().splitlines()[-1]
    return SiclipError(last.split(": ", 1)[1] if last.split(": ", 1)[0].endswith("Error") else last)


def batches(cfg: TrainConfig, root, parts: Parts, step: int, accelerator):
    """(epoch, batch) from `step` to the stop, epoch by epoch, each checked to be the one the plan puts next."""
    rank, world = accelerator.process_index, accelerator.num_processes
    while step < parts.stop:
        epoch, in_epoch = divmod(step, parts.steps_per_epoch)
        plan = plan_epoch(parts.train_shards, cfg.seed, epoch, rank, world, cfg.workers, parts.local_batch)
        loader = train_loader(root, plan, parts.settings, parts.local_batch, cfg.shuffle_buffer, in_epoch,
                              in_process=cfg.workers == 0, shuffle_initial=cfg.shuffle_initial,
                              open_shards=cfg.open_shards)
        expected = plan.order(in_epoch)
        try:
            for batch in loader:
                if batch["position"] != (epoch, next(expected, None)):
                    raise RuntimeError(f"loader out of order at step {step}: got {batch['position']}")
                yield epoch, batch
                step += 1
                if step == parts.stop or step % parts.steps_per_epoch == 0:
                    break
        except SiclipError as e:
            raise loader_error(e) from None
        finally:
            del loader


def enter_stage(parts: Parts, step: int, accelerator) -> StageSpan:
    """The stage `step` is in, with its parameters set to train or stay frozen (frozen BatchNorm in eval mode)."""
    span, model = next(sp for sp in parts.spans if sp.start <= step < sp.end), parts.model
    trainable, count = set_trainable(model, span.cfg, parts.frozen_inherited if span.index == 0 else set())
    model.train()
    frozen_batchnorm_to_eval(model)
    teacher, crd = parts.teachers[span.cfg.name], parts.objectives[span.cfg.name].crd
    say(accelerator, f"train: stage {span.index + 1}/{len(parts.spans)} {span.cfg.name!r}, steps {span.start}-"
        f"{span.end - 1}: {trainable:,} of {count:,} parameters train; teacher: "
        f"{teacher.name if teacher else 'none'}; loss: " + ", ".join(
            f"{k}={v:g}" for k, v in vars(span.cfg.loss).items() if v)
        + (f"; CRD teacher scale {crd.teacher_scale:.4g}" if crd is not None else ""))
    return span


def train_step(model, optimizer, params, objective, teacher, batch: dict, lr: float, cfg: TrainConfig, micro: int,
               accelerator) -> tuple[dict, torch.Tensor | None, float]:
    """One optimizer step on `batch` at learning rate `lr`: (loss terms, gradient norm before clipping, seconds).
    `model` as `prepare` gives it."""
    t0 = time.perf_counter()
    for group in optimizer.param_groups:
        group["lr"] = lr
    pixels, texts, valid = student_inputs(batch, accelerator.device, cfg.image_mean, cfg.image_std)
    with accelerator.autocast():
        feats = teacher.embed(batch, accelerator.device) if teacher is not None else None
    terms = forward_backward(model, objective, pixels, texts, valid, feats, micro, accelerator)
    norm = accelerator.clip_grad_norm_([p for p in params if p.grad is not None],
                                       cfg.grad_clip) if cfg.grad_clip else None
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    accelerator.unwrap_model(model).clamp_logit_scale_()  # after the step, so the parameter keeps its gradient
    return {k: float(v.detach()) for k, v in terms.items()}, norm, time.perf_counter() - t0


def peak_memory_mb(device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KB on Linux: the process's high-water RSS


class StepRecords:
    """What each step leaves: a line of metrics.jsonl every log_every steps, the keys file, the progress line."""

    def __init__(self, run: Run, cfg: TrainConfig, parts: Parts, step: int, accelerator):
        self.run, self.cfg, self.parts, self.accelerator = run, cfg, parts, accelerator
        self.keys = keys_file(run, accelerator)
        main = accelerator.is_main_process
        self.progress = Progress("train", parts.stop, unit="steps") if main else None
        self.started, self.start_step, self.last = time.monotonic(), step, {}

    def add(self, step: int, span: StageSpan, lr: float, terms: dict, norm, seconds: float, batch: dict) -> None:
        cfg, stop, last = self.cfg, self.parts.stop, terms
        self.last = terms
        if cfg.record_keys:
            with open(self.keys, "a") as f:
                f.write(json.dumps({"step": step, "keys": batch["keys"]}) + "\n")
        if self.accelerator.is_main_process and (step % cfg.log_every == 0 or step == stop):
            self.run.append_metrics({
                "step": step, "epoch": round(step / self.parts.steps_per_epoch, 4), "stage": span.cfg.name,
                "loss": last["loss"], "terms": {k: v for k, v in last.items() if k != "loss"},
                "lr": lr, "temperature": float(self.parts.model.scale().detach()),
                "grad_norm": None if norm is None else float(norm),
                "samples_per_s": round(cfg.batch_size / seconds, 2),
                "seconds": round(time.monotonic() - self.started, 3),
                "peak_memory_mb": round(peak_memory_mb(self.accelerator.device), 1),
                "no_synthetic": batch["no_synthetic"]})
        if self.progress and (self.progress.due() or step == stop):
            self.progress.update(step - self.start_step, f"{span.cfg.name} | loss {last['loss']:.3f} | lr {lr:.2e} | "
                                 f"{(step - self.start_step) * cfg.batch_size / (time.monotonic() - self.started):,.1f}"
                                 f" samples/s", force=step == stop)

    def close(self) -> None:
        if self.progress:
            self.progress.close()


def evaluate_or_checkpoint(cfg: TrainConfig, root, run: Run, parts: Parts, step: int, epoch: int, span: StageSpan,
                           accelerator) -> bool:
    """Evaluate and checkpoint where due; False when the checkpoint would not fit the budget (the run stops)."""
    due = parts.val_shards and ((cfg.eval_every and step % cfg.eval_every == 0) or step == parts.total)
    zeroshot_due = parts.zeroshot_sets and (step % cfg.zeroshot_every == 0 or step == parts.total)
    if due or zeroshot_due:
        _evaluate(run, parts.model, root, parts.val_shards if due else [], parts.preprocess, parts.model_config,
                  accelerator.device, step, accelerator, parts.zeroshot_sets if zeroshot_due else [])
        frozen_batchnorm_to_eval(parts.model)  # evaluation put the whole model back in train mode
    if step % cfg.checkpoint_every == 0 or step == parts.stop:
        return _checkpoint(run, cfg, step, epoch, span, parts.model, parts.objectives, parts.preprocess, accelerator)
    return True


def finish(cfg: TrainConfig, run: Run, parts: Parts, step: int, status: int, records: StepRecords,
           accelerator) -> TrainResult:
    """The final model at the end of the schedule, the plots, the summary line; the trackers closed."""
    total, start_step = parts.total, records.start_step
    if status == 0 and step == total:
        if not _export_final(run, parts.model, parts.preprocess, step, accelerator):
            status = EXIT_BUDGET
    summary = {}
    if accelerator.is_main_process:
        write_plots(run)
        elapsed = time.monotonic() - records.started
        summary = run_summary(run, "budget" if status else "done" if step == total else "max_steps", start_step,
                              step, total, elapsed, cfg.batch_size)
        last_eval = summary["eval"]
        ev = (f"; held-out retrieval i2t R@1 {last_eval['i2t_r1']:.3f}, t2i R@1 {last_eval['t2i_r1']:.3f} "
              f"(chance {last_eval['chance_r1']:.3f})") if last_eval and "i2t_r1" in last_eval else ""
        where = run.path / FINAL if step == total else run.latest()[1] if run.latest() else run.path
        how = ("stopped at the budget after" if status else "done:" if step == total
               else f"stopped at --max-steps {parts.stop} (--resume goes on) after")
        log(f"train: {how} {step - start_step} steps "
            f"(to step {step} of {total}) in {format_duration(time.monotonic() - records.started)}, "
            f"{(step - start_step) * cfg.batch_size / max(elapsed, 1e-9):,.1f} samples/s; "
            f"loss {records.last.get('loss', float('nan')):.4f}{ev}; model: {where}; plots: {run.path / 'plots'}")
    accelerator.wait_for_everyone()
    accelerator.end_training()  # the trackers' last records out; the processes' group closed
    return TrainResult(status, summary)


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


# ----------------------------------------------------------------------------- evaluation and checkpoints


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
    problem = broadcast_message(problem, accelerator)
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


def _checkpoint(run: Run, cfg: TrainConfig, step: int, epoch: int, span: StageSpan, model, objectives, preprocess,
                accelerator) -> bool:
    """Write a checkpoint atomically after checking the budget; False (nothing written) when it would not fit. The
    model as a siclip model folder; AdamW, the RNGs and the loss terms' parameters (registered for checkpointing)
    through Accelerate's save_state."""
    main = accelerator.is_main_process
    refusal = run.room_for(step, _estimate_checkpoint(run, model, objectives), cfg.keep_checkpoints) if main else None
    refusal = broadcast_message(refusal, accelerator)
    if refusal:
        log(f"train: {refusal}") if main else None
        return False
    tmp = run.checkpoints_dir / f".tmp-{checkpoint_name(step)}"
    if main:
        run.drop_old(cfg.keep_checkpoints)
        tmp.mkdir(parents=True, exist_ok=True)
        model.save_pretrained(tmp)
        preprocess.save(tmp)
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
        accelerator.load_state(str(folder / "accelerate"))  # AdamW, the RNGs, the loss terms' parameters
    except (RuntimeError, ValueError, KeyError) as err:  # e.g. written before the loss terms' parameters were saved
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise SiclipError(f"{folder}: its optimizer and loss state do not fit this run (a checkpoint of another "
                          f"siclip version?): {reason}; start a new run with another --out") from None
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
    refusal = broadcast_message(refusal, accelerator)
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