"""CLIP teachers: image and text embeddings, unit length.

An ensemble's embedding is each teacher's L2-normalised embedding, concatenated, then normalised
again: the concatenation of T unit vectors has length √T, and the distillation losses assume unit
vectors. The dot product of two such embeddings is the mean of the teachers' cosines.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from captioning.models import LoadedModel, load_clip


def _features(out) -> torch.Tensor:
    # transformers 5 returns a model output whose pooler_output is the projected embedding; 4.x a tensor
    return out if isinstance(out, torch.Tensor) else out.pooler_output


def ensemble_embedding(per_teacher: list[torch.Tensor]) -> torch.Tensor:
    """Normalise each teacher's embeddings, concatenate, normalise the whole: the mean-cosine ensemble."""
    unit = [F.normalize(e.float(), dim=-1) for e in per_teacher]
    return F.normalize(torch.cat(unit, dim=-1), dim=-1)


class TeacherEnsemble:
    """One or more CLIP models; each image is preprocessed by every teacher's own processor."""

    def __init__(self, teachers: list[LoadedModel], device: str):
        self.teachers, self.device = teachers, device
        self.dims = [int(t.model.config.projection_dim) for t in teachers]
        self.dim = sum(self.dims)

    def describe(self) -> list[dict]:
        return [{"id": t.model_id, "revision": t.revision, "dim": d} for t, d in zip(self.teachers, self.dims)]

    def prepare(self, images: list) -> list[torch.Tensor] | None:
        if not images:
            return None
        return [t.image_processor(images=images, return_tensors="pt")["pixel_values"] for t in self.teachers]

    @torch.inference_mode()
    def embed_images(self, pixels: list[torch.Tensor]) -> torch.Tensor:
        outs = []
        for t, px in zip(self.teachers, pixels):
            dtype = next(t.model.parameters()).dtype
            outs.append(_features(t.model.get_image_features(pixel_values=px.to(self.device, dtype))).cpu())
        return ensemble_embedding(outs)

    @torch.inference_mode()
    def embed_texts(self, texts: list[str]) -> torch.Tensor:
        outs = []
        for t in self.teachers:
            max_len = int(getattr(t.model.config.text_config, "max_position_embeddings", 77))
            enc = t.tokenizer(texts, padding=True, truncation=True, max_length=max_len, return_tensors="pt")
            outs.append(_features(t.model.get_text_features(input_ids=enc["input_ids"].to(self.device),
                                                            attention_mask=enc["attention_mask"].to(self.device))).cpu())
        return ensemble_embedding(outs)


def build_teachers(names: list[str], device: str, seed: int, trust_remote_code: bool, threads: int = 0) -> TeacherEnsemble:
    if threads:
        torch.set_num_threads(threads)
    return TeacherEnsemble([load_clip(n, device, seed, trust_remote_code) for n in names], device)
