"""One training step: the stages on the step axis and what each trains, AdamW's groups, and the loss and its
gradients over the whole batch with gradient caching.

Gradient caching (`micro_batch`): the embeddings of the whole per-process batch are computed
without activations, micro-batch by micro-batch; the loss over the gathered global batch and its
gradient with respect to those embeddings follow; each micro-batch is then recomputed with
activations and the embedding gradients pushed through it. Every contrastive term sees the
whole batch while activations are held for one micro-batch at a time.

Several processes (`accelerate launch`): the objective gathers features from every process, so
each holds the same loss; the model is not wrapped in DDP (its all-reduce would fire once per
micro-batch); instead the gradients of the model and of the loss terms' own parameters are
averaged once per step, which gives every process the gradient of the global loss.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn as nn

from siclip.training.config import StageConfig, match_globs
from siclip.training.evaluate import to_input
from siclip.training.objective import Features, Objective


def chunks(n: int, size: int) -> list[slice]:
    return [slice(i, min(i + size, n)) for i in range(0, n, size)]


def student_inputs(batch: dict, device, mean, std):
    """(normalised pixels, every caption's token ids: web then the valid synthetic ones, synthetic validity)."""
    valid = batch["syn_valid"]
    texts = torch.cat([batch["text"], batch["syn_text"][valid]])
    return to_input(batch["pixels"].to(device), mean, std), texts.to(device), valid.to(device)


def assemble(image: torch.Tensor, texts: torch.Tensor, valid: torch.Tensor, teacher: dict | None) -> Features:
    """Split the caption embeddings back into web (B, D) and synthetic (B, k, D) with zeros where there is none."""
    B = len(image)
    syn = texts.new_zeros(*valid.shape, texts.shape[-1])
    syn[valid] = texts[B:]
    return Features(image, texts[:B], syn, valid, **(teacher or {}))


def forward_backward(model, objective: Objective, pixels, texts, valid, teacher: dict | None, micro: int,
                     accelerator) -> dict[str, torch.Tensor]:
    """The stage's loss over the whole batch and its gradients, holding activations for `micro` images (and `micro`
    captions) at a time; `micro` 0, or at least the batch's images, is one plain forward and backward."""
    scale = model.scale()
    if not micro or micro >= len(pixels):  # no gradient caching: the batch, captions and all, fits
        with accelerator.autocast():
            image, text = model.encode_image(pixels), model.encode_text(texts)
        terms = objective(assemble(image.float(), text.float(), valid, teacher), scale)
        accelerator.backward(terms["loss"])
        return terms
    with torch.no_grad(), accelerator.autocast(), batchnorm_statistics_kept(model):
        image = torch.cat([model.encode_image(pixels[s]) for s in chunks(len(pixels), micro)]).float()
        text = torch.cat([model.encode_text(texts[s]) for s in chunks(len(texts), micro)]).float()
    image.requires_grad_(True)
    text.requires_grad_(True)
    terms = objective(assemble(image, text, valid, teacher), scale)
    accelerator.backward(terms["loss"])  # gradients of the loss terms' own parameters, logit_scale, and the embeddings
    for encode, inputs, cached in ((model.encode_image, pixels, image), (model.encode_text, texts, text)):
        for s in chunks(len(inputs), micro):
            with accelerator.autocast():
                out = encode(inputs[s])
            if not out.requires_grad:  # a tower frozen whole has nothing to learn from its embeddings' gradient
                break
            out.float().backward(cached.grad[s])
    return terms


@contextmanager
def batchnorm_statistics_kept(model: nn.Module):
    """BatchNorm running statistics as they were before the block: the pass without gradients of gradient
    caching sees every micro-batch once more, and must not count it twice (MCi0 has BatchNorm)."""
    kept = [(m, [b.clone() for b in m.buffers(recurse=False)]) for m in model.modules()
            if isinstance(m, BATCH_NORMS) and m.training and m.track_running_stats]
    try:
        yield
    finally:
        for m, buffers in kept:
            for b, before in zip(m.buffers(recurse=False), buffers):
                b.copy_(before)


def frozen_batchnorm_to_eval(model: nn.Module) -> int:
    """BatchNorm layers whose parameters are all frozen run in eval mode, so their running statistics stay as
    they are too (a frozen module is left bit-identical); returns how many. Call after `model.train()`."""
    n = 0
    for m in model.modules():
        params = list(m.parameters(recurse=False))
        if isinstance(m, BATCH_NORMS) and params and not any(p.requires_grad for p in params):
            m.eval()
            n += 1
    return n


BATCH_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)


def average_gradients(params: list[nn.Parameter], world: int) -> None:
    """Every process ends with the mean of the processes' gradients (one all-reduce per step)."""
    if world == 1:
        return
    import torch.distributed as dist

    grads = [p.grad for p in params if p.grad is not None]
    flat = torch.cat([g.reshape(-1) for g in grads])  # one buffer, one all-reduce
    dist.all_reduce(flat)
    flat /= world
    for g, mean in zip(grads, flat.split([g.numel() for g in grads])):
        g.copy_(mean.view_as(g))


def decay_groups(params: list[tuple[str, nn.Parameter]], weight_decay: float) -> list[dict]:
    """AdamW's groups: weight decay on weight matrices and tables; none on gains, biases, norms, logit_scale."""
    decay = [p for n, p in params if p.ndim >= 2 and "logit_scale" not in n]
    rest = [p for n, p in params if not (p.ndim >= 2 and "logit_scale" not in n)]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": rest, "weight_decay": 0.0}]


@dataclass
class StageSpan:
    """A stage placed on the step axis: steps [start, end)."""

    index: int
    cfg: StageConfig
    start: int
    end: int

    def lr(self, step: int) -> float:
        """Linear warm-up to the stage's peak, then cosine to min_lr (or constant)."""
        s, local, length = self.cfg, step - self.start, self.end - self.start
        if local < s.warmup_steps:
            return s.lr * (local + 1) / s.warmup_steps
        if s.schedule == "constant" or length <= s.warmup_steps:
            return s.lr
        progress = (local - s.warmup_steps) / (length - s.warmup_steps)
        return s.min_lr + 0.5 * (s.lr - s.min_lr) * (1 + math.cos(math.pi * progress))


def place_stages(stages: list[StageConfig], steps_per_epoch: int) -> list[StageSpan]:
    spans, start = [], 0
    for i, s in enumerate(stages):
        length = s.steps or max(1, round(s.epochs * steps_per_epoch))
        spans.append(StageSpan(i, s, start, start + length))
        start += length
    return spans


def set_trainable(model: nn.Module, stage: StageConfig, frozen_inherited: set[str]) -> tuple[int, int]:
    """requires_grad per the stage's globs (a tensor shared by several layers trains if any of its names is
    listed in `train` and none in `freeze` or `frozen_inherited`); returns (trainable, all) parameter counts."""
    named = list(model.named_parameters(remove_duplicate=False))
    names = [n for n, _ in named]
    train, freeze = match_globs(names, stage.train), match_globs(names, stage.freeze)
    by_tensor: dict[int, tuple[nn.Parameter, list[str]]] = {}
    for n, p in named:
        by_tensor.setdefault(id(p), (p, []))[1].append(n)
    trainable = total = 0
    for p, tensor_names in by_tensor.values():
        on = any(n in train for n in tensor_names) and not any(n in freeze or n in frozen_inherited
                                                                for n in tensor_names)
        p.requires_grad_(on)
        total += p.numel()
        trainable += p.numel() if on else 0
    return trainable, total
