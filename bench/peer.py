"""`make bench-peer`: siclip against open_clip_train, side by side, on the same real shards.

Two sets, made with bench/real.py's helpers through the real stage 1 (served on 127.0.0.1, `siclip shards`):
  emoji        bench-real's web rows as they are: JPEG renderings on varied backgrounds, in emoji-test.txt's
               order (each emoji once, then each again), JPEG zero-shot folders.
  transparent  the same emoji, split and captions, each rendered on a transparent background as an RGBA PNG
               (as clip art is published), the URL list ordered by Unicode group so that each shard holds one
               or two groups; its zero-shot folders are transparent PNGs too. Stage 1 composites the
               training images onto white; an eval that drops alpha sees them on black.
On each set and seed: open_clip_train (`bench/open_clip_peer.py`: `python -m open_clip_train.main` with the
model config ViT-peer-tiny-preln registered) on the shards' tars, then `siclip train` with
bench/configs/peer_tiny_preln.toml, from whose values open_clip_train's flags are made. Both train on the
same shards (all but the last, which holds the held-out emoji) for the same epochs.

Each model is evaluated twice:
  shared  one path for both: files decoded with alpha composited onto white (as stage 1 did to the training
          images), resized and center-cropped to 64 px, OpenAI's mean and std, the folder's templates, siclip's
          tokenizer; zero-shot top-1/top-5 by group and subgroup, and R@1/R@5 on the held-out shard (ties
          count against the match).
  own     each tool's own: `siclip eval`; open_clip's preprocess_val, tokenizer and zero-shot classifier on
          torchvision's ImageFolder, and open_clip_train's own retrieval on the held-out shard.
The training loss at 25/50/100% of the steps (mean over the last 5% of steps up to there) and samples/s
(the wall time from the first step to the last, loader included) come from each tool's own log.

    python -m bench peer                     3 seeds, both sets, both tools; a table on stderr, one JSON line
    python -m bench peer --quick             1 seed, 3 epochs
    python -m bench peer --only siclip --sets transparent --seeds 0
A rerun skips the runs that finished (--retrain: trains them again, to measure samples/s anew). A run's name
carries a digest of what it depends on (for siclip, the code of training/ and manifests/ and the config), so a
change to the code trains anew.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import os
import random
import re
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from bench import real
from bench.real import digest, siclip_code

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "bench" / "configs" / "peer_tiny_preln.toml"
OPEN_CLIP_MODEL = "ViT-peer-tiny-preln"  # bench/configs/open_clip/ViT-peer-tiny-preln.json
WRAPPER = REPO / "bench" / "open_clip_peer.py"
RECIPE = REPO / "bench" / "configs" / "peer_recipe.toml"  # --recipe: the SiCLIP recipe at the same samples seen
TEACHER = REPO / "bench" / "configs" / "peer_teacher.toml"  # ... and its teacher, trained on the same shards
TOOLS = ("open_clip", "siclip", "recipe")  # recipe: siclip with RECIPE
QUICK_EPOCHS = 3
SHARDS = [*real.SHARDS[:2], "budget=16GB", *real.SHARDS[3:]]  # room for the runs of several code versions
LEVELS = ("group", "subgroup")


def log(msg: str) -> None:
    print(f"bench-peer: {msg}", file=sys.stderr, flush=True)


@dataclass(frozen=True)
class EmojiSet:
    name: str
    render: str  # the function of pipeline.emoji that draws one picture
    ext: str
    by_group: bool

    def renderer(self):
        from bench import emoji

        return getattr(emoji, self.render)


SETS = {s.name: s for s in (EmojiSet("emoji", "render", "jpg", False),
                            EmojiSet("transparent", "render_transparent", "png", True))}


@dataclass(frozen=True)
class Schedule:
    """What every run of one benchmark invocation shares besides the seed."""

    epochs: int
    warmup: int

    def sets(self, seed: int) -> list[str]:
        return [f"seed={seed}", f"stages.0.epochs={self.epochs}", f"stages.0.warmup_steps={self.warmup}"]


# ----------------------------------------------------------------------------- data


def prepare(s: EmojiSet, data: Path, inputs: Path) -> None:
    """The set's shards in `data` and its zero-shot folders in `inputs`, unless already there."""
    real.ensure_sources()
    record, params = inputs / "zeroshot.json", {"held_out": real.HELD_OUT, "render": s.render, "version": 1}
    if not (record.is_file() and json.loads(record.read_text()) == params):
        log(f"{s.name}: zero-shot folders in {inputs}")
        real.write_zeroshot(inputs / "zeroshot", s.renderer(), s.ext)
        record.write_text(json.dumps(params))
    expected = math.ceil((real.TRAIN_ROWS + real.HELD_OUT) / 300)
    if len(shards_of(data)) == expected:
        return
    log(f"{s.name}: rendering {real.TRAIN_ROWS + real.HELD_OUT} pictures, then siclip shards into {data}")
    real.download(data, real.web_rows(s.renderer(), s.ext, s.by_group), SHARDS)
    if len(shards_of(data)) != expected:
        sys.exit(f"bench-peer: {data} has {len(shards_of(data))} finished shards, expected {expected}")


def shards_of(data: Path) -> list:
    from siclip.manifests.layout import DataRoot
    from siclip.manifests.samples import finished_shards

    return list(finished_shards(DataRoot(data))) if (data / "manifests").is_dir() else []


def split(data: Path, cfg):
    """(training shards, held-out shards) as siclip's config splits them; open_clip_train gets the same."""
    from siclip.manifests.layout import DataRoot
    from siclip.training.data import split_shards

    return split_shards(DataRoot(data), cfg.val_shards, cfg.val_samples)


# ----------------------------------------------------------------------------- runs


def run_command(cmd: list, console: Path | None = None) -> float:
    """Run a command from the repository root (its output to `console` if given); its wall seconds."""
    started = time.monotonic()
    if console is None:
        res = subprocess.run([str(a) for a in cmd], cwd=REPO, stdout=sys.stderr)
    else:
        with open(console, "w") as out:
            res = subprocess.run([str(a) for a in cmd], cwd=REPO, stdout=out, stderr=subprocess.STDOUT)
    if res.returncode:
        tail = "".join(console.read_text().splitlines(keepends=True)[-25:]) if console else ""
        sys.exit(f"{tail}bench-peer: {' '.join(map(str, cmd[:4]))} … exited {res.returncode}"
                 + (f" (its output: {console})" if console else ""))
    return time.monotonic() - started


MEASURED = "bench-peer.json"  # written beside each run: the load and the wall time while it trained


def train_measured(cmd: list, run: Path, console: Path | None = None) -> None:
    """Train with `cmd`, then record beside the run the 1-minute load before and after and the wall time, so that a
    rerun that skips the run still reports the conditions it was measured in."""
    load = os.getloadavg()[0]
    seconds = run_command(cmd, console)
    (run / MEASURED).write_text(json.dumps({"load_1min": [round(load, 2), round(os.getloadavg()[0], 2)],
                                            "wall_minutes": round(seconds / 60, 2)}) + "\n")


def measured(run: Path) -> dict:
    return json.loads((run / MEASURED).read_text()) if (run / MEASURED).is_file() else {}


def siclip_train(data: Path, config: Path, sets: list[str], name: str, retrain: bool = False) -> Path:
    """`siclip train --config config --set …` as run `name`; skipped when it finished before (unless `retrain`)."""
    run = data / "runs" / name
    if retrain or not (run / "final" / "state.json").is_file():
        if run.exists():  # started and stopped, or to be measured again: whole or not at all
            shutil.rmtree(run)
        log(f"{data.name}: siclip train {name}")
        train_measured([sys.executable, "-m", "siclip.cli", "train", "--data", data, "--config", config, "--out",
                        name, *[a for s in sets for a in ("--set", s)]], run)
    return run


def siclip_run(data: Path, cfg, seed: int, schedule: Schedule, retrain: bool = False) -> dict:
    """`siclip train` with the benchmark's config."""
    sets = schedule.sets(seed)
    name = f"siclip-e{schedule.epochs}-s{seed}-{digest(CONFIG, *sets, *siclip_code())}"
    run = siclip_train(data, CONFIG, sets, name, retrain)
    return {"tool": "siclip", "seed": seed, "run": name, "path": str(run)}


def recipe_run(data: Path, cfg, seed: int, schedule: Schedule, retrain: bool = False, config: Path = RECIPE) -> dict:
    """`siclip train` with the recipe (or a variant of it, `--recipe-config`), inheriting from and distilling the
    set's teacher (made by `prepare_recipe` first). With two stages the first gets one epoch and the second the rest
    of the plain run's epochs; with one stage it gets them all."""
    stages = len(load_config(config, []).stages)
    if stages == 2 and schedule.epochs < 2:
        sys.exit("bench-peer: --recipe needs 2 or more epochs (one for the new blocks alone, then the rest)")
    if stages not in (1, 2):
        sys.exit(f"bench-peer: {config} has {stages} stages; a recipe has one, or two (the new blocks, then all)")
    epochs = ["stages.0.epochs=1", f"stages.1.epochs={schedule.epochs - 1}"] if stages == 2 else [
        f"stages.0.epochs={schedule.epochs}"]
    sets = [f"seed={seed}", *epochs, f"inherit_from=runs/{teacher_name(schedule)}/clip"]
    prefix = "recipe" if config == RECIPE else f"recipe-{config.stem}"
    name = f"{prefix}-e{schedule.epochs}-s{seed}-{digest(config, *sets, *siclip_code())}"
    run = siclip_train(data, config, sets, name, retrain)
    return {"tool": "recipe", "seed": seed, "run": name, "path": str(run)}


def teacher_name(schedule: Schedule) -> str:
    return f"peer-teacher-e{schedule.epochs}"


def write_clean(s: EmojiSet, inputs: Path) -> Path:
    """real.CLEAN clean pairs (other renderings of training emoji, in the set's style, captioned with their
    names and keywords) for the captioner to be fitted on."""
    import random

    record, params = inputs / "clean.json", {"clean": real.CLEAN, "render": s.render, "version": 1}
    clean = inputs / "clean"
    if record.is_file() and json.loads(record.read_text()) == params:
        return clean
    train, _ = real.split()
    clean.mkdir(parents=True, exist_ok=True)
    for i in range(real.CLEAN):
        e = train[i * len(train) // real.CLEAN]
        (clean / f"{i:05d}.{s.ext}").write_bytes(s.renderer()(e, random.Random(f"clean:{e.name}")))
        (clean / f"{i:05d}.txt").write_text(e.caption() + "\n")
    record.write_text(json.dumps(params))
    return clean


def siclip_cli(*args) -> None:
    run_command([sys.executable, "-m", "siclip.cli", *args])


def prepare_recipe(s: EmojiSet, data: Path, inputs: Path, schedule: Schedule) -> dict:
    """What the recipe's students need, each part skipped when done: a captioner fitted on clean pairs, its
    captions of every shard, the teacher trained on the training shards and exported, its sidecars. Returns the
    teacher's compute (steps, samples seen, samples/s, minutes of each part), which the students' figures leave out."""
    minutes = {}
    captioner = inputs / "captioner"
    if not (captioner / "fitted.json").is_file():
        log(f"{s.name}: fitting the captioner on {real.CLEAN} clean pairs")
        minutes["captioner"] = run_command([sys.executable, "-m", "demo.fit", "--pairs", write_clean(s, inputs),
                                            "--out", captioner, "--minutes", 1]) / 60
        (captioner / "fitted.json").write_text(json.dumps({"minutes": round(minutes["captioner"], 2)}) + "\n")
    started = time.monotonic()
    siclip_cli("captions", "--data", data, "--model", captioner, "--workers", 1, "--batch-size", 64)
    minutes["captions"] = (time.monotonic() - started) / 60
    name = teacher_name(schedule)
    run = siclip_train(data, TEACHER, schedule.sets(0), name)
    if not (run / "clip" / "config.json").is_file():
        siclip_cli("export", "--data", data, "--run", name)
    started = time.monotonic()
    cfg = load_config(TEACHER, schedule.sets(0))
    siclip_cli("teacher", "--data", data, "--teacher", run / "clip", "--workers", 1, "--batch-size", 64,
               "--augmentations", 2, "--overwrite", "--set", f"crop_scale={list(cfg.crop_scale)}", "--set", "flip=false")
    minutes["sidecars"] = (time.monotonic() - started) / 60
    curve = siclip_curve(run)
    return {"run": name, "model": cfg.model, "steps": len(curve), "samples_seen": len(curve) * cfg.batch_size,
            "samples_per_s": curve_figures(curve, cfg.batch_size)["samples_per_s"],
            "train_minutes": measured(run).get("wall_minutes"),
            "minutes_this_invocation": {k: round(v, 2) for k, v in minutes.items()}}


def load_config(path: Path, sets: list[str]):
    from siclip.training.config import load_train_config

    return load_train_config(path, sets)


def open_clip_args(data: Path, cfg, seed: int, schedule: Schedule) -> list[str]:
    """open_clip_train's flags for the run siclip's config describes, on the same training shards.

    --train-num-samples is what an epoch of siclip's plan uses (the full batches of each loader worker, from
    the manifest's counts), not every sample: given all 3,000, open_clip_train rounds the batches per worker
    up and wraps around its shards, 24 steps an epoch against siclip's 22. Both take the same steps."""
    from siclip.training.data import plan_epoch

    train, held = split(data, cfg)
    stage = cfg.stages[0]
    per_epoch = plan_epoch(train, seed=seed, epoch=0, rank=0, world=1, workers=cfg.workers,
                           local_batch=cfg.batch_size).steps * cfg.batch_size
    args = ["--model", OPEN_CLIP_MODEL, "--dataset-type", "webdataset",
            "--train-data", "::".join(s.tar for s in train), "--train-num-samples", per_epoch,
            "--val-data", "::".join(s.tar for s in held), "--val-num-samples", sum(s.samples for s in held),
            "--val-frequency", schedule.epochs,  # its own retrieval eval, once, after the last step
            "--batch-size", cfg.batch_size, "--epochs", schedule.epochs, "--lr", stage.lr,
            "--warmup", schedule.warmup, "--lr-scheduler", "cosine", "--wd", cfg.weight_decay,
            "--beta1", cfg.betas[0], "--beta2", cfg.betas[1], "--eps", cfg.eps,
            "--aug-cfg", f"scale=({cfg.crop_scale[0]},{cfg.crop_scale[1]})",
            "--precision", "fp32", "--workers", cfg.workers, "--seed", seed,
            "--log-every-n-steps", 1, "--save-frequency", 0]  # 0: only the last epoch's checkpoint
    if cfg.grad_clip:
        args += ["--grad-clip-norm", cfg.grad_clip]
    if stage.schedule != "cosine" or stage.min_lr or cfg.micro_batch or cfg.synthetic_captions:
        sys.exit(f"bench-peer: {CONFIG} asks for something open_clip_train is not given here (schedule, min_lr, "
                 f"micro_batch or synthetic captions)")
    return [str(a) for a in args]


def open_clip_run(data: Path, cfg, seed: int, schedule: Schedule, retrain: bool = False) -> dict:
    """open_clip_train through bench/open_clip_peer.py; skipped when the same run finished before (unless
    `retrain`)."""
    import open_clip

    args = open_clip_args(data, cfg, seed, schedule)
    model_json = REPO / "bench" / "configs" / "open_clip" / f"{OPEN_CLIP_MODEL}.json"
    name = f"open_clip-e{schedule.epochs}-s{seed}-{digest(*args, model_json, WRAPPER, open_clip.__version__)}"
    logs = data.parent / "open_clip" / data.name
    run = logs / name
    if retrain or not (run / "checkpoints" / f"epoch_{schedule.epochs}.pt").is_file():
        if run.exists():
            shutil.rmtree(run)
        run.mkdir(parents=True)
        log(f"{data.name}: open_clip_train {name} (its output: {run / 'console.txt'})")
        train_measured([sys.executable, WRAPPER, *args, "--logs", logs, "--name", name], run, run / "console.txt")
    return {"tool": "open_clip", "seed": seed, "run": name, "path": str(run),
            "checkpoint": str(run / "checkpoints" / f"epoch_{schedule.epochs}.pt")}


# ----------------------------------------------------------------------------- training logs


def siclip_curve(run: Path) -> list[tuple[int, float, float, float]]:
    """(step, seconds, loss, temperature) of every step, from the run's metrics.jsonl."""
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return [(r["step"], r["seconds"], r["loss"], r["temperature"]) for r in rows if "loss" in r]


OPEN_CLIP_STEP = re.compile(r"^(\S+) \| INFO \| Train Epoch: \d+ .*Logit Scale: (\S+) .* Loss: (\S+) \(")


def open_clip_curve(run: Path) -> list[tuple[int, float, float, float]]:
    """The same from open_clip_train's out.log (logged every step, timestamps to the millisecond)."""
    out = []
    for line in (run / "out.log").read_text().splitlines():
        m = OPEN_CLIP_STEP.match(line)
        if m:
            t = datetime.strptime(m.group(1), "%Y-%m-%d,%H:%M:%S.%f").timestamp()
            out.append((len(out) + 1, t, float(m.group(3)), float(m.group(2))))
    return out


def curve_figures(curve: list, batch: int) -> dict:
    """Loss at 25/50/100% of the steps (mean over the last 5% of steps up to each), the end temperature, and
    samples/s from the first step's end to the last's."""
    steps = len(curve)
    if steps < 2:
        raise SystemExit(f"bench-peer: a training log with {steps} step(s)")
    window = max(1, round(0.05 * steps))
    loss = {}
    for pct in (25, 50, 100):
        end = max(1, round(steps * pct / 100))
        loss[str(pct)] = round(statistics.mean(c[2] for c in curve[max(0, end - window):end]), 4)
    seconds = curve[-1][1] - curve[0][1]
    return {"steps": steps, "loss": loss, "temperature": round(curve[-1][3], 3),
            "samples_per_s": round(batch * (steps - 1) / seconds, 1), "train_seconds": round(seconds, 1)}


# ----------------------------------------------------------------------------- evaluation


def shared_pixels(source, size: int = 64):
    """The shared path's input: a file (or file object) composited onto white, the shortest side resized to
    `size` (bicubic), center-cropped, normalised with OpenAI's mean and std."""
    import numpy as np
    import torch
    from PIL import Image

    from siclip.images import OPENAI_MEAN, OPENAI_STD, decode_image

    img = decode_image(source)  # alpha onto white, as stage 1 did to the training images
    scale = size / min(img.size)
    img = img.resize((max(size, round(img.width * scale)), max(size, round(img.height * scale))),
                     Image.Resampling.BICUBIC)
    left, top = (img.width - size) // 2, (img.height - size) // 2
    x = torch.from_numpy(np.asarray(img.crop((left, top, left + size, top + size)), dtype=np.uint8).copy())
    x = x.permute(2, 0, 1).float().div_(255)
    return (x - torch.tensor(OPENAI_MEAN).view(3, 1, 1)) / torch.tensor(OPENAI_STD).view(3, 1, 1)


@dataclass
class Encoders:
    """A model as the shared path sees it: pixels -> unit image embeddings, token ids -> unit text embeddings."""

    image: object
    text: object


def siclip_encoders(run: Path) -> Encoders:
    from siclip.training.evaluate import load

    model = load(run)[0].eval()
    return Encoders(model.encode_image, model.encode_text)


def load_open_clip(checkpoint: str):
    """(model, preprocess_val, tokenizer) as open_clip loads a checkpoint of its own trainer."""
    import open_clip
    from bench.open_clip_peer import register_models

    register_models()
    model, _, preprocess = open_clip.create_model_and_transforms(OPEN_CLIP_MODEL, pretrained=checkpoint)
    return model.eval(), preprocess, open_clip.get_tokenizer(OPEN_CLIP_MODEL)


def check_finite(emb, what: str):
    import torch

    if not torch.isfinite(emb).all():
        raise SystemExit(f"bench-peer: non-finite {what} embeddings")
    return emb


def topk(logits, labels) -> dict:
    top = logits.topk(min(5, logits.shape[1]), dim=1).indices
    return {"top1": round(float((top[:, 0] == labels).float().mean()), 4),
            "top5": round(float((top == labels[:, None]).any(dim=1).float().mean()), 4)}


def class_names(folder: Path) -> tuple[list[str], list[tuple[Path, int]], list[str]]:
    """(class folder names, [(image, class index)], prompts) of a zero-shot folder, as siclip eval reads it."""
    from siclip.training.evaluate import image_folder, read_templates

    classes, items = image_folder(folder)
    return classes, items, read_templates(None, folder)


def zeroshot_shared(enc: Encoders, folder: Path, tokenizer) -> dict:
    """Each class the unit mean of its prompts' embeddings; each image's top-5 classes by cosine."""
    import torch
    import torch.nn.functional as F

    classes, items, templates = class_names(folder)
    with torch.no_grad():
        weights = []
        for c in classes:
            prompts = tokenizer([t.format(c.replace("_", " ")) for t in templates])
            weights.append(F.normalize(check_finite(enc.text(prompts), "text").mean(dim=0), dim=-1))
        images = [enc.image(torch.stack([shared_pixels(p) for p, _ in items[i:i + 64]]))
                  for i in range(0, len(items), 64)]
    logits = check_finite(torch.cat(images), "image") @ torch.stack(weights).T
    return topk(logits, torch.tensor([c for _, c in items]))


def heldout_pairs(tar: str) -> list[tuple[bytes, str]]:
    """(image bytes, web caption) of every sample of a shard, in order (webdataset's own stages)."""
    import webdataset as wds

    pipe = wds.DataPipeline(wds.SimpleShardList([tar]), wds.tarfile_to_samples())
    return [(s["jpg"], s["txt"].decode("utf-8")) for s in pipe]


def recall(image, text, ks=(1, 5)) -> dict:
    """R@k both ways; a tie with the match counts against it."""
    sim = image @ text.T
    out = {}
    for way, s in (("i2t", sim), ("t2i", sim.T)):
        beaten = (s >= s.diagonal()[:, None]).sum(dim=1) - 1  # others scoring at least the match
        out.update({f"{way}_r{k}": round(float((beaten < k).float().mean()), 4) for k in ks})
    return out


def retrieval_shared(enc: Encoders, pairs, tokenizer) -> dict:
    import io

    import torch

    with torch.no_grad():
        image = torch.cat([enc.image(torch.stack([shared_pixels(io.BytesIO(b)) for b, _ in pairs[i:i + 64]]))
                           for i in range(0, len(pairs), 64)])
        text = torch.cat([enc.text(tokenizer([c for _, c in pairs[i:i + 64]])) for i in range(0, len(pairs), 64)])
    return recall(check_finite(image, "image"), check_finite(text, "text"))


def zeroshot_open_clip_own(model, preprocess, tokenizer, folder: Path) -> dict:
    """open_clip's own path: torchvision's ImageFolder (PIL .convert('RGB')), preprocess_val, its tokenizer and
    zero-shot classifier builder."""
    import torch
    from open_clip import build_zero_shot_classifier
    from torchvision.datasets import ImageFolder

    classes, _, templates = class_names(folder)
    data = ImageFolder(str(folder), transform=preprocess, allow_empty=True)
    if data.classes != classes:
        raise SystemExit(f"bench-peer: ImageFolder and siclip read different classes from {folder}")
    with torch.no_grad():
        weights = build_zero_shot_classifier(model, tokenizer, [c.replace("_", " ") for c in classes], templates)
        logits, labels = [], []
        for x, y in torch.utils.data.DataLoader(data, batch_size=64):
            logits.append(model.encode_image(x, normalize=True) @ weights)
            labels.append(y)
    return topk(torch.cat(logits), torch.cat(labels))


def open_clip_own_retrieval(run: Path) -> dict:
    """open_clip_train's own retrieval on the held-out shard, from the results.jsonl it wrote after the last epoch."""
    last = json.loads((run / "checkpoints" / "results.jsonl").read_text().splitlines()[-1])
    return {f"{way}_r{k}": round(float(last[f"{name}_R@{k}"]), 4)
            for way, name in (("i2t", "image_to_text"), ("t2i", "text_to_image")) for k in (1, 5)}


def siclip_own(data: Path, run: dict, zeroshot: Path) -> dict:
    """`siclip eval` itself: its own decode, preprocess, tokenizer and retrieval on the run's held-out shard."""
    res = subprocess.run([sys.executable, "-m", "siclip.cli", "eval", "--data", str(data), "--run", run["run"],
                          *[a for lv in LEVELS for a in ("--imagefolder", str(zeroshot / lv))], "--retrieval",
                          "--json"], cwd=REPO, stdout=subprocess.PIPE, text=True)
    if res.returncode:
        sys.exit(f"bench-peer: siclip eval of {run['run']} exited {res.returncode}")
    out = json.loads(res.stdout)
    own = {lv: {k: round(out["zeroshot"][lv][k], 4) for k in ("top1", "top5")} for lv in LEVELS}
    own["retrieval"] = {k: round(out["retrieval"][k], 4) for k in ("i2t_r1", "i2t_r5", "t2i_r1", "t2i_r5")}
    return own


def evaluate(data: Path, inputs: Path, run: dict, tokenizer, pairs) -> None:
    """Both paths for one run, added to `run`."""
    zeroshot = inputs / "zeroshot"
    if run["tool"] != "open_clip":
        enc = siclip_encoders(Path(run["path"]))
        run["own"] = siclip_own(data, run, zeroshot)
    else:
        model, preprocess, oc_tokenizer = load_open_clip(run["checkpoint"])
        enc = Encoders(lambda x: model.encode_image(x, normalize=True), lambda t: model.encode_text(t, normalize=True))
        run["own"] = {lv: zeroshot_open_clip_own(model, preprocess, oc_tokenizer, zeroshot / lv) for lv in LEVELS}
        run["own"]["retrieval"] = open_clip_own_retrieval(Path(run["path"]))
    run["shared"] = {lv: zeroshot_shared(enc, zeroshot / lv, tokenizer) for lv in LEVELS}
    run["shared"]["retrieval"] = retrieval_shared(enc, pairs, tokenizer)


def tokenizers_agree(inputs: Path, pairs) -> float:
    """The fraction of the eval's texts (prompts and held-out captions) that open_clip's tokenizer turns into the
    same ids as siclip's: the shared path uses siclip's, each own path its own."""
    import open_clip
    from bench.open_clip_peer import register_models

    from siclip.training.tokenizer import ClipTokenizer

    register_models()
    texts = [c for _, c in pairs]
    for lv in LEVELS:
        classes, _, templates = class_names(inputs / "zeroshot" / lv)
        texts += [t.format(c.replace("_", " ")) for c in classes for t in templates]
    ours, theirs = ClipTokenizer()(texts), open_clip.get_tokenizer(OPEN_CLIP_MODEL)(texts)
    return round(float((ours == theirs).all(dim=1).float().mean()), 4)


# ----------------------------------------------------------------------------- the report


def pick(run: dict, path: tuple):
    for key in path:
        run = run[key]
    return run


def cell(runs: list[dict], path: tuple, pct: bool = True) -> str:
    values = [pick(r, path) * (100 if pct else 1) for r in runs]
    if not values:
        return "-"
    fmt = "{:.1f}" if pct or max(values) >= 10 else "{:.2f}"
    return fmt.format(statistics.mean(values)) + (f" ± {fmt.format(statistics.stdev(values))}"
                                                  if len(values) > 1 else "")


RATIOS = {  # name: (path into a run, whose mean over seeds is divided siclip (or recipe) / open_clip)
    "zeroshot_group_top1": ("shared", "group", "top1"),
    "zeroshot_subgroup_top1": ("shared", "subgroup", "top1"),
    "retrieval_i2t_r1": ("shared", "retrieval", "i2t_r1"),
    "retrieval_t2i_r1": ("shared", "retrieval", "t2i_r1"),
    "samples_per_s": ("samples_per_s",),
}


def seed_figures(runs: list[dict], tool: str) -> dict:
    """{set: {ratio's name: (`tool`'s figure seed by seed, open_clip's)}}, for the sets where both have runs."""
    out = {}
    for set_name in sorted({r["set"] for r in runs}):
        by_tool = [[r for r in runs if r["set"] == set_name and r["tool"] == t] for t in (tool, "open_clip")]
        if all(by_tool):
            out[set_name] = {name: tuple([pick(r, path) for r in rs] for rs in by_tool)
                             for name, path in RATIOS.items()}
    return out


def ratios(runs: list[dict], tool: str = "siclip") -> dict:
    """`tool` over open_clip of the mean over seeds, per set; None where open_clip's mean is 0."""
    return {set_name: {name: round(statistics.mean(a) / statistics.mean(b), 3) if statistics.mean(b) else None
                       for name, (a, b) in figures.items()}
            for set_name, figures in seed_figures(runs, tool).items()}


def ratio_intervals(runs: list[dict], tool: str = "siclip", resamples: int = 10_000) -> dict:
    """For each ratio of `ratios`, a 95% bootstrap interval over seeds: each tool's seeds drawn again with
    replacement, the ratio of the means, its 2.5th and 97.5th percentiles. Seeds are few (3 to 10), so the
    interval is rough and, if anything, too narrow; None where a tool has fewer than 2 seeds."""
    rng, out = random.Random(0), {}
    for set_name, figures in seed_figures(runs, tool).items():
        out[set_name] = {}
        for name, (a, b) in figures.items():
            draws = []
            for _ in range(resamples if min(len(a), len(b)) > 1 else 0):
                den = statistics.fmean(rng.choices(b, k=len(b)))
                if den > 0:
                    draws.append(statistics.fmean(rng.choices(a, k=len(a))) / den)
            draws.sort()
            out[set_name][name] = ([round(draws[int(0.025 * (len(draws) - 1))], 3),
                                    round(draws[int(0.975 * (len(draws) - 1))], 3)] if draws else None)
    return out


def interval_lines(ratio: dict, interval: dict, tool: str) -> str:
    """One line per set: each ratio with its bootstrap interval, for the reader of stderr."""
    lines = []
    for set_name, figures in ratio.items():
        cells = []
        for name, value in figures.items():
            ci = interval.get(set_name, {}).get(name)
            if value is not None:
                cells.append(f"{name} {value}×" + (f" [{ci[0]}, {ci[1]}]" if ci else ""))
        lines.append(f"{tool} / open_clip, {set_name} (95% bootstrap over seeds): " + ", ".join(cells))
    return "\n".join(lines)


def table(runs: list[dict], chance: dict) -> str:
    cols = [("group top-1", ("shared", "group", "top1")), ("own", ("own", "group", "top1")),
            ("subgroup top-1", ("shared", "subgroup", "top1")), ("own", ("own", "subgroup", "top1")),
            ("i2t R@1", ("shared", "retrieval", "i2t_r1")), ("t2i R@1", ("shared", "retrieval", "t2i_r1")),
            ("i2t R@5", ("shared", "retrieval", "i2t_r5")), ("t2i R@5", ("shared", "retrieval", "t2i_r5"))]
    losses = [(f"loss {p}%", ("loss", p)) for p in ("25", "50", "100")]
    lines = ["| set | tool | seeds | " + " | ".join(c for c, _ in cols + losses) + " | samples/s |",
             "|---" * (len(cols) + len(losses) + 4) + "|"]
    for set_name in sorted({r["set"] for r in runs}):
        for tool in TOOLS:
            rs = [r for r in runs if r["set"] == set_name and r["tool"] == tool]
            if rs:
                lines.append(f"| {set_name} | {tool} | {len(rs)} | " + " | ".join(cell(rs, p) for _, p in cols)
                             + " | " + " | ".join(cell(rs, p, False) for _, p in losses)
                             + f" | {cell(rs, ('samples_per_s',), False)} |")
    lines.append(f"| chance | | | {100 * chance['group']:.1f} | | {100 * chance['subgroup']:.1f} | | "
                 f"{100 * chance['r1']:.1f} | {100 * chance['r1']:.1f} | {500 * chance['r1']:.1f} | "
                 f"{500 * chance['r1']:.1f} | | | | |")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- main


def versions() -> dict:
    import open_clip
    import torch

    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True)
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO, capture_output=True,
                           text=True)
    return {"siclip": commit.stdout.strip() + ("+changes" if dirty.stdout.strip() else ""),
            "open_clip": open_clip.__version__, "torch": torch.__version__, "cpus": len(os.sched_getaffinity(0))}


def bench(args) -> dict:
    from siclip.training.config import load_train_config
    from siclip.training.tokenizer import ClipTokenizer

    started = time.monotonic()
    base = load_train_config(CONFIG)
    epochs = args.epochs or (QUICK_EPOCHS if args.quick else int(base.stages[0].epochs))
    warmup = max(1, round(base.stages[0].warmup_steps * epochs / base.stages[0].epochs))
    schedule = Schedule(epochs, warmup)
    seeds = args.seeds if args.seeds is not None else ([0] if args.quick else [0, 1, 2])
    tools = [args.only] if args.only else ["open_clip", "siclip"]
    recipe = args.recipe or args.only == "recipe"
    tools = [t for t in tools if t != "recipe"]  # the recipe's runs follow the pair's, seed by seed
    tokenizer = ClipTokenizer()
    runs, chance, teachers = [], {}, {}
    for set_name in args.sets:
        data, inputs = args.data / set_name, args.inputs / set_name
        prepare(SETS[set_name], data, inputs)
        cfg = load_train_config(CONFIG, schedule.sets(0))
        _, held = split(data, cfg)
        pairs = [p for s in held for p in heldout_pairs(s.tar)]
        agree = tokenizers_agree(inputs, pairs)
        if recipe:
            teachers[set_name] = prepare_recipe(SETS[set_name], data, inputs, schedule)
            log(f"{set_name} teacher: {json.dumps(teachers[set_name])}")
        for seed in seeds:
            # seed by seed, both tools close in time on the same CPU; which goes first alternates, so that a load
            # that rises or falls over the benchmark does not favour one tool's samples/s
            for tool in (tools if seed % 2 == 0 else tools[::-1]) + (["recipe"] if recipe else []):
                run = {"open_clip": open_clip_run, "siclip": siclip_run,
                       "recipe": functools.partial(recipe_run, config=args.recipe_config)}[tool](
                    data, cfg, seed, schedule, args.retrain)
                path = Path(run["path"])
                curve = open_clip_curve(path) if tool == "open_clip" else siclip_curve(path)
                run.update(set=set_name, **curve_figures(curve, cfg.batch_size), **measured(path))
                evaluate(data, inputs, run, tokenizer, pairs)
                run["tokenizers_agree"] = agree
                run.pop("path"), run.pop("checkpoint", None)
                log(f"{set_name} {tool} seed {seed}: {json.dumps(run)}")
                runs.append(run)
        classes = {lv: len(class_names(inputs / "zeroshot" / lv)[0]) for lv in LEVELS}
        chance = {"group": 1 / classes["group"], "subgroup": 1 / classes["subgroup"], "r1": 1 / len(pairs)}
    print(table(runs, chance), file=sys.stderr, flush=True)
    out = {"ratios": ratios(runs), "ratio_ci95": ratio_intervals(runs), "runs": runs,
            "settings": {"epochs": epochs, "warmup_steps": warmup, "seeds": seeds, "batch_size": base.batch_size,
                         "lr": base.stages[0].lr, "weight_decay": base.weight_decay, "workers": base.workers,
                         "open_clip_model": OPEN_CLIP_MODEL, "siclip_config": str(CONFIG.relative_to(REPO)),
                         "versions": versions()},
            "chance": {k: round(v, 4) for k, v in chance.items()},
            "minutes": round((time.monotonic() - started) / 60, 1)}
    if recipe:  # the recipe over open_clip_train, and the teacher's compute, which the recipe's runs leave out
        out.update(recipe_ratios=ratios(runs, "recipe"), recipe_ratio_ci95=ratio_intervals(runs, "recipe"),
                   teachers=teachers)
    print(interval_lines(out["ratios"], out["ratio_ci95"], "siclip"), file=sys.stderr, flush=True)
    if recipe:
        print(interval_lines(out["recipe_ratios"], out["recipe_ratio_ci95"], "recipe"), file=sys.stderr, flush=True)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", default="data/bench-peer", type=Path, help="one siclip data root per set under it")
    p.add_argument("--inputs", default="data/bench-peer-inputs", type=Path, help="the zero-shot folders, per set")
    p.add_argument("--quick", action="store_true", help=f"1 seed, {QUICK_EPOCHS} epochs (warm-up scaled alike)")
    p.add_argument("--epochs", type=int, help="epochs of every run (default: the config's)")
    p.add_argument("--seeds", type=int, nargs="+", help="default 0 1 2 (0 with --quick)")
    p.add_argument("--only", choices=TOOLS, help="run one tool (ratios need open_clip's runs too)")
    p.add_argument("--recipe", action="store_true",
                   help="also the SiCLIP recipe (bench/configs/peer_recipe.toml), after its teacher and captions")
    p.add_argument("--recipe-config", type=Path, default=RECIPE,
                   help="a variant of the recipe's config for an ablation "
                        "(one stage as the recipe's, or two: the new blocks, then all)")
    p.add_argument("--sets", nargs="+", choices=sorted(SETS), default=list(SETS))
    p.add_argument("--retrain", action="store_true",
                   help="train the finished runs again too (samples/s measured anew, e.g. on quiet cores)")
    args = p.parse_args(argv)
    args.data, args.inputs = (REPO / args.data).absolute(), (REPO / args.inputs).absolute()
    args.recipe_config = (REPO / args.recipe_config).absolute()
    print(json.dumps(bench(args)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
