"""Every CLIP teacher, named one way and loaded one way: `siclip teacher --teacher`, a training stage's
`teacher` and `inherit_from` all read a name through `parse_teacher`, and the transformers and open_clip
teachers load through `load_teacher` into one interface (`Teacher`).

A name is one of
    none, sidecar               (training stages) no teacher; the embeddings `siclip teacher` stored
    open_clip:ARCH/PRETRAINED   open_clip's own names (extra siclip[mobileclip]): PRETRAINED is a tag whose
                                weights open_clip downloads (MobileCLIP2-S0/dfndr2b) or a weights file on disk
    open_clip:FOLDER            a folder laid out as open_clip's hub repositories are: open_clip_config.json
                                (model_cfg, preprocess_cfg) beside open_clip_model.safetensors; the config carries
                                the image statistics, which a bare weights file does not
    open_clip:hf-hub:ORG/REPO   such a repository on the hub
    timm:NAME                   a timm image tower (inheritance only: MobileCLIP-S0's fastvit_mci0)
    tiny                        a tiny random CLIP built in memory (tests and smoke runs of stage 2)
    a siclip run or checkpoint  a run's final model, else its latest checkpoint
    a transformers model        a local folder or a hub name with image and text features (CLIPModel, …)
    hf:FOLDER, hf:ORG/NAME      the same, said explicitly: a name that is not a transformers model is refused
A path may be given relative to the data root (`runs/teacher/clip`). A name that gives no weights is
refused: open_clip would build random weights without a word. A name that is not there is a hub name only
when it reads as one (NAME or ORG/NAME): a near miss of a kind (`sidcar`) or a path (`./runs/x`, `/a/b`,
`data/runs/x`) is refused by name, before the hub is asked.
"""

from __future__ import annotations

import difflib
import json
import re
from dataclasses import dataclass
from pathlib import Path

from siclip.manifests.errors import SiclipError
from siclip.images import OPENAI_MEAN, OPENAI_STD
from siclip.manifests.messages import first_line

KEYWORDS = ("none", "sidecar")
PREFIX = "open_clip:"
TIMM = "timm:"
HF = "hf:"
TINY = "tiny"
WORDS, PREFIXES = (*KEYWORDS, TINY), (PREFIX, TIMM, HF)  # the kinds a name is checked against for a near miss
KIND = re.compile(r"^[A-Za-z][\w.-]*:")  # `kind:` at the start of a name (a path's colon comes after a / or .)
# a siclip model folder and a run's layout: config.json says format "siclip"; a run keeps final/ and checkpoints/
MODEL_CONFIG = "config.json"
FINAL = "final"
STATE = "state.json"
CHECKPOINT = re.compile(r"^step-(\d{6,})$")
CONFIG_NAME = "open_clip_config.json"  # open_clip's hub layout
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pth", ".pt")
EXTRA_HINT = "pip install 'siclip[mobileclip]'"


def open_clip_source(spec: str) -> tuple[str, str | None]:
    """open_clip's (model_name, pretrained) for `open_clip:…`; a SiclipError when it names no weights."""
    rest = spec[len(PREFIX):] if spec.startswith(PREFIX) else spec
    if rest.startswith("hf-hub:"):
        return rest, None
    folder = Path(rest).expanduser()
    if folder.is_dir():
        if not (folder / CONFIG_NAME).is_file():
            raise SiclipError(f"{spec!r}: {folder} has no {CONFIG_NAME} (open_clip's hub layout: the config beside "
                              f"open_clip_model.safetensors)")
        if not any(p.suffix in WEIGHT_SUFFIXES for p in folder.iterdir()):
            raise SiclipError(f"{spec!r}: {folder} holds no weights file (open_clip_model.safetensors)")
        return f"local-dir:{folder.absolute()}", None
    name, _, pretrained = rest.partition("/")
    if not name or not pretrained:
        raise SiclipError(f"{spec!r} names no weights: use open_clip:ARCH/TAG (a pretrained tag or a weights file) "
                          f"or open_clip:FOLDER (open_clip's hub layout)")
    return name, pretrained


def open_clip_embed_dim(spec: str) -> int | None:
    """The embedding width from the model's config alone (no weights read), or None when it cannot be read."""
    try:
        name, _ = open_clip_source(spec)
        if name.startswith("local-dir:"):
            return int(json.loads((Path(name[len("local-dir:"):]) / CONFIG_NAME).read_text())["model_cfg"]["embed_dim"])
        import open_clip

        return int(open_clip.get_model_config(name)["embed_dim"])
    except Exception:  # the model load proper reports why, with the whole context
        return None


def load_open_clip(spec: str, what: str = "model"):
    """(model in eval mode, its image preprocessing, its tokenizer) for an `open_clip:` name; `what` names it in errors."""
    name, pretrained = open_clip_source(spec)
    try:
        import open_clip
    except ImportError:
        raise SiclipError(f"{what} {spec!r} needs open_clip: {EXTRA_HINT}") from None
    try:
        model, _, preprocess = open_clip.create_model_and_transforms(name, pretrained=pretrained)
        tokenizer = open_clip.get_tokenizer(name)
    except Exception as e:  # open_clip raises RuntimeError, ValueError, FileNotFoundError … for a bad name or file
        raise SiclipError(f"{what} {spec!r} does not load through open_clip: {first_line(e)}") from None
    return model.eval(), preprocess, tokenizer


# ----------------------------------------------------------------------------- names


@dataclass(frozen=True)
class TeacherSpec:
    """A teacher's name, read: its kind, and what loads (an absolute path where the name is one)."""

    kind: str  # none | sidecar | open_clip | timm | tiny | siclip | transformers
    source: str
    given: str  # as the user wrote it, for messages


def in_data_root(spec: str, root) -> str:
    """A path given relative to the data root (`runs/teacher/clip`) made absolute; other names unchanged."""
    if root is not None and spec and ":" not in spec and not Path(spec).expanduser().exists() \
            and (root.root / spec).exists():
        return str(root.root / spec)
    return spec


def is_siclip_checkpoint(directory: str | Path) -> bool:
    path = Path(directory) / MODEL_CONFIG
    return path.is_file() and json.loads(path.read_text()).get("format") == "siclip"


def find_checkpoint(path: str | Path) -> Path | None:
    """The model folder a path names: a checkpoint or model folder itself, or a run's final model, or its
    latest checkpoint; None when the path is no siclip run or checkpoint."""
    path = Path(path).expanduser()
    if not path.is_dir():
        return None
    if is_siclip_checkpoint(path):
        return path
    if is_siclip_checkpoint(path / FINAL):
        return path / FINAL
    folder = path / "checkpoints"
    steps = sorted((int(m.group(1)), p) for p in folder.glob("step-*") if (m := CHECKPOINT.match(p.name))
                   and (p / STATE).is_file()) if folder.is_dir() else []
    return steps[-1][1] if steps else None


def near_miss(spec: str) -> str | None:
    """The kind `spec` seems to misspell ('sidcar' -> 'sidecar', 'open-clip:ViT-B-32/openai' ->
    'open_clip:ViT-B-32/openai'), else None."""
    kind = KIND.match(spec)
    if spec in WORDS or (kind and kind.group(0) in PREFIXES):
        return None
    if kind and kind.group(0) == "hf-hub:":
        return PREFIX + spec  # open_clip's own hub names
    if kind:
        close = difflib.get_close_matches(kind.group(0), PREFIXES, n=1)
        return close[0] + spec[kind.end():] if close else None
    close = difflib.get_close_matches(spec, WORDS, n=1) if "/" not in spec else []
    return close[0] if close else None


def reads_as_path(spec: str, root=None) -> bool:
    """Whether a name reads as a path rather than a hub name (NAME or ORG/NAME): it starts with /, ./, ../ or ~,
    has more than one /, or the folder it would sit in exists (here or in the data root)."""
    if spec.startswith(("/", "./", "../", "~")) or spec in (".", "..") or spec.count("/") > 1 or spec.endswith("/"):
        return True
    if "/" not in spec:
        return False
    parent = spec.split("/")[0]
    return Path(parent).is_dir() or (root is not None and (root.root / parent).is_dir())


def check_spelling(spec: str, what: str = "teacher") -> None:
    """A SiclipError when `spec` is no path here and seems to misspell a kind (did you mean …?): a config
    checks its teacher names with it before anything loads."""
    close = near_miss(spec) if not Path(spec).expanduser().exists() else None
    if close is not None:
        raise SiclipError(f"{what} {spec!r} is not a teacher name (did you mean {close!r}?)")


def _refuse_missing(spec: str, root, what: str) -> None:
    """A SiclipError for a name that is not there and is no hub name: a near miss of a kind, an unknown
    `kind:`, or a path."""
    check_spelling(spec, what)
    kind = KIND.match(spec)
    if kind:
        raise SiclipError(f"{what} {spec!r}: no teacher kind {kind.group(0)!r} (the kinds: {', '.join(PREFIXES)}; "
                          f"a hub name has no colon)")
    if reads_as_path(spec, root):
        looked = str(Path(spec).expanduser().absolute())
        if root is not None and not Path(spec).expanduser().is_absolute():
            looked += f" nor {root.root / spec}"
        raise SiclipError(f"{what} {spec!r}: no such folder: {looked}")


def parse_teacher(spec: str, root=None, what: str = "teacher") -> TeacherSpec:
    """What a teacher name means (module docstring); a SiclipError for a name that cannot be one. `what` names
    where the name came from (a config key or option) in messages."""
    given = spec
    if spec in KEYWORDS:
        return TeacherSpec(spec, spec, given)
    if spec == TINY:
        return TeacherSpec("tiny", spec, given)
    if spec.startswith(PREFIX):
        open_clip_source(spec)  # a name without weights is refused now
        return TeacherSpec("open_clip", spec, given)
    if spec.startswith(TIMM):
        return TeacherSpec("timm", spec, given)
    if spec.startswith(HF):
        if not spec[len(HF):]:
            raise SiclipError(f"{what} {given!r} names no model: use hf:FOLDER or hf:ORG/NAME")
        named = parse_teacher(spec[len(HF):], root, what)
        if named.kind != "transformers":
            raise SiclipError(f"{what} {given!r}: {named.given!r} is a {named.kind} name, not a transformers model "
                              f"(drop the {HF} prefix)")
        return TeacherSpec("transformers", named.source, given)
    spec = in_data_root(spec, root)
    checkpoint = find_checkpoint(spec)
    if checkpoint is not None:
        return TeacherSpec("siclip", str(checkpoint), given)
    path = Path(spec).expanduser()
    if not path.exists():
        _refuse_missing(spec, root, what)
        return TeacherSpec("transformers", spec, given)  # a hub name
    if not path.is_dir():
        raise SiclipError(f"{what} {given!r} is a file: give a siclip run or checkpoint folder, a transformers "
                          f"model folder, or open_clip:ARCH/FILE for an open_clip weights file")
    if not (path / MODEL_CONFIG).is_file():
        raise SiclipError(f"{what} {given!r} is a folder with neither a siclip run or checkpoint nor a "
                          f"transformers model (no {MODEL_CONFIG})")
    return TeacherSpec("transformers", str(path.absolute()), given)


# ----------------------------------------------------------------------------- one interface


def _features(out):
    # transformers 5 returns a model output whose pooler_output is the projected embedding; 4.x a tensor
    import torch

    return out if isinstance(out, torch.Tensor) else out.pooler_output


class Teacher:
    """A CLIP teacher as every stage uses it: its own image preprocessing of PIL images (`preprocess`), the
    features of preprocessed pixels (`image_features`) and of texts (`text_features`), unnormalised, and what a
    stage needs to feed it from its own pixels: `image_size`, `mean`, `std`. `model` is the module itself (for
    weight inheritance); `logit_scale` its exp(logit_scale) where it has one."""

    kind = ""
    name = ""  # for messages and logs: "CLIPModel /path", "open_clip open_clip:…"
    model_id = ""  # for provenance: the path or name it loaded from
    revision: str | None = None
    dim = 0
    image_size = 224
    mean: list = []
    std: list = []
    logit_scale: float | None = None

    def __init__(self):
        self.model, self.device, self.dtype = None, "cpu", None

    def to(self, device, dtype=None):
        self.model.to(device=device, dtype=dtype)
        self.device, self.dtype = device, dtype or next(self.model.parameters()).dtype
        return self

    def preprocess(self, images: list):
        raise NotImplementedError

    def image_features(self, pixels):
        raise NotImplementedError

    def text_features(self, texts: list[str]):
        raise NotImplementedError


class TransformersTeacher(Teacher):
    """A transformers model with image and text features (CLIPModel, SigLIP, …), its image processor and tokenizer."""

    kind = "transformers"

    def __init__(self, model, image_processor, tokenizer, model_id: str, revision: str | None = None):
        super().__init__()
        self.model, self.image_processor, self.tokenizer = model.eval().requires_grad_(False), image_processor, tokenizer
        self.model_id, self.revision = model_id, revision
        self.name = f"{type(model).__name__} {model_id}"
        config = model.config
        self.dim = int(getattr(config, "projection_dim", 0) or 0)
        vision, text = getattr(config, "vision_config", None), getattr(config, "text_config", None)
        self.image_size = int(getattr(vision, "image_size", 224))
        self.mean = list(getattr(image_processor, "image_mean", None) or OPENAI_MEAN)
        self.std = list(getattr(image_processor, "image_std", None) or OPENAI_STD)
        self.context = int(getattr(text, "max_position_embeddings", 77))
        scale = getattr(model, "logit_scale", None)
        self.logit_scale = float(scale.exp()) if scale is not None else None
        self.device, self.dtype = "cpu", next(model.parameters()).dtype

    def preprocess(self, images: list):
        return self.image_processor(images=images, return_tensors="pt")["pixel_values"]

    def image_features(self, pixels):
        return _features(self.model.get_image_features(pixel_values=pixels.to(self.device, self.dtype)))

    def text_features(self, texts: list[str]):
        enc = self.tokenizer(texts, padding=True, truncation=True, max_length=self.context, return_tensors="pt")
        return _features(self.model.get_text_features(input_ids=enc["input_ids"].to(self.device),
                                                      attention_mask=enc["attention_mask"].to(self.device)))


class OpenClipTeacher(Teacher):
    """An open_clip model (extra siclip[mobileclip]) with its own image preprocessing and tokenizer."""

    kind = "open_clip"

    def __init__(self, spec: str, what: str = "teacher"):
        import torch

        super().__init__()
        self.model, self._preprocess, self.tokenizer = load_open_clip(spec, what)
        self.model.requires_grad_(False)
        import open_clip

        visual = self.model.visual
        size = getattr(visual, "image_size", 224)
        self.image_size = size[0] if isinstance(size, (tuple, list)) else int(size)
        self.mean = list(getattr(visual, "image_mean", None) or open_clip.OPENAI_DATASET_MEAN)
        self.std = list(getattr(visual, "image_std", None) or open_clip.OPENAI_DATASET_STD)
        self.model_id, self.name = spec, f"open_clip {spec}"
        scale = getattr(self.model, "logit_scale", None)
        self.logit_scale = float(scale.exp()) if isinstance(scale, torch.Tensor) else None
        self.device, self.dtype = "cpu", next(self.model.parameters()).dtype
        with torch.no_grad():
            self.dim = int(self.text_features(["a"]).shape[-1])

    def preprocess(self, images: list):
        import torch

        return torch.stack([self._preprocess(image) for image in images])

    def image_features(self, pixels):
        return self.model.encode_image(pixels.to(self.device, self.dtype))

    def text_features(self, texts: list[str]):
        return self.model.encode_text(self.tokenizer(texts).to(self.device))


class SiclipTeacher(Teacher):
    """A trained siclip model (a run's final model or one of its checkpoints), its preprocessing and tokenizer.
    The model is stage 3's, imported when one is loaded: the one place this layer reaches up, so that stage 2,
    the objective and inheritance read a run in one way."""

    kind = "siclip"

    def __init__(self, folder: str | Path):
        from siclip.training.evaluate import load

        super().__init__()
        self.model, self.tokenizer, self._preprocess = load(folder)
        self.model.eval().requires_grad_(False)
        self.name, self.model_id, self.dim = f"siclip {folder}", str(folder), self.model.config.embed_dim
        self.logit_scale = float(self.model.scale())
        self.image_size, self.mean, self.std = self.model.config.image.image_size, self._preprocess.mean, \
            self._preprocess.std
        self.context = self.model.config.text.context_length

    def preprocess(self, images: list):
        import torch

        return torch.stack([self._preprocess(image) for image in images])

    def image_features(self, pixels):
        return self.model.encode_image(pixels.to(self.device, self.dtype))

    def text_features(self, texts: list[str]):
        return self.model.encode_text(self.tokenizer(texts, self.context).to(self.device))


def siclip_embed_dim(folder: str | Path) -> int:
    """A siclip model folder's embedding width, from its config alone."""
    return int(json.loads((Path(folder) / MODEL_CONFIG).read_text())["embed_dim"])


def quiet_transformers() -> None:
    """transformers' warnings and its own bars (loading and writing weights: one per model, in every worker)
    off. The Hugging Face hub's download bars stay as they were: a first download of gigabytes shows its
    progress."""
    import os

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from huggingface_hub.utils import are_progress_bars_disabled, enable_progress_bars
    from transformers.utils import logging

    logging.set_verbosity_error()
    hub_off = are_progress_bars_disabled()
    logging.disable_progress_bar()  # transformers' bars, and the hub's with them ...
    if not hub_off:
        enable_progress_bars()  # ... which come back on


def load_teacher(spec: TeacherSpec, *, trust_remote_code: bool = False, model_only: bool = False,
                 what: str = "teacher") -> Teacher:
    """A transformers, open_clip or siclip teacher, on the CPU in its stored precision (`.to()` moves it); a
    SiclipError naming the teacher when it does not load. `model_only`: the weights alone (for inheritance: a
    transformers folder need not hold a processor and tokenizer). The other kinds are the caller's: `tiny` is
    built by stage 2, timm towers are read by inheritance, sidecars by the loader."""
    if spec.kind == "open_clip":
        return OpenClipTeacher(spec.source, what)
    if spec.kind == "siclip":
        return SiclipTeacher(spec.source)
    if spec.kind != "transformers":
        raise SiclipError(f"{what} {spec.given!r}: a {spec.kind} teacher cannot be used here")
    quiet_transformers()
    from transformers import AutoImageProcessor, AutoModel, AutoTokenizer

    kw = {"trust_remote_code": trust_remote_code}
    try:
        model = AutoModel.from_pretrained(spec.source, **kw)
        processor = None if model_only else AutoImageProcessor.from_pretrained(spec.source, **kw)
        tokenizer = None if model_only else AutoTokenizer.from_pretrained(spec.source, **kw)
    except (OSError, ValueError, KeyError, ImportError) as e:
        where = "local folder" if Path(spec.source).exists() else \
            "hub model (offline? set HF_HUB_OFFLINE=0 to download, or pass a local folder)"
        raise SiclipError(f"{what} {spec.given!r} does not load as a {where}: {first_line(e)}") from None
    if not (hasattr(model, "get_image_features") and hasattr(model, "get_text_features")):
        raise SiclipError(f"{what} {spec.given!r} is a {type(model).__name__}, not a CLIP-style model with image and "
                          f"text features")
    return TransformersTeacher(model, processor, tokenizer, spec.source, getattr(model.config, "_commit_hash", None))
