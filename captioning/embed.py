"""CLIP teachers (transformers or open_clip): image and text embeddings, unit length.

An ensemble's embedding is each teacher's L2-normalised embedding, concatenated, then normalised
again: the concatenation of T unit vectors has length √T, and the distillation losses assume unit
vectors. The dot product of two such embeddings is the mean of the teachers' cosines.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from siclip.captioning.models import LoadedModel, check_device, load_clip
from siclip.manifests.models import PREFIX as OPEN_CLIP, load_open_clip


def _features(out) -> torch.Tensor:
    # transformers 5 returns a model output whose pooler_output is the projected embedding; 4.x a tensor
    return out if isinstance(out, torch.Tensor) else out.pooler_output


def ensemble_embedding(per_teacher: list[torch.Tensor]) -> torch.Tensor:
    """Normalise each teacher's embeddings, concatenate, normalise the whole: the mean-cosine ensemble."""
    unit = [F.normalize(e.float(), dim=-1) for e in per_teacher]
    return F.normalize(torch.cat(unit, dim=-1), dim=-1)


class TransformersTeacher:
    """A transformers CLIP-style model (get_image_features / get_text_features) with its processor and tokenizer."""

    def __init__(self, loaded: LoadedModel, device: str):
        self.loaded, self.device = loaded, device
        self.model_id, self.revision = loaded.model_id, loaded.revision
        self.dim = int(loaded.model.config.projection_dim)

    def prepare(self, images: list) -> torch.Tensor:
        return self.loaded.image_processor(images=images, return_tensors="pt")["pixel_values"]

    def image_features(self, pixels: torch.Tensor) -> torch.Tensor:
        model = self.loaded.model
        return _features(model.get_image_features(pixel_values=pixels.to(self.device, next(model.parameters()).dtype)))

    def text_features(self, texts: list[str]) -> torch.Tensor:
        model = self.loaded.model
        max_len = int(getattr(model.config.text_config, "max_position_embeddings", 77))
        enc = self.loaded.tokenizer(texts, padding=True, truncation=True, max_length=max_len, return_tensors="pt")
        return _features(model.get_text_features(input_ids=enc["input_ids"].to(self.device),
                                                 attention_mask=enc["attention_mask"].to(self.device)))


class OpenClipTeacher:
    """An open_clip model (`open_clip:ARCH/PRETRAINED` or `open_clip:FOLDER`, extra siclip[mobileclip]) with
    its own image preprocessing and tokenizer: the embeddings are its encode_image / encode_text."""

    def __init__(self, spec: str, device: str):
        self.model, self.preprocess, self.tokenizer = load_open_clip(spec, "teacher")
        # half precision on a GPU, as the transformers teachers run; embeddings are stored in half precision anyway
        self.dtype = torch.float16 if device.startswith("cuda") else torch.float32
        self.model.to(device=device, dtype=self.dtype)
        self.device, self.model_id, self.revision = device, spec, None
        with torch.inference_mode():
            self.dim = int(self.text_features(["a"]).shape[-1])

    def prepare(self, images: list) -> torch.Tensor:
        return torch.stack([self.preprocess(image) for image in images])

    def image_features(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.model.encode_image(pixels.to(self.device, self.dtype))

    def text_features(self, texts: list[str]) -> torch.Tensor:
        return self.model.encode_text(self.tokenizer(texts).to(self.device))


class TeacherEnsemble:
    """One or more CLIP teachers; each image is preprocessed by every teacher's own preprocessing."""

    def __init__(self, teachers: list, device: str):
        self.teachers, self.device = teachers, device
        self.dims = [t.dim for t in teachers]
        self.dim = sum(self.dims)

    def describe(self) -> list[dict]:
        return [{"id": t.model_id, "revision": t.revision, "dim": t.dim} for t in self.teachers]

    def prepare(self, images: list) -> list[torch.Tensor] | None:
        if not images:
            return None
        return [t.prepare(images) for t in self.teachers]

    @torch.inference_mode()
    def embed_images(self, pixels: list[torch.Tensor]) -> torch.Tensor:
        return ensemble_embedding([t.image_features(px).cpu() for t, px in zip(self.teachers, pixels)])

    @torch.inference_mode()
    def embed_texts(self, texts: list[str]) -> torch.Tensor:
        return ensemble_embedding([t.text_features(texts).cpu() for t in self.teachers])


def load_teacher(name: str, device: str, seed: int, trust_remote_code: bool):
    """A teacher by name: `open_clip:…` through open_clip, anything else through transformers (or `tiny`)."""
    if name.startswith(OPEN_CLIP):
        check_device(device)
        return OpenClipTeacher(name, device)
    return TransformersTeacher(load_clip(name, device, seed, trust_remote_code), device)


def build_teachers(names: list[str], device: str, seed: int, trust_remote_code: bool, threads: int = 0) -> TeacherEnsemble:
    if threads:
        torch.set_num_threads(threads)
    return TeacherEnsemble([load_teacher(n, device, seed, trust_remote_code) for n in names], device)
