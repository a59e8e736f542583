"""The SiCLIP losses, each a small module with one call shape:

    loss = term(image_features, text_features, logit_scale,
                teacher_image_features=None, teacher_text_features=None)  # -> scalar tensor

- `image_features`, `text_features`: the student's embeddings, (N, D), L2-normalised
  (`SiCLIP.encode_image` / `encode_text`); row i of each is a matching pair.
- `logit_scale`: the student's multiplier exp(logit_scale) (`SiCLIP.scale()`), a tensor.
- `teacher_*`: the teacher's embeddings of the same batch, (N, D_t); required by the
  distillation terms, ignored by the others. The distillation terms L2-normalise them
  first: their scales (CRD's teacher temperature, ICL's logits, FD's floor) assume unit
  vectors, whatever the teacher or sidecar gives.

Terms: `ClipLoss` (InfoNCE both ways), `PairMatchingLoss` (METHOD §5),
`FeatureDistillLoss` (FD), `ContrastiveRelationDistillLoss` (CRD),
`InteractiveContrastiveLoss` (ICL). Terms with learnable parameters (PM's hyperplane,
FD's and ICL's projections) are modules: hand their parameters to the optimizer.

Several captions per image (web + synthetic) are the caller's business: call a term
once per caption set with the same image features and add the results, as the total
objective of METHOD does (L_CLIP(web) + L_CLIP(synthetic) + ...). Rows of one call must
be distinct images, or duplicates would count as negatives of each other.

Several processes: build a term with `gather=True` and every process passes its local
batch; the term all-gathers student and teacher features (with gradient) before anything
else, projections included, and computes the loss over the global batch. Each process then
holds the same loss value and the same gradient for the term's own parameters (the exact
one), and, after the usual gradient averaging of data-parallel training, the exact gradient
of the model too.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


class _GatherWithGradient(torch.autograd.Function):
    """all_gather whose backward hands each process the sum, over processes, of the gradient of its own rows.

    Every process computes the same loss from the gathered rows, so the sum is world × the
    gradient of that loss: averaging the processes' parameter gradients (data parallelism) then
    gives the exact gradient of the global loss. The backward all-reduces and slices, which
    gloo (CPU) supports, where reduce_scatter would not be.
    """

    @staticmethod
    def forward(ctx, x):
        import torch.distributed as dist

        parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, x.contiguous())
        ctx.rank, ctx.rows = dist.get_rank(), len(x)
        return torch.cat(parts)

    @staticmethod
    def backward(ctx, grad):
        import torch.distributed as dist

        grad = grad.contiguous().clone()
        dist.all_reduce(grad)
        return grad[ctx.rank * ctx.rows:(ctx.rank + 1) * ctx.rows]


def gather_features(*tensors: torch.Tensor | None) -> list[torch.Tensor | None]:
    """Concatenate each tensor across processes (rows of process 0 first), keeping gradients; identity on one
    process. Every process must pass the same number of rows."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return list(tensors)
    return [None if t is None else _GatherWithGradient.apply(t) for t in tensors]


def _labels(n: int, device) -> torch.Tensor:
    return torch.arange(n, device=device)


def _teacher(image, text, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The teacher's features, checked present and L2-normalised."""
    if image is None or text is None:
        raise ValueError(f"{name} needs teacher_image_features and teacher_text_features")
    return F.normalize(image, dim=-1), F.normalize(text, dim=-1)


class _Term(nn.Module):
    def __init__(self, gather: bool = False):
        super().__init__()
        self.gather = gather

    def _maybe_gather(self, *tensors):
        return gather_features(*tensors) if self.gather else list(tensors)


class ClipLoss(_Term):
    """InfoNCE both ways: ½·[CE(s·I·Tᵀ, diag) + CE(s·T·Iᵀ, diag)] with s = logit_scale."""

    def forward(self, image_features, text_features, logit_scale, teacher_image_features=None,
                teacher_text_features=None):
        image_features, text_features = self._maybe_gather(image_features, text_features)
        logits = logit_scale * image_features @ text_features.T
        labels = _labels(len(logits), logits.device)
        return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2


class PairMatchingLoss(_Term):
    """Pair matching (METHOD §5): a learnable hyperplane z = t·cos + b separates matching from non-matching pairs.

    Binary cross-entropy with label 1 on each matching pair and label 0 on its k hardest
    (most similar) in-batch negatives, once per row (image → texts) and once per column
    (text → images):  for each anchor a, ℓ_a = softplus(−z_pos) + mean_{k hardest} softplus(z_neg);
    the loss is the mean of ℓ over all rows and columns. `k=None` (or k ≥ N−1) uses every
    negative, a balanced SigLIP-like term. `logit_scale` is not used: t and b are this
    term's own parameters (t stored as log t, init t = 10, b = −10 as in SigLIP).
    """

    def __init__(self, k: int | None = 8, init_scale: float = 10.0, init_bias: float = -10.0, gather: bool = False):
        super().__init__(gather)
        if k is not None and k < 1:
            raise ValueError(f"k must be a positive number of negatives or None for all, got {k}")
        self.k = k
        self.log_scale = nn.Parameter(torch.tensor(float(init_scale)).log())
        self.bias = nn.Parameter(torch.tensor(float(init_bias)))

    def _per_anchor(self, z: torch.Tensor, cos: torch.Tensor) -> torch.Tensor:
        """ℓ for each row of z: the diagonal is the positive, the k most similar others the negatives."""
        n = len(z)
        off_diagonal = ~torch.eye(n, dtype=torch.bool, device=z.device)
        positive = F.softplus(-z.diagonal())
        k = n - 1 if self.k is None else min(self.k, n - 1)
        if k == 0:
            return positive
        # Hardness is judged on cos (detached choice), the loss on z; the diagonal is never picked.
        hardness = cos.detach().masked_fill(~off_diagonal, float("-inf"))
        hardest = hardness.topk(k, dim=1).indices
        negative = F.softplus(z.gather(1, hardest)).mean(dim=1)
        return positive + negative

    def forward(self, image_features, text_features, logit_scale=None, teacher_image_features=None,
                teacher_text_features=None):
        image_features, text_features = self._maybe_gather(image_features, text_features)
        cos = image_features @ text_features.T
        z = self.log_scale.exp() * cos + self.bias
        return torch.cat([self._per_anchor(z, cos), self._per_anchor(z.T, cos.T)]).mean()


class FeatureDistillLoss(_Term):
    """FD: MSE between the student's embedding, projected to the teacher's width and L2-normalised, and the teacher's.

    One learned projection per modality; the loss is the mean of the image and text MSEs
    (mean over elements). With equal widths the projections start as the identity.
    """

    def __init__(self, student_dim: int, teacher_dim: int, gather: bool = False):
        super().__init__(gather)
        self.image_proj = nn.Linear(student_dim, teacher_dim, bias=False)
        self.text_proj = nn.Linear(student_dim, teacher_dim, bias=False)
        if student_dim == teacher_dim:
            for proj in (self.image_proj, self.text_proj):
                nn.init.eye_(proj.weight)

    def forward(self, image_features, text_features, logit_scale=None, teacher_image_features=None,
                teacher_text_features=None):
        teacher_image_features, teacher_text_features = _teacher(teacher_image_features, teacher_text_features,
                                                                 "FeatureDistillLoss")
        # gathered before the projections: every process computes their gradient from the whole batch
        image_features, text_features, teacher_image_features, teacher_text_features = self._maybe_gather(
            image_features, text_features, teacher_image_features, teacher_text_features)
        image = F.normalize(self.image_proj(image_features), dim=-1)
        text = F.normalize(self.text_proj(text_features), dim=-1)
        return (F.mse_loss(image, teacher_image_features) + F.mse_loss(text, teacher_text_features)) / 2


CRD_TEACHER_SCALE = 100.0  # where a teacher's own is unknown: the scale CLIP teachers end training with


class ContrastiveRelationDistillLoss(_Term):
    """CRD: KL(teacher ‖ student) of the image→text and text→image similarity distributions, averaged.

    Teacher logits use `teacher_scale`: the teacher's own exp(logit_scale) where the caller knows
    it, else 100 (as CLIP teachers end training with); the student its own logit_scale. KL is
    summed over the batch's candidates and averaged over anchors.
    """

    def __init__(self, teacher_scale: float = CRD_TEACHER_SCALE, gather: bool = False):
        super().__init__(gather)
        self.teacher_scale = teacher_scale

    def forward(self, image_features, text_features, logit_scale, teacher_image_features=None,
                teacher_text_features=None):
        teacher_image_features, teacher_text_features = _teacher(teacher_image_features, teacher_text_features,
                                                                 "ContrastiveRelationDistillLoss")
        image_features, text_features, teacher_image_features, teacher_text_features = self._maybe_gather(
            image_features, text_features, teacher_image_features, teacher_text_features)
        student = logit_scale * image_features @ text_features.T
        teacher = self.teacher_scale * teacher_image_features @ teacher_text_features.T

        def kl(s, t):
            return F.kl_div(F.log_softmax(s, dim=1), F.log_softmax(t, dim=1), log_target=True, reduction="batchmean")

        return (kl(student, teacher) + kl(student.T, teacher.T)) / 2


class InteractiveContrastiveLoss(_Term):
    """ICL: InfoNCE between student images and teacher texts, and between student texts and teacher images.

    ½·[CE(s·I_s·T_tᵀ, diag) + CE(s·T_s·I_tᵀ, diag)]. When the widths differ, learned
    projections map the student's embeddings to the teacher's width (then re-normalised).
    """

    def __init__(self, student_dim: int | None = None, teacher_dim: int | None = None, gather: bool = False):
        super().__init__(gather)
        needs_projection = student_dim is not None and teacher_dim is not None and student_dim != teacher_dim
        self.image_proj = nn.Linear(student_dim, teacher_dim, bias=False) if needs_projection else nn.Identity()
        self.text_proj = nn.Linear(student_dim, teacher_dim, bias=False) if needs_projection else nn.Identity()

    def forward(self, image_features, text_features, logit_scale, teacher_image_features=None,
                teacher_text_features=None):
        teacher_image_features, teacher_text_features = _teacher(teacher_image_features, teacher_text_features,
                                                                 "InteractiveContrastiveLoss")
        # gathered before the projections: every process computes their gradient from the whole batch
        image, text, teacher_image, teacher_text = self._maybe_gather(
            image_features, text_features, teacher_image_features, teacher_text_features)
        image = F.normalize(self.image_proj(image), dim=-1)
        text = F.normalize(self.text_proj(text), dim=-1)
        labels = _labels(len(image), image.device)
        image_to_teacher_text = logit_scale * image @ teacher_text.T
        text_to_teacher_image = logit_scale * text @ teacher_image.T
        return (F.cross_entropy(image_to_teacher_text, labels) + F.cross_entropy(text_to_teacher_image, labels)) / 2
