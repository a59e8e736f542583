"""The configs of `siclip captions` and `siclip teacher`: defaults < TOML file < --set < flags."""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar, Literal

from pydantic import Field, model_validator

from siclip.config import FractionRange, bounded, config, flag

CAPTIONS_TOML = Path(__file__).with_name("captions.toml")
TEACHER_TOML = Path(__file__).with_name("teacher.toml")
DASK_SCHEMES = ("tcp://", "tls://", "inproc://", "ws://", "wss://")


@config
class RunConfig:
    """What both stage-2 jobs share: where, on what, with which cluster."""

    data: str | None = flag(None, "data root (holds shards/ and manifests/)", metavar="DATA")
    batch_size: int = flag(16, "images per forward pass", metavar="N", ge=1)
    workers: int = flag(1, "dask worker processes of the local cluster (0: run in this process, for debugging)",
                        metavar="N", ge=0)
    threads_per_worker: int = bounded(0, ge=0, zero="the cores shared out")  # torch threads per worker; 0: the cores divided among workers
    scheduler: str | None = flag(None, "address of an existing dask scheduler (tcp://HOST:PORT) instead of a local "
                                 "cluster", metavar="ADDR")
    device: Literal["cpu", "cuda"] = flag("cpu", "where the model runs")
    seed: int = flag(0, "base seed; each sample's randomness derives from it and its key", metavar="S")
    trust_remote_code: bool = flag(False, "allow model code from the checkpoint (hub models with custom code)",
                                   switch=True)
    overwrite: bool = flag(False, "replace sidecars made with other parameters instead of refusing", switch=True)
    shards: list[str] = Field(default_factory=list)  # limit to these shard names; empty: every finished shard

    @model_validator(mode="after")
    def _a_data_root_and_a_scheduler_address(self):
        if not self.data:
            raise ValueError("--data DATA is required")
        if self.scheduler and not self.scheduler.startswith(DASK_SCHEMES):
            raise ValueError(f"--scheduler {self.scheduler!r} is not a dask address such as tcp://HOST:8786")
        return self


@config
class CaptionsConfig(RunConfig):
    WHERE: ClassVar[str] = "siclip captions"

    model: str = flag("Salesforce/blip-image-captioning-base", "captioner: a transformers image-to-text hub name or "
                      "local folder, 'tiny', or 'coca:ARCH:PRETRAINED' (needs siclip[mobileclip])",
                      metavar="NAME_OR_PATH")
    revision: str | None = None  # hub revision (branch, tag or commit) of the captioner
    num_captions: int = flag(3, "synthetic captions per image", metavar="N", ge=1)
    top_p: float = flag(0.5, "nucleus sampling mass", metavar="P", gt=0, le=1)
    temperature: float = flag(0.9, "sampling temperature", metavar="T", gt=0)
    max_new_tokens: int = flag(30, "longest caption in tokens", metavar="N", ge=1)
    prompt: str = ""  # text the captioner continues (e.g. 'a picture of' for BLIP-large); empty: none
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = flag(
        "auto", "model precision (auto: float16 on cuda, float32 on cpu)")

    def generation_params(self) -> dict:
        """What decides the captions: a sidecar made with other values is not reused."""
        return {"model": self.model, "revision": self.revision, "num_captions": self.num_captions, "top_p": self.top_p,
                "temperature": self.temperature, "max_new_tokens": self.max_new_tokens, "prompt": self.prompt,
                "seed": self.seed}


@config
class TeacherConfig(RunConfig):
    WHERE: ClassVar[str] = "siclip teacher"

    teacher: str = flag("openai/clip-vit-large-patch14", "CLIP teacher(s): transformers hub names or local folders, "
                        "siclip runs or checkpoints, open_clip:ARCH/PRETRAINED or open_clip:FOLDER (needs "
                        "siclip[mobileclip]), or 'tiny'; comma-separated for an ensemble (embeddings concatenated)",
                        metavar="NAME_OR_PATH[,…]")
    augmentations: int = flag(0, "extra image embeddings per sample of recorded random crops/flips", metavar="K", ge=0)
    dtype: Literal["float16", "bfloat16"] = flag(
        "float16", "storage precision of the embeddings (the model runs in float32 on cpu)")
    captions: bool = True  # embed every synthetic caption too (needs the captions sidecars); false: the web caption only
    crop_scale: FractionRange = Field(default_factory=lambda: [0.35, 1.0])  # area fraction range of the random crops
    flip: bool = False  # random horizontal flips of the crops; off by default, as in training: captions name left and right

    @model_validator(mode="after")
    def _a_teacher(self):
        if not self.teachers():
            raise ValueError("--teacher needs at least one model")
        return self

    def teachers(self) -> list[str]:
        return [t.strip() for t in self.teacher.split(",") if t.strip()]

    def params(self) -> dict:
        return {"teacher": self.teachers(), "augmentations": self.augmentations, "dtype": self.dtype,
                "captions": self.captions, "crop_scale": [float(x) for x in self.crop_scale], "seed": self.seed,
                # absent means flips on or no crops to flip: sidecars made before this option, or made with flips
                # on (the old default), or without augmentations, keep matching their parameters
                **({"flip": False} if self.augmentations and not self.flip else {})}
