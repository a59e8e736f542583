"""CLIP teachers (transformers, open_clip or a siclip run): image and text embeddings, unit length.

An ensemble's embedding is each teacher's L2-normalised embedding, concatenated, then normalised
again: the concatenation of T unit vectors has length √T, and the distillation losses assume unit
vectors. The dot product of two such embeddings is the mean of the teachers' cosines.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from siclip import teachers
from siclip.captioning.models import TINY, build_tiny_clip, check_device


def ensemble_embedding(per_teacher: list[torch.Tensor]) -> torch.Tensor:
    """Normalise each teacher's embeddings, concatenate, normalise the whole: the mean-cosine ensemble."""
    unit = [F.normalize(e.float(), dim=-1) for e in per_teacher]
    return F.normalize(torch.cat(unit, dim=-1), dim=-1)


class TeacherEnsemble:
    """One or more CLIP teachers (siclip/teachers.py); each image is preprocessed by every teacher's own
    preprocessing."""

    def __init__(self, teachers: list, device: str):
        self.teachers, self.device = teachers, device
        self.dims = [t.dim for t in teachers]
        self.dim = sum(self.dims)

    def describe(self) -> list[dict]:
        return [{"id": t.model_id, "revision": t.revision, "dim": t.dim} for t in self.teachers]

    def prepare(self, images: list) -> list[torch.Tensor] | None:
        if not images:
            return None
        return [t.preprocess(images) for t in self.teachers]

    @torch.inference_mode()
    def embed_images(self, pixels: list[torch.Tensor]) -> torch.Tensor:
        return ensemble_embedding([t.image_features(px).float().cpu() for t, px in zip(self.teachers, pixels)])

    @torch.inference_mode()
    def embed_texts(self, texts: list[str]) -> torch.Tensor:
        return ensemble_embedding([t.text_features(texts).float().cpu() for t in self.teachers])


def load_teacher(name: str, device: str, seed: int, trust_remote_code: bool) -> teachers.Teacher:
    """A teacher by name (siclip/teachers.py's grammar; `tiny` is built here), on `device`: in half precision on a
    GPU, as the embeddings are stored in half precision anyway."""
    import torch

    check_device(device)
    spec = teachers.parse_teacher(name)
    if spec.kind == "tiny":
        model, (processor, tokenizer) = build_tiny_clip(seed)
        teacher = teachers.TransformersTeacher(model, processor, tokenizer, f"{TINY}(seed={seed})")
    else:
        teacher = teachers.load_teacher(spec, trust_remote_code=trust_remote_code)
    return teacher.to(device, torch.float16 if device.startswith("cuda") else torch.float32)


def build_teachers(names: list[str], device: str, seed: int, trust_remote_code: bool, threads: int = 0) -> TeacherEnsemble:
    if threads:
        torch.set_num_threads(threads)
    return TeacherEnsemble([load_teacher(n, device, seed, trust_remote_code) for n in names], device)
