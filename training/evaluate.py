"""Evaluation of a trained model, and loading one for use elsewhere.

- `retrieval`: image <-> text recall@1/5/10 on held-out shards (each image's web caption is its match).
- `zeroshot`: classification of a folder of class sub-folders, class names from the folder names,
  each class embedded as the mean of its prompt templates: top-1, top-5, mean per-class recall. Files are
  decoded by `siclip.images` as stage 1 decoded the shards' images.
- `load(run or checkpoint folder)`: (model, tokenizer, preprocess) for encoding images and texts.
Both evaluations skip and count (`unreadable`) an image that does not decode, and give a progress line per batch
on stderr (retrieval when asked: training's own evaluations keep quiet).
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch

from siclip.images import Preprocess, SkippedImages, image_member, is_image_file
from siclip.manifests.errors import SiclipError
from siclip.manifests.messages import one_line
from siclip.manifests.progress import Progress

TEMPLATES = ["a photo of a {}.", "a picture of a {}.", "an image of a {}.", "a {}.", "a photo of the {}.",
             "a close-up photo of a {}.", "a drawing of a {}."]
PREPROCESS_FILE = "preprocess.json"
TEMPLATES_FILE = "templates.txt"  # an image folder's own prompts, one per line with {}


def load(path: str | Path, device: str = "cpu"):
    """(model, tokenizer, preprocess) of a run (its final model, else its latest checkpoint) or a checkpoint folder.

        model, tokenizer, preprocess = training.load("DATA/runs/tiny")
        images = model.encode_image(torch.stack([preprocess(im) for im in pil_images]))
        texts = model.encode_text(tokenizer(["a red circle", "a blue square"]))
        best = (images @ texts.T).argmax(dim=1)          # the caption each image matches best
    """
    from siclip.training.model import SiCLIP
    from siclip.teachers import find_checkpoint
    from siclip.training.tokenizer import ClipTokenizer

    folder = find_checkpoint(path)
    if folder is None:
        raise SiclipError(f"{path}: not a siclip run (no final/ or checkpoints/step-*/) nor a checkpoint folder")
    model = SiCLIP.from_pretrained(folder, device=device).eval()
    tokenizer = ClipTokenizer(context_length=model.config.text.context_length)
    return model, tokenizer, Preprocess.for_model(folder, model.config.image.image_size)


def to_input(pixels: torch.Tensor, mean, std) -> torch.Tensor:
    """uint8 (B, 3, H, W) from the loader to the model's normalised float input."""
    x = pixels.float().div_(255)
    return (x - torch.tensor(mean, device=x.device).view(1, 3, 1, 1)) / torch.tensor(std, device=x.device).view(1, 3, 1, 1)


@torch.no_grad()
def embed_batches(model, batches, mean, std, device) -> tuple[torch.Tensor, torch.Tensor]:
    """(image embeddings, web-caption embeddings) of every sample of `batches`, on the CPU."""
    images, texts = [], []
    for batch in batches:
        images.append(model.encode_image(to_input(batch["pixels"].to(device), mean, std)).float().cpu())
        texts.append(model.encode_text(batch["text"].to(device)).float().cpu())
    if not images:
        raise SiclipError("nothing to evaluate: the held-out shards have no samples")
    return torch.cat(images), torch.cat(texts)


def recall_at(similarity: torch.Tensor, ks=(1, 5, 10)) -> dict[int, float]:
    """Row i's match is column i: the fraction of rows whose match ranks within the top k.

    A candidate that ties with the match ranks above it (and a NaN beats everything), so collapsed embeddings,
    where every score ties, hit nothing until k covers every candidate."""
    target = similarity.diagonal().unsqueeze(1)
    others = ~torch.eye(*similarity.shape, dtype=torch.bool, device=similarity.device)
    ahead = (similarity >= target) | similarity.isnan() | target.isnan()
    rank = (ahead & others).sum(dim=1)  # the candidates ranked above the match
    return {k: float((rank < k).float().mean()) for k in ks}


def check_finite(embeddings: torch.Tensor, what: str, where: str) -> None:
    """A model that diverged gives NaN or inf embeddings: an error naming where, never a retrieval score."""
    bad = int((~torch.isfinite(embeddings)).any(dim=1).sum())
    if bad:
        raise SiclipError(f"{where}: {bad} of {len(embeddings)} {what} embeddings are not finite (NaN or inf): "
                          f"the model has diverged, so it has no retrieval figures")


def retrieval_metrics(image: torch.Tensor, text: torch.Tensor, where: str = "retrieval") -> dict[str, float]:
    """Recall@1/5/10 image->text and text->image, plus the chance level of R@1; `where` names the model in errors."""
    check_finite(image, "image", where)
    check_finite(text, "text", where)
    sim = image @ text.T
    i2t, t2i = recall_at(sim), recall_at(sim.T)
    out = {f"i2t_r{k}": v for k, v in i2t.items()} | {f"t2i_r{k}": v for k, v in t2i.items()}
    out["samples"] = len(image)
    out["chance_r1"] = 1.0 / len(image)
    return out


def retrieval(model, root, shards, preprocess: Preprocess, context_length: int, device="cpu",
              batch_size: int = 64, where: str = "retrieval", progress: bool = False,
              log=lambda msg: print(msg, file=sys.stderr, flush=True)) -> dict[str, float]:
    """Image <-> text retrieval on `shards` (their samples in order, web captions); `where` names the model in errors
    and messages. A sample whose image does not decode is left out: `unreadable` counts them, and `log` names the
    first. `progress`: a progress line per batch on stderr."""
    from siclip.training.data import SampleSettings

    settings = SampleSettings(seed=0, image_size=preprocess.image_size, context_length=context_length,
                              synthetic_captions=0, train=False)
    skipped = SkippedImages()
    total = sum(s.samples for s in shards)
    bar = Progress("eval: retrieval", total) if progress else None
    was = model.training
    model.eval()
    try:
        batches = readable_batches(root, shards, settings, batch_size, skipped, bar)
        image, text = embed_batches(model, batches, preprocess.mean, preprocess.std, device)
    finally:
        model.train(was)
    if skipped.count:
        log(f"{where}: retrieval {skipped.summary(total)}")
    return retrieval_metrics(image, text, where) | {"unreadable": skipped.count}


def readable_batches(root, shards, settings, batch_size: int, skipped: SkippedImages, progress: Progress | None = None):
    """Evaluation batches of `shards` in order, as `training.data.eval_batches` makes them, less the samples whose
    image does not decode (counted in `skipped`); `progress`, if given, advances per batch."""
    import webdataset as wds

    from siclip.manifests.samples import shard_samples
    from siclip.training.data import SampleMaker, collate, shared_tokenizer

    def decoded(samples):
        for sample in samples:
            ext = image_member(sample)
            if ext is None:  # SampleMaker names the sample that has no image
                yield sample
                continue
            img = skipped.decode(sample[ext], f"{sample.get('__url__')}: sample {sample['__key__']}")
            if img is not None:  # the maker takes the decoded image as it is: one decode per sample
                yield {**sample, ext: img}

    tokenizer = shared_tokenizer()
    pipe = wds.DataPipeline(lambda: iter([s.source() for s in shards]), shard_samples, decoded,
                            wds.map(SampleMaker(settings, 0)),
                            wds.batched(batch_size, collation_fn=lambda xs: collate(xs, settings, tokenizer),
                                        partial=True))
    done = 0
    for batch in pipe:
        yield batch
        done += len(batch["keys"])
        if progress:
            progress.update(done + skipped.count, skipped_note(skipped))
    if progress:
        progress.update(done + skipped.count, skipped_note(skipped), force=True)
        progress.close()
    if not done and skipped.count:
        raise SiclipError(f"nothing to evaluate: none of the {skipped.count} held-out samples has a readable image "
                          f"({skipped.first})")


def image_folder(folder: Path) -> tuple[list[str], list[tuple[Path, int]]]:
    """(class names, [(image path, class index)]) of a folder of class sub-folders."""
    folder = Path(folder)
    if not folder.is_dir():
        raise SiclipError(f"--imagefolder {folder}: not a folder")
    classes = sorted(p.name for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))
    items = [(p, i) for i, c in enumerate(classes) for p in sorted((folder / c).rglob("*"))
             if is_image_file(p)]
    if len(classes) < 2 or not items:
        raise SiclipError(f"--imagefolder {folder}: needs two or more class sub-folders holding images "
                          f"(found {len(classes)} classes, {len(items)} images)")
    return classes, items


def read_templates(path: Path | None, folder: Path | None = None) -> list[str]:
    """The prompts: `path`, else the image folder's own templates.txt, else photo prompts."""
    if path is None and folder is not None and (Path(folder) / TEMPLATES_FILE).is_file():
        path = Path(folder) / TEMPLATES_FILE
    if path is None:
        return TEMPLATES
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise SiclipError(f"templates {path}: no such file") from None
    except OSError as e:
        raise SiclipError(f"templates {path}: cannot read it ({e.strerror or one_line(e)})") from None
    except UnicodeDecodeError as e:
        raise SiclipError(f"templates {path}: not UTF-8 text ({one_line(e)})") from None
    lines = [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.startswith("#")]
    bad = [ln for ln in lines if not fills_one_class(ln)]
    if not lines or bad:
        raise SiclipError(f"templates {path}: one prompt per line, each with {{}} for the class name and no other "
                          f"braces" + (f" (not so: {bad[0]!r})" if bad else " (it has no prompt)"))
    return lines


def fills_one_class(template: str) -> bool:
    """Whether `template.format(name)` puts the class name in (and needs nothing else: no {1}, {field}, stray brace)."""
    try:
        return template.format("\0") != template.format("")
    except (IndexError, KeyError, ValueError):
        return False


@torch.no_grad()
def zeroshot(model, tokenizer, preprocess: Preprocess, folder: Path, templates: list[str], device="cpu",
             batch_size: int = 64, log=lambda msg: print(msg, file=sys.stderr, flush=True)) -> dict[str, float]:
    """Zero-shot classification: top-1, top-5 and mean per-class recall over a folder of class folders, with a
    progress line per batch on stderr. A file that does not decode is left out: `unreadable` counts them, and
    `log` names the first."""
    classes, items = image_folder(folder)
    model.eval()
    context = model.config.text.context_length
    weights = []
    for name in classes:
        readable = name.replace("_", " ")
        emb = model.encode_text(tokenizer([t.format(readable) for t in templates], context).to(device)).float()
        weights.append(torch.nn.functional.normalize(emb.mean(dim=0), dim=-1))
    weights = torch.stack(weights)
    check_finite(weights, "class prompt", f"zero-shot {folder}")
    correct1, correct5, labels = [], [], []
    skipped = SkippedImages()
    progress = Progress(f"eval: zero-shot {folder}", len(items), unit="images")
    for start in range(0, len(items), batch_size):
        inputs, y = [], []
        for path, label in items[start:start + batch_size]:
            img = skipped.decode(path)
            if img is not None:
                inputs.append(preprocess(img))
                y.append(label)
        if inputs:
            images = model.encode_image(torch.stack(inputs).to(device)).float()
            check_finite(images, "image", f"zero-shot {folder}")
            logits = images @ weights.T
            top = logits.topk(min(5, len(classes)), dim=1).indices.cpu()
            y = torch.tensor(y)
            correct1.append(top[:, 0] == y)
            correct5.append((top == y[:, None]).any(dim=1))
            labels.append(y)
        progress.update(min(start + batch_size, len(items)), skipped_note(skipped),
                        force=start + batch_size >= len(items))
    progress.close()
    if skipped.count:
        log(f"eval: zero-shot {folder}: {skipped.summary(len(items))}")
    if not labels:
        raise SiclipError(f"--imagefolder {folder}: none of its {len(items)} images is readable ({skipped.first})")
    c1, c5, y = torch.cat(correct1), torch.cat(correct5), torch.cat(labels)
    per_class = [float(c1[y == i].float().mean()) for i in range(len(classes)) if (y == i).any()]
    return {"top1": float(c1.float().mean()), "top5": float(c5.float().mean()),
            "mean_per_class_recall": float(np.mean(per_class)), "classes": len(classes), "images": len(y),
            "unreadable": skipped.count, "chance_top1": 1.0 / len(classes)}


def skipped_note(skipped: SkippedImages) -> str:
    """The progress line's note of the images skipped so far, '' while there are none."""
    return f"{skipped.count:,} unreadable, skipped" if skipped.count else ""
