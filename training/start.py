"""The start of `siclip train`, before its first step: the processes and the run folder, the checks a start
makes (the lock, what --resume may change), the parts it builds (data, model and inheritance, teachers and
each stage's objective, the schedule), and the run folder, written only once every check has passed."""

from __future__ import annotations

import json
import os
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn

from siclip.images import Preprocess
from siclip.manifests.errors import SiclipError
from siclip.manifests.io import failpoint
from siclip.manifests.layout import DataRoot
from siclip.manifests.manifest import StageManifest, stage_lock
from siclip.manifests.messages import first_line, log
from siclip.teachers import in_data_root, parse_teacher
from siclip.config import to_toml
from siclip.training.config import TrainConfig
from siclip.training.data import SampleSettings, check_shards_intact, check_sidecars, plan_epoch, split_shards
from siclip.training.evaluate import zeroshot_set
from siclip.training.objective import load_teacher, stage_objectives
from siclip.training.runs import Run
from siclip.training.step import StageSpan, ddp_settings, place_stages, set_trainable
from siclip.training.tracking import check_trackers, tracker_settings

# keys a resumed run may change; the rest decide the data order or the numbers
RESUMABLE_CHANGES = {"eval_every", "checkpoint_every", "keep_checkpoints", "log_every", "record_keys", "threads",
                     "zeroshot_every", "zeroshot_folders", "zeroshot_classnames", "zeroshot_templates", "report_to",
                     "tracking_project"}
HELD_OUT_KEYS = {"val_samples", "val_shards"}  # two ways to name the held-out shards: compared by the shards


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


def config_digest(cfg: TrainConfig) -> dict:
    """The keys a resumed run must keep; the held-out split is compared by the shards it holds out (data.json)."""
    d = cfg.to_dict()
    return {k: v for k, v in d.items() if k not in RESUMABLE_CHANGES | HELD_OUT_KEYS}


def say(accelerator, msg: str) -> None:
    """One line to the user, from the main process only."""
    if accelerator.is_main_process:
        log(msg)


def broadcast_message(msg: str | None, accelerator) -> str | None:
    """The main process's message (a refusal, an error) on every process, so that all stop together."""
    from accelerate.utils import broadcast_object_list

    box = [msg]
    if accelerator.num_processes > 1:
        broadcast_object_list(box, from_process=0)
    return box[0]


def open_run(cfg: TrainConfig, data: str | Path, out: str | Path):
    """(data root, run, Accelerator): the processes, their precision and trackers, for the run folder `out`."""
    from accelerate import Accelerator

    root = DataRoot(data)
    if not root.manifest_path("shards").is_file():
        raise SiclipError(f"{root.manifest_path('shards')} does not exist: run 'siclip shards --data {root.root}' first")
    run = Run.at(root, out)
    check_trackers(cfg.report_to)
    accelerator = Accelerator(mixed_precision=choose_precision(cfg.precision)[0], kwargs_handlers=ddp_settings(),
                              **tracker_settings(cfg.report_to, run.path))
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    if cfg.batch_size % accelerator.num_processes:
        raise SiclipError(f"batch_size {cfg.batch_size} does not split evenly over {accelerator.num_processes} "
                          f"processes")
    return root, run, accelerator


def check_start(cfg: TrainConfig, root: DataRoot, run: Run, resume: bool, accelerator,
                stack: ExitStack) -> tuple[bool, bool]:
    """Take the data root's train lock (held by `stack`) and check that this start may use the run folder;
    returns (afresh: the folder holds a start that failed before its first step, protected: it holds a run)."""
    locked = None
    if accelerator.is_main_process:
        try:
            stack.enter_context(stage_lock(root, "train"))
        except SiclipError as e:
            locked = str(e)
    locked = broadcast_message(locked, accelerator)  # every process stops, none waits for the others
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
    say(accelerator, f"# siclip train: resolved config ({run.path / 'config.toml'})\n{to_toml(cfg)}")
    say(accelerator, f"train: mixed precision {accelerator.mixed_precision}, {choose_precision(cfg.precision)[1]}")
    return afresh, protected


@dataclass
class Parts:
    """What a start builds: the data and its plan, the model, the teachers and objectives, the schedule."""

    train_shards: list
    val_shards: list
    zeroshot_sets: list
    settings: SampleSettings
    model_config: object
    model: nn.Module
    objectives: nn.ModuleDict
    teachers: dict  # stage name -> Teacher or None
    frozen_inherited: set[str]
    spans: list[StageSpan]
    steps_per_epoch: int
    stop: int  # the step this call ends at (--max-steps, else the schedule's end)
    local_batch: int  # this process's share of the batch
    micro: int  # gradient caching's micro-batch; 0: none
    loader_workers: int
    preprocess: Preprocess
    resume_from: tuple[int, Path] | None  # the checkpoint --resume goes on from
    report: object = None  # inherit_weights' report, saved with the run folder

    @property
    def total(self) -> int:
        return self.spans[-1].end


def build(cfg: TrainConfig, root: DataRoot, run: Run, resume: bool, protected: bool, accelerator,
          max_steps: int | None) -> Parts:
    """The data (shards split and checked, sidecars), the model (with inheritance at step 0), the teachers and
    each stage's objective, and the stages placed on the step axis: all checked before anything is written."""
    from siclip.training.inherit import inherit_weights
    from siclip.training.model import build_model, load_config

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
            say(accelerator, "train: the teacher sidecars were made with flips on; with flip = false a view recorded "
                "mirrored is not replayed (its embedding is of the mirror image), so fewer views are used")

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
        say(accelerator, f"train: {report.summary()} (report: {report_path})")
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
    local_batch = cfg.batch_size // accelerator.num_processes
    plan0 = plan_epoch(train_shards, cfg.seed, 0, accelerator.process_index, accelerator.num_processes, cfg.workers,
                       local_batch)
    spans = place_stages(cfg.stages, plan0.steps)
    if plan0.note:
        say(accelerator, f"train: loader: {plan0.note}")
    return Parts(train_shards, val_shards, zeroshot_sets, settings, model_config, model, objectives, teachers,
                 frozen_inherited, spans, plan0.steps, min(spans[-1].end, max_steps) if max_steps else spans[-1].end,
                 local_batch, min(cfg.micro_batch, local_batch), len(plan0.workers),
                 Preprocess(model_config.image.image_size, list(cfg.image_mean), list(cfg.image_std)), resume_from,
                 report)


def write_run_folder(cfg: TrainConfig, root: DataRoot, run: Run, parts: Parts, afresh: bool, accelerator) -> None:
    """The run folder, written only now that every check has passed: the config (TOML to read, JSON to compare on
    resume), the inheritance report, data.json (the split and the epoch plan); a failed start's files go first."""
    accelerator.wait_for_everyone()  # every process has looked at the run folder before it changes
    if accelerator.is_main_process:
        if afresh:
            say(accelerator, f"train: {run.path} holds a start that failed before its first step (no checkpoint, no "
                f"metrics): starting it afresh with this config")
            run.clear_failed_start()
        run.path.mkdir(parents=True, exist_ok=True)
        run.reconcile(log=log)
        (run.path / "config.toml").write_text(to_toml(cfg))
        (run.path / "config.json").write_text(json.dumps(cfg.to_dict(), indent=1) + "\n")
        if parts.report is not None:
            parts.report.save(run.path / "inherit_report.json")
        train_samples, held_samples = (sum(s.samples for s in shards) for shards in (parts.train_shards,
                                                                                       parts.val_shards))
        (run.path / "data.json").write_text(json.dumps({
            "data_root": str(root.root), "train_shards": [s.name for s in parts.train_shards],
            "val_shards": [s.name for s in parts.val_shards], "train_samples": train_samples,
            "val_samples": held_samples, "steps_per_epoch": parts.steps_per_epoch,
            "global_batch": cfg.batch_size, "processes": accelerator.num_processes,
            "precision": accelerator.mixed_precision, "loader_workers": parts.loader_workers,
            "samples_per_epoch_used": parts.steps_per_epoch * cfg.batch_size, "total_steps": parts.total,
            "stages": [{"name": sp.cfg.name, "start": sp.start, "end": sp.end} for sp in parts.spans]},
            indent=1) + "\n")
        failpoint("run-folder-written")  # a start killed before its first step
    accelerator.wait_for_everyone()  # the others read the run folder only once it is in order
    val = parts.val_shards
    held = (f"{len(val)} held out ({sum(s.samples for s in val):,} samples: {val[0].name}"
            + (f" … {val[-1].name})" if len(val) > 1 else ")")) if val else "none held out"
    say(accelerator, f"train: {len(parts.train_shards)} training shards "
        f"({sum(s.samples for s in parts.train_shards):,} samples), {held}; {parts.steps_per_epoch} steps of "
        f"{cfg.batch_size} per epoch, {parts.total} steps in {len(parts.spans)} stage(s)")
