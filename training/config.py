"""The config of `siclip train`: one TOML file (`training/configs/*.toml`) plus `--set key=value`.

Top-level keys are the run's settings; `[[stages]]` lists the WIKD stages in order, each with
its length, teacher, loss weights (`[stages.loss]`), trainable/frozen modules and learning rate.
`--set` reaches every key: `--set batch_size=32`, `--set stages.0.lr=5e-4`,
`--set stages.1.loss.fd=2000`. Unknown keys are errors that name the valid ones.
"""

from __future__ import annotations

import dataclasses
import fnmatch
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal

from pydantic import BeforeValidator, Field, model_validator

from siclip.config import FractionRange, Text, bounded, config, resolve
from siclip.images import OPENAI_MEAN, OPENAI_STD
from siclip.manifests.errors import SiclipError
from siclip.teachers import check_spelling

CONFIGS_DIR = Path(__file__).parent / "configs"


def tracker_names(value: Any) -> list[str]:
    """`report_to` as a list of names: a list, one name, or names split by commas ("tensorboard,wandb")."""
    names = [n for n in value.split(",") if n.strip()] if isinstance(value, str) else value
    if not isinstance(names, list) or not all(isinstance(n, str) and n.strip() for n in names):
        raise ValueError(f"report_to must be a list of tracker names (e.g. [\"tensorboard\", \"wandb\"]), got {value!r}")
    return list(dict.fromkeys(n.strip() for n in names))  # in order, each once


@config
class LossWeights:
    """λ of each term of the total objective (METHOD, 'The total objective'); 0 switches a term off."""

    clip_web: float = bounded(1.0, ge=0)  # InfoNCE on the web (alt-text) caption
    clip_synthetic: float = bounded(1.0, ge=0)  # InfoNCE on the sampled synthetic captions (mean over them)
    pm: float = bounded(0.0, ge=0)  # pair matching (METHOD §5)
    fd: float = bounded(0.0, ge=0)  # feature distillation (MSE to the teacher's embeddings)
    crd: float = bounded(0.0, ge=0)  # contrastive relation distillation (KL to the teacher's similarity distributions)
    icl: float = bounded(0.0, ge=0)  # interactive contrastive learning (InfoNCE against the teacher's embeddings)

    def distillation(self) -> bool:
        return any(w > 0 for w in (self.fd, self.crd, self.icl))


@config
class StageConfig:
    """One stage of training: how long, against which teacher, with which losses, what trains."""

    name: str = "stage"  # shown in progress lines and metrics.jsonl; the stages' names must differ
    epochs: float = bounded(0.0, ge=0)  # length in epochs of the training shards (epoch length from the manifests) ...
    steps: int = bounded(0, ge=0)  # ... or in optimizer steps; exactly one of the two
    teacher: str = "none"  # none | sidecar | a siclip run or checkpoint | a CLIPModel folder or hub name | open_clip:ARCH/PRETRAINED or open_clip:FOLDER
    loss: LossWeights = Field(default_factory=LossWeights)
    train: list[str] = Field(default_factory=lambda: ["*"])  # parameter-name globs that train in this stage
    freeze: list[str] = Field(default_factory=list)  # globs frozen in this stage (wins over `train`)
    lr: float = bounded(1e-3, gt=0)  # peak learning rate
    min_lr: float = bounded(0.0, ge=0)  # where the cosine ends
    warmup_steps: int = bounded(0, ge=0)  # linear warm-up from 0 to lr over this stage's first steps
    schedule: Literal["cosine", "constant"] = "cosine"  # cosine (from lr down to min_lr) or constant, after the warm-up


@config
class TrainConfig:
    WHERE: ClassVar[str] = "config"

    model: str = "tiny"  # a preset in training/presets/ or a model config file
    model_set: list[str] = Field(default_factory=list)  # dotted overrides of the model config: ["image.image_size=32"]
    inherit_from: str = ""  # run inherit_weights from this teacher before the first stage ("" = start fresh)
    inherit_freeze: bool = False  # inherited tensors frozen in the first stage (not logit_scale, new modules); later stages' globs decide
    seed: int = 0  # seeds the model's init, the shuffles, the crops and the caption draws
    batch_size: int = bounded(64, ge=1)  # global batch: every contrastive term sees all of it, across processes
    micro_batch: int = bounded(0, ge=0)  # >0: gradient caching, activations held for this many samples at a time
    grad_checkpointing: bool = False  # recompute each block in the backward pass (less memory, more compute)
    workers: int = bounded(2, ge=0)  # loader processes per training process (0: load in the training process)
    threads: int = bounded(0, ge=0)  # torch threads of the training process; 0: torch's default (1 is fastest for tiny models on a busy CPU)
    precision: Literal["auto", "no", "bf16", "fp16"] = "auto"  # no | bf16 | fp16 | auto: Accelerate's when it has one (accelerate launch --mixed_precision, accelerate config), else bf16 on a GPU that has it, fp16 on one without, fp32 on CPU
    weight_decay: float = 0.1  # AdamW's, on weights only (not on gains, biases, norms or logit_scale)
    betas: list[float] = Field(default_factory=lambda: [0.9, 0.98])  # AdamW's β1, β2
    eps: float = 1e-6  # AdamW's ε
    grad_clip: float = 1.0  # max global gradient norm; 0: no clipping
    synthetic_captions: int = bounded(1, ge=0)  # synthetic captions per image per step, sampled from its caption sidecar
    crop_scale: FractionRange = Field(default_factory=lambda: [0.6, 1.0])  # random resized crop, area fraction; [1, 1]: none
    flip: bool = False  # horizontal flips (off: captions name left and right)
    shuffle_buffer: int = bounded(5000, ge=1)  # samples each loader worker shuffles among (open_clip's size)
    shuffle_initial: int = bounded(1000, ge=1)  # samples in that buffer before the first leaves it (a quicker start)
    open_shards: int = bounded(8, ge=1)  # shards each loader worker reads at once, interleaved (batches mix even a sorted list)
    image_mean: list[float] = Field(default_factory=lambda: list(OPENAI_MEAN))  # per-channel mean the pixels (0..1) are normalised by (OpenAI's)
    image_std: list[float] = Field(default_factory=lambda: list(OPENAI_STD))  # per-channel std, likewise
    val_samples: int = bounded(0, ge=0)  # held out, never trained on: the last shards by name (empty ones skipped) holding at least N samples
    val_shards: int | list[str] = 0  # held out instead of by val_samples: a count (the last N shards by name) or a list of names; set one of the two
    eval_every: int = bounded(0, ge=0)  # retrieval on the held-out shards every N steps (and at the end); 0: at the end only
    zeroshot_every: int = bounded(0, ge=0)  # zero-shot on zeroshot_folders every N steps (and at the end), logged with the evals; 0: off
    zeroshot_folders: list[str] = Field(default_factory=list)  # folders of class sub-folders, as siclip eval --imagefolder (a path may be relative to the data root)
    zeroshot_classnames: str = ""  # their class names, as siclip eval --classnames: a file or imagenet; "": the folder names
    zeroshot_templates: str = ""  # their prompts, as siclip eval --templates: a file, openai or simple; "": each folder's templates.txt, else photo prompts
    checkpoint_every: int = bounded(100, ge=1)  # steps between checkpoints (and one at the last step)
    keep_checkpoints: int = bounded(2, ge=1)  # newest checkpoints kept; older ones are deleted (each counts against the budget)
    log_every: int = bounded(1, ge=1)  # steps between lines of metrics.jsonl
    report_to: Annotated[list[str], BeforeValidator(tracker_names)] = Field(default_factory=list)  # trackers that get metrics.jsonl's records too, through Accelerate: ["tensorboard"] (into RUN/tracking/), "wandb", "mlflow", … (a list, or names split by commas)
    tracking_project: str = "siclip"  # the project the trackers file the run under (wandb's project; TensorBoard's RUN/tracking/PROJECT/); the run is named after its folder
    pm_k: int = bounded(8, ge=0)  # hardest in-batch negatives per row and column of the pair-matching loss; 0: all
    record_keys: bool = False  # write the sample keys of every step to keys-rank<N>.jsonl (for audits and tests)
    stages: list[StageConfig] = Field(default_factory=list)  # [[stages]]: list of StageConfig

    @model_validator(mode="after")
    def _settings_that_go_together(self) -> "TrainConfig":
        if not self.stages:
            raise ValueError("no [[stages]]: a config needs at least one stage")
        if bool(self.zeroshot_every) != bool(self.zeroshot_folders):
            raise ValueError("zeroshot_every and zeroshot_folders go together: the steps between zero-shot "
                             f"evaluations and the folders of class sub-folders they classify (got "
                             f"{self.zeroshot_every} and {self.zeroshot_folders})")
        if len(self.image_mean) != 3 or len(self.image_std) != 3 or min(self.image_std) <= 0:
            raise ValueError("image_mean and image_std need 3 values each, std positive")
        if isinstance(self.val_shards, int) and self.val_shards < 0:
            raise ValueError(f"val_shards must be a count or a list of shard names, got {self.val_shards!r}")
        if not self.tracking_project.strip():
            raise ValueError("tracking_project must name a project (default 'siclip')")
        if self.val_samples and self.val_shards:
            raise ValueError(f"val_samples = {self.val_samples} and val_shards = {self.val_shards!r} both choose the "
                             f"held-out shards; keep one (--set val_samples=0 or --set val_shards=0)")
        names = [s.name for s in self.stages]
        if len(set(names)) != len(names):
            raise ValueError(f"stage names must differ, got {names}")
        for i, s in enumerate(self.stages):
            self._check_stage(f"stage {i} ({s.name!r})", s)
        return self

    def _check_stage(self, at: str, s: StageConfig) -> None:
        if (s.epochs > 0) == (s.steps > 0):
            raise ValueError(f"{at}: give its length as epochs or as steps (exactly one, positive)")
        weights = dataclasses.asdict(s.loss)
        if not any(w > 0 for w in weights.values()):
            raise ValueError(f"{at}: loss weights need at least one positive, got {weights}")
        if s.loss.clip_synthetic > 0 and self.synthetic_captions == 0:
            raise ValueError(f"{at}: clip_synthetic > 0 needs synthetic_captions >= 1")
        try:
            check_spelling(s.teacher, f"{at}: teacher")
        except SiclipError as e:
            raise ValueError(str(e)) from None
        if s.loss.distillation() and s.teacher == "none":
            raise ValueError(f"{at}: fd/crd/icl weights need a teacher (teacher = 'sidecar', a run, a CLIP folder …)")
        if not s.train:
            raise ValueError(f"{at}: train lists no parameter globs; use ['*'] for everything")

    def model_overrides(self) -> dict:
        """`model_set` as the dotted overrides `training.model.load_config` takes, each value text that the model's
        config types."""
        out = {}
        for item in self.model_set:
            key, sep, value = str(item).partition("=")
            if not sep:
                raise SiclipError(f"model_set entry {item!r}: expected key=value (e.g. image.image_size=32)")
            out[key.strip()] = Text(value.strip())
        return out

    @property
    def micro(self) -> int:
        """Samples whose activations are held at once (the whole per-process batch without caching)."""
        return self.micro_batch or self.batch_size

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# ----------------------------------------------------------------------------- loading


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
    """Defaults < the TOML file (or a dict: a run's config.json) < `key=value` overrides; validated."""
    if isinstance(source, dict):
        return resolve(TrainConfig, source, sets)
    path = find_config(source)
    return resolve(TrainConfig, path, sets, where=str(path))


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
