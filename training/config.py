"""The config of `siclip train`: one TOML file (`training/configs/*.toml`) plus `--set key=value`.

Top-level keys are the run's settings; `[[stages]]` lists the WIKD stages in order, each with
its length, teacher, loss weights (`[stages.loss]`), trainable/frozen modules and learning rate.
`--set` reaches every key: `--set batch_size=32`, `--set stages.0.lr=5e-4`,
`--set stages.1.loss.fd=2000`. Unknown keys are errors that name the valid ones.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import json
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from siclip.manifests.config import coerce_value, unknown_key
from siclip.manifests.errors import SiclipError
from siclip.images import OPENAI_MEAN, OPENAI_STD
from siclip.teachers import check_spelling

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

CONFIGS_DIR = Path(__file__).parent / "configs"
PRECISIONS = ("auto", "no", "bf16", "fp16")
SCHEDULES = ("cosine", "constant")
TEACHER_KEYWORDS = ("none", "sidecar")


@dataclass
class LossWeights:
    """λ of each term of the total objective (METHOD, 'The total objective'); 0 switches a term off."""

    clip_web: float = 1.0  # InfoNCE on the web (alt-text) caption
    clip_synthetic: float = 1.0  # InfoNCE on the sampled synthetic captions (mean over them)
    pm: float = 0.0  # pair matching (METHOD §5)
    fd: float = 0.0  # feature distillation (MSE to the teacher's embeddings)
    crd: float = 0.0  # contrastive relation distillation (KL to the teacher's similarity distributions)
    icl: float = 0.0  # interactive contrastive learning (InfoNCE against the teacher's embeddings)

    def distillation(self) -> bool:
        return any(w > 0 for w in (self.fd, self.crd, self.icl))


@dataclass
class StageConfig:
    """One stage of training: how long, against which teacher, with which losses, what trains."""

    name: str = "stage"  # shown in progress lines and metrics.jsonl; the stages' names must differ
    epochs: float = 0.0  # length in epochs of the training shards (epoch length from the manifests) ...
    steps: int = 0  # ... or in optimizer steps; exactly one of the two
    teacher: str = "none"  # none | sidecar | a siclip run or checkpoint | a CLIPModel folder or hub name | open_clip:ARCH/PRETRAINED or open_clip:FOLDER
    loss: LossWeights = field(default_factory=LossWeights)
    train: list = field(default_factory=lambda: ["*"])  # parameter-name globs that train in this stage
    freeze: list = field(default_factory=list)  # globs frozen in this stage (wins over `train`)
    lr: float = 1e-3  # peak learning rate
    min_lr: float = 0.0  # where the cosine ends
    warmup_steps: int = 0  # linear warm-up from 0 to lr over this stage's first steps
    schedule: str = "cosine"  # cosine (from lr down to min_lr) or constant, after the warm-up


@dataclass
class TrainConfig:
    model: str = "tiny"  # a preset in training/presets/ or a model config file
    model_set: list = field(default_factory=list)  # dotted overrides of the model config: ["image.image_size=32"]
    inherit_from: str = ""  # run inherit_weights from this teacher before the first stage ("" = start fresh)
    inherit_freeze: bool = False  # inherited tensors frozen in the first stage (not logit_scale, new modules); later stages' globs decide
    seed: int = 0  # seeds the model's init, the shuffles, the crops and the caption draws
    batch_size: int = 64  # global batch: every contrastive term sees all of it, across processes
    micro_batch: int = 0  # >0: gradient caching, activations held for this many samples at a time
    grad_checkpointing: bool = False  # recompute each block in the backward pass (less memory, more compute)
    workers: int = 2  # loader processes per training process (0: load in the training process)
    threads: int = 0  # torch threads of the training process; 0: torch's default (1 is fastest for tiny models on a busy CPU)
    precision: str = "auto"  # no | bf16 | fp16 | auto: Accelerate's when it has one (accelerate launch --mixed_precision, accelerate config), else bf16 on a GPU that has it, fp16 on one without, fp32 on CPU
    weight_decay: float = 0.1  # AdamW's, on weights only (not on gains, biases, norms or logit_scale)
    betas: list = field(default_factory=lambda: [0.9, 0.98])  # AdamW's β1, β2
    eps: float = 1e-6  # AdamW's ε
    grad_clip: float = 1.0  # max global gradient norm; 0: no clipping
    synthetic_captions: int = 1  # synthetic captions per image per step, sampled from its caption sidecar
    crop_scale: list = field(default_factory=lambda: [0.6, 1.0])  # random resized crop, area fraction; [1, 1]: none
    flip: bool = False  # horizontal flips (off: captions name left and right)
    shuffle_buffer: int = 5000  # samples each loader worker shuffles among (open_clip's size)
    shuffle_initial: int = 1000  # samples in that buffer before the first leaves it (a quicker start)
    open_shards: int = 8  # shards each loader worker reads at once, interleaved (batches mix even a sorted list)
    image_mean: list = field(default_factory=lambda: list(OPENAI_MEAN))  # per-channel mean the pixels (0..1) are normalised by (OpenAI's)
    image_std: list = field(default_factory=lambda: list(OPENAI_STD))  # per-channel std, likewise
    val_samples: int = 0  # held out, never trained on: the last shards by name (empty ones skipped) holding at least N samples
    val_shards: Any = 0  # held out instead of by val_samples: a count (the last N shards by name) or a list of names; set one of the two
    eval_every: int = 0  # retrieval on the held-out shards every N steps (and at the end); 0: at the end only
    zeroshot_every: int = 0  # zero-shot on zeroshot_folders every N steps (and at the end), logged with the evals; 0: off
    zeroshot_folders: list = field(default_factory=list)  # folders of class sub-folders, as siclip eval --imagefolder (a path may be relative to the data root)
    zeroshot_classnames: str = ""  # their class names, as siclip eval --classnames: a file or imagenet; "": the folder names
    zeroshot_templates: str = ""  # their prompts, as siclip eval --templates: a file, openai or simple; "": each folder's templates.txt, else photo prompts
    checkpoint_every: int = 100  # steps between checkpoints (and one at the last step)
    keep_checkpoints: int = 2  # newest checkpoints kept; older ones are deleted (each counts against the budget)
    log_every: int = 1  # steps between lines of metrics.jsonl
    report_to: Any = field(default_factory=list)  # trackers that get metrics.jsonl's records too, through Accelerate: ["tensorboard"] (into RUN/tracking/), "wandb", "mlflow", … (a list, or names split by commas)
    tracking_project: str = "siclip"  # the project the trackers file the run under (wandb's project; TensorBoard's RUN/tracking/PROJECT/); the run is named after its folder
    pm_k: int = 8  # hardest in-batch negatives per row and column of the pair-matching loss; 0: all
    record_keys: bool = False  # write the sample keys of every step to keys-rank<N>.jsonl (for audits and tests)
    stages: list = field(default_factory=list)  # [[stages]]: list of StageConfig

    def validate(self, where: str) -> None:
        def bad(msg: str) -> SiclipError:
            return SiclipError(f"{where}: {msg}")

        if not self.stages:
            raise bad("no [[stages]]: a config needs at least one stage")
        for name in ("batch_size", "checkpoint_every", "keep_checkpoints", "log_every", "shuffle_buffer",
                     "shuffle_initial", "open_shards"):
            if getattr(self, name) < 1:
                raise bad(f"{name} must be at least 1, got {getattr(self, name)}")
        for name in ("micro_batch", "workers", "threads", "synthetic_captions", "eval_every", "pm_k", "val_samples",
                     "zeroshot_every"):
            if getattr(self, name) < 0:
                raise bad(f"{name} must be 0 or more, got {getattr(self, name)}")
        if bool(self.zeroshot_every) != bool(self.zeroshot_folders):
            raise bad("zeroshot_every and zeroshot_folders go together: the steps between zero-shot evaluations and "
                      f"the folders of class sub-folders they classify (got {self.zeroshot_every} and "
                      f"{self.zeroshot_folders})")
        if self.precision not in PRECISIONS:
            raise bad(f"precision {self.precision!r} is not one of {', '.join(PRECISIONS)}")
        if len(self.crop_scale) != 2 or not 0 < float(self.crop_scale[0]) <= float(self.crop_scale[1]) <= 1:
            raise bad(f"crop_scale {self.crop_scale} must be two area fractions 0 < lo <= hi <= 1")
        if len(self.image_mean) != 3 or len(self.image_std) != 3 or min(map(float, self.image_std)) <= 0:
            raise bad("image_mean and image_std need 3 values each, std positive")
        if not (isinstance(self.val_shards, list) or (isinstance(self.val_shards, int) and self.val_shards >= 0)):
            raise bad(f"val_shards must be a count or a list of shard names, got {self.val_shards!r}")
        if isinstance(self.val_shards, list):
            self.val_shards = [str(s) for s in self.val_shards]
        self.report_to = tracker_names(self.report_to, where)
        if not self.tracking_project.strip():
            raise bad("tracking_project must name a project (default 'siclip')")
        if self.val_samples and self.val_shards:
            raise bad(f"val_samples = {self.val_samples} and val_shards = {self.val_shards!r} both choose the held-out "
                      f"shards; keep one (--set val_samples=0 or --set val_shards=0)")
        names = [s.name for s in self.stages]
        if len(set(names)) != len(names):
            raise bad(f"stage names must differ, got {names}")
        for i, s in enumerate(self.stages):
            at = f"stage {i} ({s.name!r})"
            if (s.epochs > 0) == (s.steps > 0):
                raise bad(f"{at}: give its length as epochs or as steps (exactly one, positive)")
            if s.epochs < 0 or s.steps < 0 or s.warmup_steps < 0 or s.lr <= 0 or s.min_lr < 0:
                raise bad(f"{at}: epochs, steps, warmup_steps, min_lr must be >= 0 and lr > 0")
            if s.schedule not in SCHEDULES:
                raise bad(f"{at}: schedule {s.schedule!r} is not one of {', '.join(SCHEDULES)}")
            weights = dataclasses.asdict(s.loss)
            if any(w < 0 for w in weights.values()) or not any(w > 0 for w in weights.values()):
                raise bad(f"{at}: loss weights must be >= 0 with at least one positive, got {weights}")
            if s.loss.clip_synthetic > 0 and self.synthetic_captions == 0:
                raise bad(f"{at}: clip_synthetic > 0 needs synthetic_captions >= 1")
            check_spelling(s.teacher, f"{where}: {at}: teacher")
            if s.loss.distillation() and s.teacher == "none":
                raise bad(f"{at}: fd/crd/icl weights need a teacher (teacher = 'sidecar', a run, a CLIP folder …)")
            if not s.train:
                raise bad(f"{at}: train lists no parameter globs; use ['*'] for everything")

    def model_overrides(self) -> dict:
        """`model_set` as the dotted overrides `training.model.load_config` takes, values typed."""
        out = {}
        for item in self.model_set:
            key, sep, value = str(item).partition("=")
            if not sep:
                raise SiclipError(f"model_set entry {item!r}: expected key=value (e.g. image.image_size=32)")
            out[key.strip()] = parse_value(value.strip())
        return out

    @property
    def micro(self) -> int:
        """Samples whose activations are held at once (the whole per-process batch without caching)."""
        return self.micro_batch or self.batch_size

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# ----------------------------------------------------------------------------- loading


def tracker_names(value: Any, where: str) -> list[str]:
    """`report_to` as a list of names: a list, one name, or names split by commas ("tensorboard,wandb")."""
    names = [n for n in value.split(",") if n.strip()] if isinstance(value, str) else value
    if not isinstance(names, list) or not all(isinstance(n, str) and n.strip() for n in names):
        raise SiclipError(f"{where}: report_to must be a list of tracker names (e.g. [\"tensorboard\", \"wandb\"]), "
                          f"got {value!r}")
    return list(dict.fromkeys(n.strip() for n in names))  # in order, each once


def _set_path(data: dict, dotted: str, raw: str, where: str) -> None:
    """Apply one `a.b.0.c=value` override to nested dicts/lists (the value stays a string; typing comes later)."""
    node: Any = data
    parts = dotted.split(".")
    for i, part in enumerate(parts[:-1]):
        if isinstance(node, list):
            if not part.isdigit() or int(part) >= len(node):
                raise SiclipError(f"{where}: {'.'.join(parts[:i])} has {len(node)} entries; no index {part!r}")
            node = node[int(part)]
        else:
            node = node.setdefault(part, {})
    if isinstance(node, list):
        raise SiclipError(f"{where}: {dotted!r} names a list entry, not a key")
    node[parts[-1]] = raw


def _build(cls, data: Any, where: str):
    """A dataclass from a dict, recursing into nested dataclasses and [[stages]]; strings from --set are typed."""
    if not isinstance(data, dict):
        raise SiclipError(f"{where}: expected a table, got {data!r}")
    hints = typing.get_type_hints(cls)
    valid = [f.name for f in dataclasses.fields(cls)]
    values = {}
    for key, value in data.items():
        if key not in hints:
            raise unknown_key(key, valid, where)
        typ = hints[key]
        at = f"{where}: {key}" if where else key
        if dataclasses.is_dataclass(typ):
            values[key] = _build(typ, value, at)
        elif cls is TrainConfig and key == "stages":
            if not isinstance(value, list):
                raise SiclipError(f"{where}: stages must be a list of [[stages]] tables")
            values[key] = [_build(StageConfig, s, f"{where}: stages.{i}") for i, s in enumerate(value)]
        elif typ is Any:
            values[key] = parse_value(value)
        else:
            values[key] = coerce_value(key, value, typ, where)
    return cls(**values)


def parse_value(value):
    """An untyped key (val_shards): a --set string becomes the TOML value it spells, else stays a name."""
    if isinstance(value, str):
        try:
            return tomllib.loads(f"v = {value}")["v"]
        except tomllib.TOMLDecodeError:
            return value
    return value


def find_config(name: str | Path) -> Path:
    """A config file path, or a name of `training/configs/NAME.toml`."""
    path = Path(name)
    if path.is_file():
        return path
    candidate = CONFIGS_DIR / f"{name}.toml"
    if candidate.is_file():
        return candidate
    names = sorted(p.stem for p in CONFIGS_DIR.glob("*.toml"))
    raise SiclipError(f"no training config {str(name)!r}: not a file, and not one of training/configs ({', '.join(names)})")


def load_train_config(source: str | Path | dict, sets: list[str] = ()) -> TrainConfig:
    """Defaults < the TOML file (or a dict) < `key=value` overrides; validated."""
    if isinstance(source, dict):
        data, where = json.loads(json.dumps(source)), "config"
    else:
        path = find_config(source)
        where = str(path)
        try:
            data = tomllib.loads(path.read_text())
        except tomllib.TOMLDecodeError as e:
            raise SiclipError(f"{path}: not valid TOML ({e})") from None
    _build(TrainConfig, data, where)  # the file's own mistakes are named as the file's
    for item in sets:
        if "=" not in item:
            raise SiclipError(f"--set {item!r}: expected key=value")
        key, value = item.split("=", 1)
        _set_path(data, key.strip().replace("-", "_"), value.strip(), f"--set {item}")
        _build(TrainConfig, data, f"--set {item}")
    cfg = _build(TrainConfig, data, where)
    cfg.validate(where)
    return cfg


def to_toml(cfg: TrainConfig) -> str:
    """The resolved config as TOML: top-level keys, then each [[stages]] with its [stages.loss]."""
    from siclip.manifests.config import toml_value

    d = cfg.to_dict()
    stages = d.pop("stages")
    lines = [f"{k} = {toml_value(v)}" for k, v in d.items()]
    for s in stages:
        loss = s.pop("loss")
        lines += ["", "[[stages]]"] + [f"{k} = {toml_value(v)}" for k, v in s.items()]
        lines += ["[stages.loss]"] + [f"{k} = {toml_value(v)}" for k, v in loss.items()]
    return "\n".join(lines) + "\n"


def match_globs(names: list[str], patterns: list[str]) -> set[str]:
    """The names any glob matches; a glob that matches nothing is an error (a typo would silently do nothing)."""
    out = set()
    for pattern in patterns:
        hit = fnmatch.filter(names, pattern)
        if not hit:
            close = sorted({n.rsplit(".", 1)[0] + ".*" for n in names if n.split(".")[0] == pattern.split(".")[0]})[:6]
            hint = f"; e.g. {', '.join(close)}" if close else f"; top-level modules: {', '.join(sorted({n.split('.')[0] for n in names}))}"
            raise SiclipError(f"module glob {pattern!r} matches no parameter{hint}")
        out.update(hit)
    return out
