"""One training step on fixed tensors, the same in a test process and under `accelerate launch`:
a small SiCLIP, every loss term on (teacher of another width, so FD and ICL have projections),
some rows without synthetic captions. Run as a script, it writes rank 0's and rank 1's gradients."""

from __future__ import annotations

import sys

import torch

from siclip.training.config import LossWeights, StageConfig
from siclip.training.step import ddp_settings, forward_backward, prepare_model, set_trainable
from siclip.training.model import build_model, load_config
from siclip.training.objective import Objective

GLOBAL_BATCH, K, TEACHER_DIM = 8, 2, 24
WEIGHTS = LossWeights(clip_web=1.0, clip_synthetic=0.5, pm=0.3, fd=2.0, crd=1.0, icl=1.0)
IMAGE_ONLY = ["visual.*", "logit_scale"]  # a stage that freezes the text tower whole


def small_model():
    torch.manual_seed(0)
    config = load_config("tiny", {"image.image_size": 16, "image.patch_size": 8, "image.width": 32, "image.depth": 2,
                                  "image.heads": 2, "text.width": 32, "text.depth": 2, "text.heads": 2,
                                  "text.context_length": 12, "embed_dim": 16, "image.share_attention": [[1, 2]],
                                  "text.share_attention": [[1, 2]]})
    model = build_model(config)
    # Away from the identity initialisation, where all embeddings are nearly alike: there the hardest
    # negatives of PM are near-ties, and a last-bit difference between chunkings would pick another one.
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p), alpha=0.05)
    torch.manual_seed(1)
    return model, Objective(WEIGHTS, 16, TEACHER_DIM, pm_k=3)


def global_batch():
    """Pixels, caption token ids and teacher embeddings of the whole global batch (rows without a synthetic caption)."""
    g = torch.Generator().manual_seed(2)
    pixels = torch.randn(GLOBAL_BATCH, 3, 16, 16, generator=g)
    web = torch.randint(1, 49400, (GLOBAL_BATCH, 12), generator=g)
    syn = torch.randint(1, 49400, (GLOBAL_BATCH, K, 12), generator=g)
    web[:, -1] = syn[..., -1] = 49407
    valid = torch.ones(GLOBAL_BATCH, K, dtype=torch.bool)
    valid[1, 0] = valid[5, :] = valid[6, 1] = False
    teacher = {"t_image": torch.randn(GLOBAL_BATCH, TEACHER_DIM, generator=g),
               "t_text": torch.randn(GLOBAL_BATCH, TEACHER_DIM, generator=g),
               "t_syn": torch.randn(GLOBAL_BATCH, K, TEACHER_DIM, generator=g), "t_syn_valid": valid.clone()}
    return pixels, web, syn, valid, teacher


def step_gradients(rank: int, world: int, micro: int, accelerator, grad_checkpointing: bool = False,
                   train: list[str] | None = None):
    """(loss terms, {name: gradient}) of this process's share of the global batch, the model prepared as the loop
    prepares it (DDP under several processes); `train`: a stage's globs, set after wrapping, as the loop does."""
    model, objective = small_model()
    model.set_grad_checkpointing(grad_checkpointing)
    prepared = prepare_model(model, accelerator)
    if train:
        set_trainable(model, StageConfig(train=train), frozen_inherited=set())
    pixels, web, syn, valid, teacher = global_batch()
    rows = slice(rank * GLOBAL_BATCH // world, (rank + 1) * GLOBAL_BATCH // world)
    texts = torch.cat([web[rows], syn[rows][valid[rows]]])
    terms = forward_backward(prepared, objective, pixels[rows], texts, valid[rows],
                             {k: v[rows] for k, v in teacher.items()}, micro, accelerator)
    named = list(model.named_parameters()) + [(f"objective.{n}", p) for n, p in objective.named_parameters()]
    return {k: float(v.detach()) for k, v in terms.items()}, {n: p.grad.clone() for n, p in named if p.grad is not None}


def term_gradients(rank: int, world: int):
    """Each loss term built with gather=True on this process's rows of fixed features: {term: (loss, {param: grad})},
    with no gradient averaging: the terms' own parameters must get the exact gradient on every process."""
    from siclip.training.losses import (ContrastiveRelationDistillLoss, FeatureDistillLoss, InteractiveContrastiveLoss,
                                 PairMatchingLoss)

    g = torch.Generator().manual_seed(3)
    image, text = (torch.nn.functional.normalize(torch.randn(GLOBAL_BATCH, 16, generator=g), dim=-1) for _ in "it")
    t_image, t_text = (torch.nn.functional.normalize(torch.randn(GLOBAL_BATCH, TEACHER_DIM, generator=g), dim=-1)
                       for _ in "it")
    rows = slice(rank * GLOBAL_BATCH // world, (rank + 1) * GLOBAL_BATCH // world)
    out = {}
    for name, make in (("pm", lambda: PairMatchingLoss(k=3, gather=True)),
                       ("fd", lambda: FeatureDistillLoss(16, TEACHER_DIM, gather=True)),
                       ("crd", lambda: ContrastiveRelationDistillLoss(gather=True)),
                       ("icl", lambda: InteractiveContrastiveLoss(16, TEACHER_DIM, gather=True))):
        torch.manual_seed(4)
        term = make()
        mine = [x[rows].clone().requires_grad_(True) for x in (image, text)]  # the student's side carries gradient
        loss = term(*mine, torch.tensor(20.0), t_image[rows], t_text[rows])
        loss.backward()
        out[name] = (float(loss), {n: p.grad.clone() for n, p in term.named_parameters()})
    return out


if __name__ == "__main__":
    from accelerate import Accelerator

    accelerator = Accelerator(kwargs_handlers=ddp_settings())
    rank, world = accelerator.process_index, accelerator.num_processes
    terms, grads = step_gradients(rank, world, int(sys.argv[2]), accelerator)
    image_only = step_gradients(rank, world, int(sys.argv[2]), accelerator, train=IMAGE_ONLY)
    torch.save({"terms": terms, "grads": grads, "image_only": image_only, "loss_terms": term_gradients(rank, world)},
               f"{sys.argv[1]}.rank{rank}.pt")
