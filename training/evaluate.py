"""Evaluation of a trained model or a baseline, and loading a run for use elsewhere.

- `retrieval`: image <-> text recall@1/5/10 on held-out shards (each image's web caption is its match).
- `karpathy_retrieval`: the same on COCO or Flickr30k in Karpathy's split files, several captions per image, as
  the field counts it: text->image, each caption's rank of its image; image->text, an image is found at K when
  any of its captions ranks in the top K.
- `zeroshot`: classification of a folder of class sub-folders, each class named by the folder name or by a
  class-name list (ImageNet's, shipped: `imagenet`), embedded as the mean of its prompt templates (OpenAI's 80
  ImageNet templates shipped: `openai`): top-1, top-5, mean per-class recall. Files are decoded by
  `siclip.images` as stage 1 decoded the shards' images.
- `load(run or checkpoint folder)`: (model, tokenizer, preprocess) for encoding images and texts.
The figures carry CLIP_benchmark's keys too (`acc1`, `acc5`, `mean_per_class_recall`;
`image_retrieval_recall@K`, text->image, and `text_retrieval_recall@K`, image->text). A model is evaluated
through an encoder (`ModelEncoder` for a siclip model, `TeacherEncoder` for a transformers or open_clip
baseline), so a baseline goes through the same code and prompts. The evaluations skip and count
(`unreadable`) an image that does not decode, and give a progress line per batch on stderr (when asked:
training's own evaluations keep quiet).
"""

from __future__ import annotations

import json
import re
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from siclip.images import Preprocess, SkippedImages, image_member, is_image_file
from siclip.manifests.errors import SiclipError
from siclip.manifests.messages import one_line
from siclip.manifests.progress import Progress

TEMPLATES = ["a photo of a {}.", "a picture of a {}.", "an image of a {}.", "a {}.", "a photo of the {}.",
             "a close-up photo of a {}.", "a drawing of a {}."]
PREPROCESS_FILE = "preprocess.json"
TEMPLATES_FILE = "templates.txt"  # an image folder's own prompts, one per line with {}
ASSETS = Path(__file__).parent / "assets"
# the lists shipped in training/assets (LICENSE-imagenet-lists.txt says where they come from), by name
TEMPLATE_SETS = {"openai": "openai_imagenet_templates.txt", "simple": "openai_simple_templates.txt"}
CLASSNAME_SETS = {"imagenet": ("imagenet_synsets.txt", "imagenet_classnames.txt")}  # keys, names: line by line
WORDNET_LINE = re.compile(r"^(n\d{8})\s+(\S.*)$")  # 'n01440764 tench, Tinca tinca' (ImageNet's LOC_synset_mapping.txt)
KS = (1, 5, 10)


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


class ModelEncoder:
    """A siclip model as the evaluations use it: PIL images and texts in, float embeddings on the CPU out. The model
    encodes in eval mode and goes back to the mode it was in (training evaluates the model it trains)."""

    def __init__(self, model, tokenizer, preprocess: Preprocess, device="cpu", name: str = "siclip"):
        self.model, self.tokenizer, self.preprocess, self.device, self.name = model, tokenizer, preprocess, device, name
        self.context = model.config.text.context_length

    @torch.no_grad()
    def _encode(self, encode, x: torch.Tensor) -> torch.Tensor:
        was = self.model.training
        self.model.eval()
        try:
            return encode(x.to(self.device)).float().cpu()
        finally:
            self.model.train(was)

    def images(self, images: list) -> torch.Tensor:
        return self._encode(self.model.encode_image, torch.stack([self.preprocess(im) for im in images]))

    def texts(self, texts: list[str]) -> torch.Tensor:
        return self._encode(self.model.encode_text, self.tokenizer(texts, self.context))


class TeacherEncoder:
    """A baseline (a `siclip.teachers.Teacher`: transformers or open_clip) as the evaluations use it, through its
    own image preprocessing and tokenizer."""

    def __init__(self, teacher):
        self.teacher, self.name = teacher, teacher.name

    @torch.no_grad()
    def images(self, images: list) -> torch.Tensor:
        return self.teacher.image_features(self.teacher.preprocess(images)).float().cpu()

    @torch.no_grad()
    def texts(self, texts: list[str]) -> torch.Tensor:
        return self.teacher.text_features(texts).float().cpu()


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


def match_ranks(similarity: torch.Tensor, positive: torch.Tensor) -> torch.Tensor:
    """For each row (a query), the candidates that are not its match and rank at or above its best match.

    A candidate that ties with the match ranks above it (and a NaN beats everything), so collapsed embeddings,
    where every score ties, hit nothing until k covers every candidate."""
    best = similarity.masked_fill(~positive, float("-inf")).amax(dim=1, keepdim=True)  # a NaN match stays NaN
    ahead = (similarity >= best) | similarity.isnan() | best.isnan()
    return (ahead & ~positive).sum(dim=1)


def recall_at(similarity: torch.Tensor, ks=KS) -> dict[int, float]:
    """Row i's match is column i: the fraction of rows whose match ranks within the top k."""
    rank = match_ranks(similarity, torch.eye(*similarity.shape, dtype=torch.bool, device=similarity.device))
    return {k: float((rank < k).float().mean()) for k in ks}


def check_finite(embeddings: torch.Tensor, what: str, where: str) -> None:
    """A model that diverged gives NaN or inf embeddings: an error naming where, never a retrieval score."""
    bad = int((~torch.isfinite(embeddings)).any(dim=1).sum())
    if bad:
        raise SiclipError(f"{where}: {bad} of {len(embeddings)} {what} embeddings are not finite (NaN or inf): "
                          f"the model has diverged, so it has no retrieval figures")


def _ranks(queries: torch.Tensor, candidates: torch.Tensor, positive_of, chunk: int = 1024) -> torch.Tensor:
    """match_ranks of every query, a chunk of rows at a time (COCO's 25,000 captions by 5,000 images would be a
    half-gigabyte similarity matrix); `positive_of(rows)` gives those rows' match mask."""
    ranks = [match_ranks(queries[i:i + chunk] @ candidates.T, positive_of(torch.arange(i, min(i + chunk, len(queries)))))
             for i in range(0, len(queries), chunk)]
    return torch.cat(ranks)


def retrieval_metrics(image: torch.Tensor, text: torch.Tensor, where: str = "retrieval",
                      owner: torch.Tensor | None = None, ks=KS) -> dict[str, float]:
    """Recall@1/5/10 image->text and text->image, plus the chance level of R@1; `where` names the model in errors.
    `owner[j]` is the image of text j (default: text i is image i's). Text->image ranks each text's image;
    image->text finds an image at K when any of its texts is in the top K. The same figures are given again
    under CLIP_benchmark's keys: `image_retrieval_recall@K` (text->image), `text_retrieval_recall@K` (image->text)."""
    check_finite(image, "image", where)
    check_finite(text, "text", where)
    image, text = F.normalize(image, dim=-1), F.normalize(text, dim=-1)  # a baseline's features are not
    given = owner is not None
    owner = torch.arange(len(image)) if owner is None else owner
    columns = torch.arange(len(image))
    t2i = _ranks(text, image, lambda rows: owner[rows, None] == columns[None, :])
    i2t = _ranks(image, text, lambda rows: rows[:, None] == owner[None, :])
    out = {f"i2t_r{k}": float((i2t < k).float().mean()) for k in ks}
    out |= {f"t2i_r{k}": float((t2i < k).float().mean()) for k in ks}
    out |= {f"image_retrieval_recall@{k}": out[f"t2i_r{k}"] for k in ks}
    out |= {f"text_retrieval_recall@{k}": out[f"i2t_r{k}"] for k in ks}
    out["samples"] = len(image)
    if given:
        out["captions"] = len(text)
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
    """Evaluation batches of `shards` in order (`training.data.eval_batches`), less the samples whose
    image does not decode (counted in `skipped`); `progress`, if given, advances per batch."""
    from siclip.training.data import eval_batches

    def decoded(samples):
        for sample in samples:
            ext = image_member(sample)
            if ext is None:  # SampleMaker names the sample that has no image
                yield sample
                continue
            img = skipped.decode(sample[ext], f"{sample.get('__url__')}: sample {sample['__key__']}")
            if img is not None:  # the maker takes the decoded image as it is: one decode per sample
                yield {**sample, ext: img}

    done = 0
    for batch in eval_batches(root, shards, settings, batch_size, decoded):
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


def image_folder(folder: Path, what: str = "--imagefolder") -> tuple[list[str], list[tuple[Path, int]]]:
    """(class folder names, sorted, [(image path, class index)]) of a folder of class sub-folders; `what` names
    where the folder was given in errors."""
    folder = Path(folder)
    if not folder.is_dir():
        raise SiclipError(f"{what} {folder}: not a folder")
    classes = sorted(p.name for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))
    items = [(p, i) for i, c in enumerate(classes) for p in sorted((folder / c).rglob("*"))
             if is_image_file(p)]
    if len(classes) < 2 or not items:
        raise SiclipError(f"{what} {folder}: needs two or more class sub-folders holding images "
                          f"(found {len(classes)} classes, {len(items)} images)")
    return classes, items


def _shipped(spec, sets: dict) -> str | None:
    """The shipped set `spec` names (a file of that name wins), else None."""
    return str(spec) if spec is not None and str(spec) in sets and not Path(spec).exists() else None


def _read_text(path, what: str, missing: str = "no such file") -> str:
    try:
        return Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise SiclipError(f"{what} {path}: {missing}") from None
    except OSError as e:
        raise SiclipError(f"{what} {path}: cannot read it ({e.strerror or one_line(e)})") from None
    except UnicodeDecodeError as e:
        raise SiclipError(f"{what} {path}: not UTF-8 text ({one_line(e)})") from None


def read_templates(path: str | Path | None, folder: Path | None = None) -> list[str]:
    """The prompts: `path` (a file, one per line with {} or {c} for the class name, or a shipped set: openai,
    simple), else the image folder's own templates.txt, else photo prompts."""
    if path is None and folder is not None and (Path(folder) / TEMPLATES_FILE).is_file():
        path = Path(folder) / TEMPLATES_FILE
    if path is None:
        return TEMPLATES
    name = _shipped(path, TEMPLATE_SETS)
    text = _read_text(ASSETS / TEMPLATE_SETS[name] if name else path, "templates",
                      f"no such file, nor a shipped set ({', '.join(TEMPLATE_SETS)})")
    # CLIP_benchmark writes the class as {c}: its template sets serve as they are
    lines = [ln.strip().replace("{c}", "{}") for ln in text.splitlines() if ln.strip() and not ln.startswith("#")]
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


def read_classnames(spec: str | Path) -> list[str] | dict[str, str]:
    """A class-name file, or a shipped set (imagenet: WordNet id -> name): a list of names (one per line, or a JSON
    list) or a mapping from class folder name to class name (`FOLDER<TAB>NAME` lines, `n01440764 NAME` lines as
    ImageNet's LOC_synset_mapping.txt has them, or a JSON object)."""
    name = _shipped(spec, CLASSNAME_SETS)
    if name:
        keys, names = (_read_text(ASSETS / f, "classnames").splitlines() for f in CLASSNAME_SETS[name])
        return dict(zip(keys, names))
    text = _read_text(spec, "classnames", f"no such file, nor a shipped set ({', '.join(CLASSNAME_SETS)})")
    if Path(spec).suffix == ".json" or text.lstrip()[:1] in ("{", "["):
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise SiclipError(f"classnames {spec}: not valid JSON ({e})") from None
        if isinstance(data, dict) and all(isinstance(v, str) for v in data.values()):
            return data
        if isinstance(data, list) and all(isinstance(v, str) for v in data):
            return data
        raise SiclipError(f"classnames {spec}: JSON must map class folder names to class names, or list the names")
    lines = [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.startswith("#")]
    if not lines:
        raise SiclipError(f"classnames {spec}: it has no class name")
    pairs = [ln.split("\t", 1) if "\t" in ln else m.groups() if (m := WORDNET_LINE.match(ln)) else None
             for ln in lines]
    if all(p is None for p in pairs):
        return lines
    odd = next((i for i, p in enumerate(pairs) if p is None or not p[1].strip()), None)
    if odd is not None:
        raise SiclipError(f"classnames {spec}: line {odd + 1} ({lines[odd]!r}) is not FOLDER<TAB>NAME as the others are")
    return {k.strip(): v.strip() for k, v in pairs}


def class_names(spec: str | Path | None, folders: list[str], where) -> list[str]:
    """The name in prompts of each class folder (sorted): from `spec` (read_classnames), else the folder's name
    with `_` read as a space; `where` names the image folder in errors."""
    if spec is None:
        return [name.replace("_", " ") for name in folders]
    names = read_classnames(spec)
    if isinstance(names, dict):
        missing = [f for f in folders if f not in names]
        if missing:
            example = next(iter(names))
            raise SiclipError(f"classnames {spec}: no name for class folder {missing[0]!r} of {where}"
                              + (f" (nor for {len(missing) - 1} more)" if len(missing) > 1 else "")
                              + f"; it maps folder names such as {example!r}")
        return [names[f] for f in folders]
    if len(names) != len(folders):
        raise SiclipError(f"classnames {spec}: {len(names)} names for the {len(folders)} class folders of {where} "
                          f"(a list names the folders in sorted order, one line each)")
    return names


@dataclass
class ZeroShotSet:
    """A folder of class sub-folders made ready to evaluate: its images, each class's name, the prompts."""

    folder: Path
    names: list[str]  # the name in prompts of each class, in the order of the sorted class folders
    items: list[tuple[Path, int]]  # (image path, class index)
    templates: list[str]


def zeroshot_set(folder, classnames=None, templates=None, what: str = "--imagefolder") -> ZeroShotSet:
    """Read a zero-shot folder, its class names (`classnames`: see class_names) and prompts (`templates`: a list,
    or see read_templates), before any model loads; a SiclipError naming what is wrong."""
    prompts = list(templates) if isinstance(templates, (list, tuple)) else read_templates(templates, folder)
    classes, items = image_folder(folder, what)
    return ZeroShotSet(Path(folder), class_names(classnames, classes, folder), items, prompts)


def folder_names(folders) -> list[str]:
    """Each folder's name, or its whole path where two share a name."""
    names = [Path(f).name for f in folders]
    return [n if names.count(n) == 1 else str(f) for n, f in zip(names, folders)]


def zeroshot_results(encoder, sets: list[ZeroShotSet], progress: bool = True, log=None) -> dict:
    """zeroshot on each set, shaped as `siclip eval --json` gives it and the plots read it: one folder's metrics
    alone, several keyed by folder name."""
    kw = {"log": log} if log else {}
    names = folder_names([s.folder for s in sets])
    per_folder = {name: zeroshot(encoder, s, progress=progress, **kw) for name, s in zip(names, sets)}
    return per_folder[names[0]] if len(names) == 1 else per_folder


@torch.no_grad()
def class_embeddings(encoder, names: list[str], templates: list[str], where: str, progress: bool = True):
    """Each class's embedding as CLIP makes it: its prompts embedded, normalised, averaged and normalised again."""
    bar = Progress(f"eval: {where} prompts", len(names), unit="classes") if progress else None
    weights = []
    for i, name in enumerate(names):
        emb = F.normalize(encoder.texts([t.format(name) for t in templates]), dim=-1)
        weights.append(F.normalize(emb.mean(dim=0), dim=-1))
        if bar:
            bar.update(i + 1)
    if bar and bar.last > bar.start:  # a quick one printed nothing, and leaves nothing
        bar.update(len(names), force=True)
        bar.close()
    weights = torch.stack(weights)
    check_finite(weights, "class prompt", where)
    return weights


def image_batches(paths: list[Path], batch_size: int, skipped: SkippedImages, where: str, label: str,
                  progress: bool, log):
    """The images at `paths`, decoded, as (their indices, PIL images) a batch at a time, with a progress line
    (`eval: LABEL`) per batch when `progress`. A file that does not decode is left out and counted in `skipped`,
    and `log` names the first at the end; a SiclipError naming `where` when none decodes."""
    bar = Progress(f"eval: {label}", len(paths), unit="images") if progress else None
    readable = 0
    for start in range(0, len(paths), batch_size):
        batch = [(i, img) for i in range(start, min(start + batch_size, len(paths)))
                 if (img := skipped.decode(paths[i])) is not None]
        if batch:
            readable += len(batch)
            yield [i for i, _ in batch], [img for _, img in batch]
        if bar:
            bar.update(min(start + batch_size, len(paths)), skipped_note(skipped), force=start + batch_size >= len(paths))
    if bar:
        bar.close()
    if skipped.count:
        log(f"eval: {where}: {skipped.summary(len(paths))}")
    if not readable:
        raise SiclipError(f"{where}: none of its {len(paths)} images is readable ({skipped.first})")


@torch.no_grad()
def zeroshot(encoder, task: ZeroShotSet, batch_size: int = 64, progress: bool = True,
             log=lambda msg: print(msg, file=sys.stderr, flush=True)) -> dict[str, float]:
    """Zero-shot classification of a ZeroShotSet by an encoder: top-1, top-5 and mean per-class recall (also under
    CLIP_benchmark's keys acc1, acc5), with a progress line per batch on stderr when `progress`. A file that does
    not decode is left out: `unreadable` counts them, and `log` names the first."""
    items, n = task.items, len(task.names)
    where = f"zero-shot {task.folder}"
    weights = class_embeddings(encoder, task.names, task.templates, where, progress)
    correct1, correct5, labels = [], [], []
    skipped = SkippedImages()
    for index, images in image_batches([p for p, _ in items], batch_size, skipped, where, where, progress, log):
        emb = encoder.images(images)
        check_finite(emb, "image", where)
        top = (emb @ weights.T).topk(min(5, n), dim=1).indices
        y = torch.tensor([items[i][1] for i in index])
        correct1.append(top[:, 0] == y)
        correct5.append((top == y[:, None]).any(dim=1))
        labels.append(y)
    c1, c5, y = torch.cat(correct1), torch.cat(correct5), torch.cat(labels)
    per_class = [float(c1[y == i].float().mean()) for i in range(n) if (y == i).any()]
    top1, top5 = float(c1.float().mean()), float(c5.float().mean())
    return {"top1": top1, "top5": top5, "mean_per_class_recall": float(np.mean(per_class)), "classes": n,
            "images": len(y), "unreadable": skipped.count, "chance_top1": 1.0 / n, "acc1": top1, "acc5": top5}


# ----------------------------------------------------------------------------- Karpathy's split files


@dataclass
class CaptionSet:
    """COCO or Flickr30k as Karpathy's split file gives it: each image's path and its captions."""

    source: Path
    dataset: str  # the file's own name for it (coco, flickr30k, flickr8k), else the file's stem
    split: str
    images: list[Path]
    captions: list[list[str]]


def karpathy_set(path, images_dir, split: str = "test", per_image: int = 5) -> CaptionSet:
    """Read a Karpathy split file (dataset_coco.json, dataset_flickr30k.json: `images` with `split`, `filename`,
    optional `filepath`, `sentences[].raw`): the images of `split` under `images_dir` (at FILEPATH/FILENAME, else
    at FILENAME) and each one's first `per_image` captions (0: all). Every image must be there: a SiclipError
    names the first that is not, before any model loads."""
    path, images_dir = Path(path), Path(images_dir)
    what = f"--retrieval-json {path}"
    try:
        data = json.loads(_read_text(path, "--retrieval-json"))
    except json.JSONDecodeError as e:
        raise SiclipError(f"{what}: not valid JSON ({e})") from None
    entries = data.get("images") if isinstance(data, dict) else None
    if not isinstance(entries, list):
        raise SiclipError(f"{what}: no 'images' list (Karpathy's split files, dataset_coco.json, have one)")
    if not images_dir.is_dir():
        raise SiclipError(f"--images {images_dir}: not a folder")
    images, captions, missing = [], [], []
    for i, entry in enumerate(entries):
        if not (isinstance(entry, dict) and "split" in entry and "filename" in entry and "sentences" in entry):
            raise SiclipError(f"{what}: image {i} has no 'split', 'filename' or 'sentences' "
                              f"(it is {json.dumps(entry)[:80]})")
        if entry["split"] != split:
            continue
        texts = [str(s.get("raw") or "").strip() for s in entry["sentences"] if isinstance(s, dict)]
        texts = [t for t in texts if t][:per_image or None]
        if not texts:
            raise SiclipError(f"{what}: image {i} ({entry['filename']}) has no caption (sentences[].raw)")
        nested = images_dir / entry.get("filepath", "") / entry["filename"]
        file = nested if nested.is_file() else images_dir / entry["filename"]
        if not file.is_file():
            missing.append(nested)
        images.append(file)
        captions.append(texts)
    if not images:
        splits = sorted({str(e.get("split")) for e in entries if isinstance(e, dict)})
        raise SiclipError(f"{what}: no image of split {split!r} (its splits: {', '.join(splits) or 'none'})")
    if missing:
        raise SiclipError(f"--images {images_dir}: {len(missing)} of the {len(images)} {split} images of {path.name} "
                          f"are not there (the first: {missing[0]}, nor directly under --images)")
    name = data.get("dataset") if isinstance(data.get("dataset"), str) else path.stem
    return CaptionSet(path, name, split, images, captions)


@torch.no_grad()
def karpathy_retrieval(encoder, captions: CaptionSet, batch_size: int = 64, progress: bool = True,
                       log=lambda msg: print(msg, file=sys.stderr, flush=True)) -> dict:
    """Image <-> text retrieval on a CaptionSet, several captions per image (retrieval_metrics' `owner`). An image
    that does not decode is left out with its captions: `unreadable` counts them, and `log` names the first."""
    where = f"retrieval {captions.source.name} ({captions.split})"
    skipped = SkippedImages()
    image_emb, texts, owner, kept = [], [], [], 0
    for index, images in image_batches(captions.images, batch_size, skipped, where, f"{where} images", progress, log):
        image_emb.append(encoder.images(images))
        for i in index:  # owner: each caption's image, counted among the images embedded
            owner += [kept] * len(captions.captions[i])
            texts += captions.captions[i]
            kept += 1
    bar = Progress(f"eval: {where} captions", len(texts), unit="captions") if progress else None
    text_emb = []
    for start in range(0, len(texts), batch_size):
        text_emb.append(encoder.texts(texts[start:start + batch_size]))
        if bar:
            bar.update(min(start + batch_size, len(texts)), force=start + batch_size >= len(texts))
    if bar:
        bar.close()
    metrics = retrieval_metrics(torch.cat(image_emb), torch.cat(text_emb), where, torch.tensor(owner))
    return {"dataset": captions.dataset, "split": captions.split, **metrics, "unreadable": skipped.count}


# ----------------------------------------------------------------------------- baselines on held-out shards


@torch.no_grad()
def shard_retrieval(encoder, shards, batch_size: int = 64, where: str = "retrieval", progress: bool = False,
                    log=lambda msg: print(msg, file=sys.stderr, flush=True)) -> dict[str, float]:
    """`retrieval` for any encoder (a baseline): each sample's image, decoded as stage 1 decoded it, through the
    encoder's own preprocessing, against its web caption; unreadable images skipped and counted."""
    from siclip.manifests.samples import shard_samples

    skipped = SkippedImages()
    total = sum(s.samples for s in shards)
    bar = Progress("eval: retrieval", total) if progress else None
    image_emb, text_emb, done, batch = [], [], 0, []

    def flush():
        image_emb.append(encoder.images([img for img, _ in batch]))
        text_emb.append(encoder.texts([text for _, text in batch]))
        batch.clear()

    for sample in shard_samples([s.source() for s in shards]):
        name = f"{sample.get('__url__')}: sample {sample['__key__']}"
        ext = image_member(sample)
        if ext is None:
            raise SiclipError(f"{name} has no image member")
        img = skipped.decode(sample[ext], name)
        if img is not None:
            batch.append((img, sample.get("txt", b"").decode("utf-8", errors="replace")))
            done += 1
        if len(batch) == batch_size:
            flush()
        if bar:
            bar.update(done + skipped.count, skipped_note(skipped))
    if batch:
        flush()
    if bar:
        bar.update(done + skipped.count, skipped_note(skipped), force=True)
        bar.close()
    if skipped.count:
        log(f"{where}: retrieval {skipped.summary(total)}")
    if not image_emb:
        raise SiclipError("nothing to evaluate: no held-out sample has a readable image"
                          + (f" ({skipped.first})" if skipped.first else ""))
    return retrieval_metrics(torch.cat(image_emb), torch.cat(text_emb), where) | {"unreadable": skipped.count}


def skipped_note(skipped: SkippedImages) -> str:
    """The progress line's note of the images skipped so far, '' while there are none."""
    return f"{skipped.count:,} unreadable, skipped" if skipped.count else ""
