"""One training step: the stages on the step axis and what each trains, AdamW's groups, and the loss and its
gradients over the whole batch with gradient caching.

Gradient caching (`micro_batch`): the embeddings of the whole per-process batch are computed
without activations, micro-batch by micro-batch; the loss over the gathered global batch and its
gradient with respect to those embeddings follow; each micro-batch is then recomputed with
activations and the embedding gradients pushed through it. Every contrastive term sees the
whole batch while activations are held for one micro-batch at a time.

Several processes (`accelerate launch`): the objective gathers features from every process, so
each holds the same loss. The model goes through `accelerator.prepare` (DDP), and as in open_clip's
accumulation every recomputed micro-batch but the last runs under `accelerator.no_sync`: DDP
averages the model's gradients once per step, which gives every process the gradient of the global
loss. The loss terms' own parameters live in the objective, outside DDP; every process already
holds their gradient of the global loss, and one small mean keeps them equal to the last bit.
"""

from __future__ import annotations

import math
from contextlib import contextmanager, nullcontext
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


def ddp_settings() -> list:
    """Accelerator's kwargs_handlers for the model's DDP. find_unused_parameters: a stage's frozen parameters, and
    in gradient caching's last pass the other tower, get no gradient in the pass that syncs; broadcast_buffers off:
    each process keeps its own BatchNorm statistics, as on one process."""
    from accelerate import DistributedDataParallelKwargs

    return [DistributedDataParallelKwargs(find_unused_parameters=True, broadcast_buffers=False)]


def prepare_model(model: nn.Module, accelerator) -> nn.Module:
    """The model through accelerator.prepare: on the device, and in DDP under several processes (which starts every
    process from process 0's weights). DDP registers the parameters that require grad when it wraps: all of them
    here, once; a stage's frozen ones are then its unused parameters (rather than wrapping again at each stage)."""
    for p in model.parameters():
        p.requires_grad_(True)
    return accelerator.prepare(model)


def forward_backward(model, objective: Objective, pixels, texts, valid, teacher: dict | None, micro: int,
                     accelerator) -> dict[str, torch.Tensor]:
    """The stage's loss over the whole batch and every process's gradient of it, holding activations for `micro`
    images (and `micro` captions) at a time; `micro` 0, or at least the batch's images, is one plain forward and
    backward. `model` as `prepare_model` gives it."""
    if not micro or micro >= len(pixels):  # no gradient caching: the batch, captions and all, fits
        with accelerator.autocast():
            image, text, scale = model(pixels, texts)
        terms = objective(assemble(image.float(), text.float(), valid, teacher), scale)
        accelerator.backward(terms["loss"])
        average_objective_gradients(objective, accelerator)
        return terms
    with torch.no_grad(), accelerator.autocast(), batchnorm_statistics_kept(model):
        image = torch.cat([model(pixels[s], None)[0] for s in chunks(len(pixels), micro)]).float()
        text = torch.cat([model(None, texts[s])[1] for s in chunks(len(texts), micro)]).float()
    image.requires_grad_(True)
    text.requires_grad_(True)
    plain = accelerator.unwrap_model(model)
    terms = objective(assemble(image, text, valid, teacher), plain.scale())
    accelerator.backward(terms["loss"])  # gradients of the loss terms' own parameters, logit_scale, and the embeddings
    average_objective_gradients(objective, accelerator)
    # each micro-batch again with activations, its embeddings' gradient pushed through; a tower frozen whole has
    # nothing to learn from it. Only the last pass syncs: DDP averages every gradient accumulated until then (with
    # no tower training there is nothing to average: logit_scale's gradient, like the loss terms', is the global one)
    replays = [(tower, inputs[s], cached.grad[s])
               for tower, (inputs, cached, module) in enumerate(((pixels, image, plain.visual),
                                                                (texts, text, plain.text)))
               if any(p.requires_grad for p in module.parameters()) for s in chunks(len(inputs), micro)]
    for i, (tower, inputs, grad) in enumerate(replays):
        with accelerator.no_sync(model) if i < len(replays) - 1 else nullcontext():
            with accelerator.autocast():
                out = model(*((inputs, None) if tower == 0 else (None, inputs)))[tower]
            out.float().backward(grad)
    return terms


def average_objective_gradients(objective: nn.Module, accelerator) -> None:
    """The mean over processes of the loss terms' own gradients (they live outside the model's DDP). Each process
    computed them from the same gathered batch, so the mean changes no value; it keeps the processes' copies
    equal to the last bit where a device's kernels are not deterministic."""
    if accelerator.num_processes == 1:
        return
    params = [p for p in objective.parameters() if p.grad is not None]
    for p, mean in zip(params, accelerator.reduce([p.grad for p in params], reduction="mean")):
        p.grad = mean


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


def decay_groups(params: list[tuple[str, nn.Parameter]], weight_decay: float) -> list[dict]:
    """AdamW's groups: weight decay on weight matrices and tables; none on gains, biases, norms, logit_scale."""
    decay = [p for n, p in params if p.ndim >= 2 and "logit_scale" not in n]
    rest = [p for n, p in params if not (p.ndim >= 2 and "logit_scale" not in n)]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": rest, "weight_decay": 0.0}]


def adamw(groups: list[dict], lr: float, betas=(0.9, 0.999), eps: float = 1e-8, fused: bool = True):
    """torch's AdamW, with its fused kernel (one kernel over every tensor) where this torch has one for the
    parameters' device: CUDA, and the CPU from torch 2.4. The same update; on 2 CPU cores the step of `tiny`'s
    7.6M parameters takes 2.7 ms fused against 27 ms (`python -m bench gpu --parts levers`: adamw_step_ms)."""
    if fused:
        try:
            return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps, fused=True)
        except RuntimeError:  # "`fused=True` requires all the params to be floating point Tensors of supported devices"
            pass
    return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps)


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
