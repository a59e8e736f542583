"""One stage's total loss (METHOD, 'The total objective') and the teachers that feed its distillation terms.

    L = λ_web·L_CLIP(web) + λ_syn·L_CLIP(synthetic) + λ_PM·L_PM + λ_FD·L_FD + λ_CRD·L_CRD + λ_ICL·L_ICL

A batch offers each image with its web caption and k sampled synthetic captions (some rows have
none: their captioning failed). Each caption slot is a *caption set*: the web captions, then
synthetic slot 1..k over the rows that have one. CLIP(synthetic) is the mean over the synthetic
sets; PM and the distillation terms are the mean over every set they can use. Features are
gathered from every process first, so each term sees the global batch.

Teachers give L2-normalised embeddings of the same batch: `sidecar` reads them from the teacher
sidecars (precomputed, "reinforced" data); a siclip run or checkpoint, a transformers CLIPModel
(folder or hub name) or an open_clip model (extra siclip[mobileclip]) compute them online.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace

import torch
import torch.nn as nn
import torch.nn.functional as F

from siclip import teachers
from siclip.manifests.errors import SiclipError
from siclip.training.config import LossWeights
from siclip.training.losses import (CRD_TEACHER_SCALE, ClipLoss, ContrastiveRelationDistillLoss, FeatureDistillLoss,
                             InteractiveContrastiveLoss, PairMatchingLoss, gather_features)


@dataclass
class Features:
    """Embeddings of one batch: the student's (with gradient) and the teacher's (without)."""

    image: torch.Tensor  # (B, D)
    text: torch.Tensor  # (B, D): the web captions
    syn: torch.Tensor  # (B, k, D): the synthetic captions, zeros where there is none
    syn_valid: torch.Tensor  # (B, k) bool
    t_image: torch.Tensor | None = None  # (B, Dt)
    t_text: torch.Tensor | None = None  # (B, Dt)
    t_syn: torch.Tensor | None = None  # (B, k, Dt)
    t_syn_valid: torch.Tensor | None = None  # (B, k) bool

    def gathered(self) -> "Features":
        """Every tensor concatenated across processes (the student's keep their gradient)."""
        names = [f.name for f in fields(self)]
        values = [getattr(self, n) for n in names]
        masks = {n for n, v in zip(names, values) if v is not None and v.dtype == torch.bool}
        values = [v.to(torch.uint8) if n in masks else v for n, v in zip(names, values)]
        out = gather_features(*values)
        return Features(**{n: (v.bool() if n in masks else v) for n, v in zip(names, out)})


def caption_sets(f: Features):
    """(rows, student text, teacher rows, teacher text) per caption set; rows None means every row."""
    sets = [(None, f.text, None, f.t_text)]
    for j in range(f.syn.shape[1]):
        rows = f.syn_valid[:, j]
        if f.t_syn is None:
            sets.append((rows, f.syn[:, j], None, None))
        else:
            sets.append((rows, f.syn[:, j], rows & f.t_syn_valid[:, j], f.t_syn[:, j]))
    return sets


def _rows(x: torch.Tensor | None, rows: torch.Tensor | None):
    return x if x is None or rows is None else x[rows]


def _enough(rows: torch.Tensor | None) -> bool:
    """A contrastive term needs two rows at least (one negative)."""
    return rows is None or int(rows.sum()) >= 2


class Objective(nn.Module):
    """The weighted sum of one stage's loss terms; holds the terms' own parameters (PM's hyperplane,
    FD's and ICL's projections), which the optimizer trains with the model. `teacher_scale`: the
    teacher's own exp(logit_scale) for CRD's teacher logits, where known."""

    def __init__(self, weights: LossWeights, embed_dim: int, teacher_dim: int | None = None, pm_k: int = 8,
                 teacher_scale: float | None = None, pm: PairMatchingLoss | None = None):
        super().__init__()
        self.weights = weights
        self.clip = ClipLoss()
        if weights.pm > 0:  # `pm`: a term shared with other stages, else one of its own
            self.pm = pm if pm is not None else PairMatchingLoss(k=pm_k or None)
        else:
            self.pm = None
        distill = teacher_dim is not None
        self.fd = FeatureDistillLoss(embed_dim, teacher_dim) if distill and weights.fd > 0 else None
        self.crd = ContrastiveRelationDistillLoss(teacher_scale or CRD_TEACHER_SCALE) \
            if distill and weights.crd > 0 else None
        self.icl = InteractiveContrastiveLoss(embed_dim, teacher_dim) if distill and weights.icl > 0 else None

    def forward(self, f: Features, logit_scale: torch.Tensor) -> dict[str, torch.Tensor]:
        """{'loss': the weighted total, term: its unweighted value} over the gathered batch."""
        f = f.gathered()
        if f.t_image is not None:
            f = replace(f, t_image=F.normalize(f.t_image.float(), dim=-1), t_text=F.normalize(f.t_text.float(), dim=-1),
                        t_syn=None if f.t_syn is None else F.normalize(f.t_syn.float(), dim=-1))
        w, terms = self.weights, {}
        sets = caption_sets(f)
        if w.clip_web > 0:
            terms["clip_web"] = self.clip(f.image, f.text, logit_scale)
        synthetic = [self.clip(f.image[rows], text[rows], logit_scale) for rows, text, _, _ in sets[1:] if _enough(rows)]
        if w.clip_synthetic > 0 and synthetic:
            terms["clip_synthetic"] = torch.stack(synthetic).mean()
        if self.pm is not None:
            terms["pm"] = torch.stack([self.pm(_rows(f.image, r), _rows(t, r)) for r, t, _, _ in sets
                                       if _enough(r)]).mean()
        for name in ("fd", "crd", "icl"):
            term = getattr(self, name)
            if term is None:
                continue
            values = [term(_rows(f.image, r), _rows(t, r), logit_scale, _rows(f.t_image, r), _rows(tt, r))
                      for _, t, r, tt in sets if tt is not None and _enough(r)]
            if values:
                terms[name] = torch.stack(values).mean()
        terms["loss"] = sum(getattr(w, k) * v for k, v in terms.items())
        return terms


def stage_objectives(stages, embed_dim: int, teachers: dict, pm_k: int = 8) -> nn.ModuleDict:
    """Each stage's Objective by stage name, against that stage's teacher (`teachers`: name -> Teacher or None).

    Every stage with a PM term shares one: its hyperplane is the run's, and goes on from where the stage before
    left it. FD's and ICL's projections stay each stage's own (they map to that stage's teacher). The shared
    term appears under each stage's name in the state dict (torch.save stores a shared tensor once)."""
    pm = PairMatchingLoss(k=pm_k or None) if any(s.loss.pm > 0 for s in stages) else None
    out = {}
    for s in stages:
        teacher = teachers[s.name]
        out[s.name] = Objective(s.loss, embed_dim, teacher.dim if teacher else None, pm_k,
                                teacher_scale=teacher.logit_scale if teacher else None, pm=pm)
    return nn.ModuleDict(out)


# ----------------------------------------------------------------------------- teachers


def pixels_to_input(pixels: torch.Tensor, size: int, mean, std) -> torch.Tensor:
    """uint8 (B, 3, H, W) to a normalised float batch at size x size (resized when it differs)."""
    x = pixels.float().div_(255)
    if x.shape[-1] != size:
        x = F.interpolate(x, size=(size, size), mode="bicubic", antialias=True, align_corners=False).clamp_(0, 1)
    mean = torch.tensor(mean, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(std, device=x.device).view(1, 3, 1, 1)
    return (x - mean) / std


class Teacher:
    """Gives the teacher's embeddings of a batch; `image_size` > 0 when it needs the batch's teacher view."""

    name: str = "teacher"
    dim: int = 0
    image_size: int = 0
    logit_scale: float | None = None  # its own exp(logit_scale), where known: CRD's teacher scale

    def embed(self, batch: dict, device) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def _online(self, batch: dict, device, encode_image, encode_text) -> dict[str, torch.Tensor]:
        pixels = batch["teacher_pixels"].to(device)
        image = F.normalize(encode_image(pixels).float(), dim=-1)
        text = F.normalize(encode_text(batch["web"]).float(), dim=-1)
        valid = batch["syn_valid"].to(device)
        syn = torch.zeros(*valid.shape, self.dim, device=device)
        flat = [c for caps in batch["synthetic"] for c in caps]
        if flat:
            syn[valid] = F.normalize(encode_text(flat).float(), dim=-1)
        return {"t_image": image, "t_text": text, "t_syn": syn, "t_syn_valid": valid}

    def to(self, device):
        return self


class SidecarTeacher(Teacher):
    """Embeddings precomputed by `siclip teacher` and joined by the loader. The sidecars record no logit scale
    (an ensemble, whose embeddings are concatenated, has none of its own), so CRD uses its default."""

    def __init__(self, dim: int, description: str):
        self.dim, self.name = dim, description

    def embed(self, batch, device):
        return {k: batch[k].to(device) for k in ("t_image", "t_text", "t_syn", "t_syn_valid")}


class OnlineTeacher(Teacher):
    """A teacher with siclip/teachers.py's interface (transformers, open_clip, or a siclip run), run on the batch's
    teacher view."""

    def __init__(self, teacher: teachers.Teacher):
        self.teacher = teacher
        self.name, self.dim, self.logit_scale = teacher.name, teacher.dim, teacher.logit_scale
        self.image_size = teacher.image_size

    def to(self, device):
        self.teacher.to(device)
        return self

    @torch.no_grad()
    def embed(self, batch, device):
        t = self.teacher
        return self._online(batch, device,
                            lambda px: t.image_features(pixels_to_input(px, t.image_size, t.mean, t.std)),
                            t.text_features)


def sidecar_dim(root) -> tuple[int, str]:
    """(embedding width, description) of the teacher sidecars, from the teacher manifest."""
    from siclip.manifests.manifest import StageManifest
    from siclip.manifests.samples import read_sidecar

    manifest = StageManifest.load(root, "teacher")
    for entry in manifest.entries.values():
        for rel in entry.files:
            _, info = read_sidecar(root.abs(rel))
            names = ", ".join(t.get("id", "?") for t in info.get("teachers", []))
            return int(info["dim"]), f"teacher sidecars ({names})"
    raise SiclipError(f"teacher = 'sidecar' but {root.manifest_path('teacher')} lists no sidecar "
                      f"(run 'siclip teacher --data {root.root}' first)")


def load_teacher(spec: str, root) -> Teacher | None:
    """The teacher a stage names (siclip/teachers.py's grammar), loaded now so that a bad one stops the run
    before training starts."""
    parsed = teachers.parse_teacher(spec, root)
    if parsed.kind == "none":
        return None
    if parsed.kind == "sidecar":
        return SidecarTeacher(*sidecar_dim(root))
    return OnlineTeacher(teachers.load_teacher(parsed))
