"""The configs of `siclip captions` and `siclip teacher`: defaults < TOML file < --set < flags."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from siclip.manifests.errors import SiclipError

CAPTIONS_TOML = Path(__file__).with_name("captions.toml")
TEACHER_TOML = Path(__file__).with_name("teacher.toml")
DTYPES = ("auto", "float32", "bfloat16", "float16")


def _flag(help_: str, **kw) -> dict:
    return {"metadata": {"flag": True, "help": help_, **kw}}


@dataclass
class RunConfig:
    """What both stage-2 jobs share: where, on what, with which cluster."""

    data: str | None = field(default=None, **_flag("data root (holds shards/ and manifests/)", metavar="DATA"))
    batch_size: int = field(default=16, **_flag("images per forward pass", metavar="N"))
    workers: int = field(default=1, **_flag("dask worker processes of the local cluster (0: run in this process, for debugging)", metavar="N"))
    threads_per_worker: int = 0  # torch threads per worker; 0: the cores divided among workers
    scheduler: str | None = field(default=None, **_flag("address of an existing dask scheduler (tcp://HOST:PORT) instead of a local cluster", metavar="ADDR"))
    device: str = field(default="cpu", **_flag("where the model runs", choices=["cpu", "cuda"]))
    seed: int = field(default=0, **_flag("base seed; each sample's randomness derives from it and its key", metavar="S"))
    trust_remote_code: bool = field(default=False, **_flag("allow model code from the checkpoint (hub models with custom code)", kind="switch"))
    overwrite: bool = field(default=False, **_flag("replace sidecars made with other parameters instead of refusing", kind="switch"))
    shards: list = field(default_factory=list)  # limit to these shard names; empty: every finished shard

    def validate_common(self, where: str) -> None:
        if not self.data:
            raise SiclipError(f"{where}: --data DATA is required")
        if self.batch_size < 1:
            raise SiclipError(f"{where}: batch_size must be at least 1, got {self.batch_size}")
        if self.workers < 0:
            raise SiclipError(f"{where}: workers must be 0 or more, got {self.workers}")
        if self.threads_per_worker < 0:
            raise SiclipError(f"{where}: threads_per_worker must be 0 (the cores shared out) or more, got "
                              f"{self.threads_per_worker}")
        if self.scheduler and not self.scheduler.startswith(("tcp://", "tls://", "inproc://", "ws://", "wss://")):
            raise SiclipError(f"{where}: --scheduler {self.scheduler!r} is not a dask address such as tcp://HOST:8786")
        self.shards = [str(s) for s in self.shards]


@dataclass
class CaptionsConfig(RunConfig):
    model: str = field(default="Salesforce/blip-image-captioning-base", **_flag(
        "captioner: a transformers image-to-text hub name or local folder, 'tiny', or 'coca:ARCH:PRETRAINED' (needs siclip[mobileclip])", metavar="NAME_OR_PATH"))
    revision: str | None = None  # hub revision (branch, tag or commit) of the captioner
    num_captions: int = field(default=3, **_flag("synthetic captions per image", metavar="N"))
    top_p: float = field(default=0.5, **_flag("nucleus sampling mass", metavar="P"))
    temperature: float = field(default=0.9, **_flag("sampling temperature", metavar="T"))
    max_new_tokens: int = field(default=30, **_flag("longest caption in tokens", metavar="N"))
    prompt: str = ""  # text the captioner continues (e.g. 'a picture of' for BLIP-large); empty: none
    dtype: str = field(default="auto", **_flag("model precision (auto: float16 on cuda, float32 on cpu)", choices=list(DTYPES)))

    def validate(self) -> None:
        self.validate_common("siclip captions")
        if self.num_captions < 1:
            raise SiclipError(f"siclip captions: num_captions must be at least 1, got {self.num_captions}")
        if not 0 < self.top_p <= 1:
            raise SiclipError(f"siclip captions: top_p must be in (0, 1], got {self.top_p}")
        if self.temperature <= 0:
            raise SiclipError(f"siclip captions: temperature must be positive, got {self.temperature}")
        if self.max_new_tokens < 1:
            raise SiclipError(f"siclip captions: max_new_tokens must be at least 1, got {self.max_new_tokens}")
        if self.dtype not in DTYPES:
            raise SiclipError(f"siclip captions: dtype {self.dtype!r} is not one of {', '.join(DTYPES)}")

    def generation_params(self) -> dict:
        """What decides the captions: a sidecar made with other values is not reused."""
        return {"model": self.model, "revision": self.revision, "num_captions": self.num_captions, "top_p": self.top_p,
                "temperature": self.temperature, "max_new_tokens": self.max_new_tokens, "prompt": self.prompt,
                "seed": self.seed}


@dataclass
class TeacherConfig(RunConfig):
    teacher: str = field(default="openai/clip-vit-large-patch14", **_flag(
        "CLIP teacher(s): transformers hub names or local folders, siclip runs or checkpoints, "
        "open_clip:ARCH/PRETRAINED or open_clip:FOLDER "
        "(needs siclip[mobileclip]), or 'tiny'; comma-separated for an ensemble (embeddings concatenated)",
        metavar="NAME_OR_PATH[,…]"))
    augmentations: int = field(default=0, **_flag("extra image embeddings per sample of recorded random crops/flips", metavar="K"))
    dtype: str = field(default="float16", **_flag("storage precision of the embeddings (the model runs in float32 on cpu)", choices=["float16", "bfloat16"]))
    captions: bool = True  # embed every synthetic caption too (needs the captions sidecars); false: the web caption only
    crop_scale: list = field(default_factory=lambda: [0.35, 1.0])  # area fraction range of the random crops
    flip: bool = False  # random horizontal flips of the crops; off by default, as in training: captions name left and right

    def validate(self) -> None:
        self.validate_common("siclip teacher")
        if not self.teachers():
            raise SiclipError("siclip teacher: --teacher needs at least one model")
        if self.augmentations < 0:
            raise SiclipError(f"siclip teacher: augmentations must be 0 or more, got {self.augmentations}")
        if self.dtype not in ("float16", "bfloat16"):
            raise SiclipError(f"siclip teacher: dtype {self.dtype!r} is not float16 or bfloat16")
        bad = f"siclip teacher: crop_scale {self.crop_scale} must be two fractions 0 < lo <= hi <= 1"
        if len(self.crop_scale) != 2 or not all(isinstance(x, (int, float)) and not isinstance(x, bool)
                                                for x in self.crop_scale):
            raise SiclipError(bad)
        lo, hi = (float(x) for x in self.crop_scale)
        if not 0 < lo <= hi <= 1:
            raise SiclipError(bad)

    def teachers(self) -> list[str]:
        return [t.strip() for t in self.teacher.split(",") if t.strip()]

    def params(self) -> dict:
        return {"teacher": self.teachers(), "augmentations": self.augmentations, "dtype": self.dtype,
                "captions": self.captions, "crop_scale": [float(x) for x in self.crop_scale], "seed": self.seed,
                # absent means flips on or no crops to flip: sidecars made before this option, or made with flips
                # on (the old default), or without augmentations, keep matching their parameters
                **({"flip": False} if self.augmentations and not self.flip else {})}
