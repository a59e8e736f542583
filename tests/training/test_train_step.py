"""One step of the loop: gradient caching and several processes give the gradients of one big batch."""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from accelerate import Accelerator

from siclip_testing import REPO
from step_helpers import GLOBAL_BATCH, IMAGE_ONLY, WEIGHTS, global_batch, small_model, step_gradients, term_gradients
from siclip.training.step import StageSpan, forward_backward, set_trainable
from siclip.training.config import StageConfig
from siclip.manifests.errors import SiclipError

HERE = Path(__file__).parent


@pytest.fixture(scope="module")
def accelerator():
    return Accelerator(cpu=True)


@pytest.fixture(scope="module")
def one_big_batch(accelerator):
    return step_gradients(0, 1, GLOBAL_BATCH, accelerator)


def assert_same_gradients(got, want, atol=1e-6):
    terms, grads = got
    want_terms, want_grads = want
    assert set(terms) == set(want_terms) == {"loss", "clip_web", "clip_synthetic", "pm", "fd", "crd", "icl"}
    for k in terms:
        assert terms[k] == pytest.approx(want_terms[k], rel=1e-5, abs=1e-6), k
    assert set(grads) == set(want_grads)
    for name, g in want_grads.items():
        torch.testing.assert_close(grads[name], g, atol=atol, rtol=1e-4, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("micro", [1, 3])
def test_gradient_caching_gives_the_gradients_of_one_big_batch(accelerator, one_big_batch, micro):
    got = step_gradients(0, 1, micro, accelerator)
    assert_same_gradients(got, one_big_batch)
    # and the loss terms' own parameters (PM's hyperplane, the projections) were reached
    assert {"objective.pm.bias", "objective.fd.image_proj.weight", "objective.icl.text_proj.weight"} <= set(got[1])


def test_gradient_checkpointing_changes_memory_not_gradients(accelerator, one_big_batch, monkeypatch):
    import torch.utils.checkpoint as ckpt

    calls, real = [], ckpt.checkpoint
    monkeypatch.setattr(ckpt, "checkpoint", lambda *a, **k: calls.append(1) or real(*a, **k))
    assert_same_gradients(step_gradients(0, 1, 3, accelerator, grad_checkpointing=True), one_big_batch)
    assert len(calls) == 2 * (3 + 7)  # both towers' two blocks, per recomputed chunk (3 of images, 7 of captions)


def test_two_real_processes_give_the_loss_and_gradients_of_one_process(tmp_path, one_big_batch):
    out = tmp_path / "grads"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), str(HERE), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1", "ACCELERATE_USE_CPU": "true"}
    # torchrun starts the processes; Accelerate finds them from the environment (gloo on the CPU)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--rdzv_backend", "c10d",
           "--rdzv_endpoint", "127.0.0.1:0", str(HERE / "step_helpers.py"), str(out), "2"]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=240, env=env, cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    ranks = [torch.load(f"{out}.rank{r}.pt") for r in (0, 1)]
    for r in ranks:  # each process holds the global loss and the same, exact gradients
        assert_same_gradients((r["terms"], r["grads"]), one_big_batch, atol=2e-6)
    # a stage that freezes the text tower (after DDP wrapped the model): the image tower's last micro-batch syncs
    image_only = step_gradients(0, 1, GLOBAL_BATCH, Accelerator(cpu=True), train=IMAGE_ONLY)
    assert not any(name.startswith("text.") for name in image_only[1])
    for r in ranks:
        assert_same_gradients(r["image_only"], image_only, atol=2e-6)
    # the loss terms on their own (gather=True, no averaging): their parameters get the exact gradient everywhere
    single = term_gradients(0, 1)
    assert set(single) == {"pm", "fd", "crd", "icl"} and all(grads for _, grads in (single["pm"], single["fd"]))
    for r in ranks:
        for name, (loss, grads) in single.items():
            got_loss, got = r["loss_terms"][name]
            assert got_loss == pytest.approx(loss, rel=1e-6), name
            for param, g in grads.items():
                torch.testing.assert_close(got[param], g, atol=1e-6, rtol=1e-5, msg=lambda m: f"{name}.{param}: {m}")


def test_logit_scale_keeps_its_gradient_past_the_cap_and_is_clamped_after_the_step(accelerator):
    model, objective = small_model()
    with torch.no_grad():
        model.logit_scale.fill_(math.log(150.0))
    pixels, web, syn, valid, teacher = global_batch()
    texts = torch.cat([web, syn[valid]])
    forward_backward(model, objective, pixels, texts, valid, teacher, 8, accelerator)
    assert model.logit_scale.grad is not None and model.logit_scale.grad.abs() > 0
    model.clamp_logit_scale_()
    assert model.scale().item() == pytest.approx(100.0)


def test_stage_globs_choose_what_trains_and_a_shared_attention_follows_any_of_its_names():
    model, _ = small_model()
    trainable, total = set_trainable(model, StageConfig(train=["text.*", "logit_scale"], freeze=["text.token_embed.*"]),
                                     frozen_inherited=set())
    on = {n for n, p in model.named_parameters() if p.requires_grad}
    assert "logit_scale" in on and "text.token_embed.weight" not in on
    assert not any(n.startswith("visual.") for n in on) and trainable < total
    # blocks 0 and 1 share one attention: naming block 1's copy trains the shared tensor
    set_trainable(model, StageConfig(train=["text.blocks.1.attn.*"]), frozen_inherited=set())
    assert model.text.blocks[0].attn.q.weight.requires_grad
    with pytest.raises(SiclipError, match="module glob 'text.blockz.*' matches no parameter"):
        set_trainable(model, StageConfig(train=["text.blockz.*"]), frozen_inherited=set())


def test_the_schedule_warms_up_then_follows_a_cosine_to_min_lr():
    span = StageSpan(0, StageConfig(lr=1e-3, min_lr=1e-5, warmup_steps=10, steps=110), 100, 210)
    assert span.lr(100) == pytest.approx(1e-4) and span.lr(109) == pytest.approx(1e-3)
    assert span.lr(110) == pytest.approx(1e-3) and span.lr(160) == pytest.approx((1e-3 + 1e-5) / 2)
    assert span.lr(209) == pytest.approx(1e-5, abs=1e-6)
    assert all(span.lr(s) >= span.lr(s + 1) for s in range(110, 209))


def test_weights_are_the_objective_the_stage_asks_for(accelerator):
    # the total is the weighted sum of the reported terms
    terms, _ = step_gradients(0, 1, GLOBAL_BATCH, accelerator)
    total = sum(getattr(WEIGHTS, k) * v for k, v in terms.items() if k != "loss")
    assert terms["loss"] == pytest.approx(total, rel=1e-6)


class _TowersWithBatchNorm(torch.nn.Module):
    """A two-tower model with BatchNorm in the image tower (as MCi0 has), the interface the loop uses."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.visual = torch.nn.Sequential(torch.nn.Linear(12, 16), torch.nn.BatchNorm1d(16), torch.nn.Linear(16, 8))
        self.text = torch.nn.Embedding(100, 8)
        self.logit_scale = torch.nn.Parameter(torch.tensor(2.0))

    def forward(self, x, ids):
        if x is None or ids is None:
            return (None if x is None else self.encode_image(x), None if ids is None else self.encode_text(ids), None)
        return self.encode_image(x), self.encode_text(ids), self.scale()

    def encode_image(self, x):
        return torch.nn.functional.normalize(self.visual(x), dim=-1)

    def encode_text(self, ids):
        return torch.nn.functional.normalize(self.text(ids).mean(dim=1), dim=-1)

    def scale(self):
        return self.logit_scale.exp()


def test_batchnorm_statistics_count_each_sample_once_with_caching_and_stay_put_when_frozen(accelerator):
    from siclip.training.config import LossWeights
    from siclip.training.step import frozen_batchnorm_to_eval
    from siclip.training.objective import Objective

    objective = Objective(LossWeights(clip_web=1.0, clip_synthetic=0.0), 8)
    x, ids, valid = torch.randn(8, 12), torch.randint(0, 100, (8, 5)), torch.zeros(8, 0, dtype=torch.bool)
    bn_stats = {}
    for micro in (8, 2):  # without and with gradient caching: the running statistics move the same way
        model = _TowersWithBatchNorm().train()
        forward_backward(model, objective, x, ids, valid, None, micro, accelerator)
        bn = model.visual[1]
        bn_stats[micro] = (bn.running_mean.clone(), int(bn.num_batches_tracked))
    assert bn_stats[2][1] == 4  # four micro-batches, each counted once (not twice)
    model = _TowersWithBatchNorm().train()
    set_trainable(model, StageConfig(train=["text.*", "logit_scale"]), frozen_inherited=set())
    assert frozen_batchnorm_to_eval(model) == 1
    before = {k: v.clone() for k, v in model.visual.state_dict().items()}
    forward_backward(model, objective, x, ids, valid, None, 2, accelerator)
    assert all(torch.equal(before[k], v) for k, v in model.visual.state_dict().items())


@pytest.mark.parametrize("micro, passes", [(0, 1), (GLOBAL_BATCH, 1), (GLOBAL_BATCH // 2, 2)])
def test_without_gradient_caching_each_tower_runs_once_per_step_whatever_the_captions(accelerator, micro, passes):
    """micro_batch 0 (or the whole batch) is one plain pass, though the captions (web + synthetic) outnumber the
    images; gradient caching is the pass without gradients and the recomputation (it once ran for every
    run with synthetic captions, 25% slower)."""
    model, objective = small_model()
    pixels, web, syn, valid, teacher = global_batch()
    texts = torch.cat([web, syn[valid]])
    assert len(texts) > len(pixels)
    calls = {"image": 0, "text": 0}
    for tower, attr in (("image", "visual"), ("text", "text")):
        getattr(model, attr).register_forward_hook(lambda *_, t=tower: calls.__setitem__(t, calls[t] + 1))
    forward_backward(model, objective, pixels, texts, valid, teacher, micro, accelerator)
    chunks = -(-len(pixels) // micro) if passes > 1 else 1
    text_chunks = -(-len(texts) // micro) if passes > 1 else 1
    assert calls == {"image": passes * chunks, "text": passes * text_chunks}


def test_adamw_takes_the_fused_kernel_where_torch_has_one_and_the_same_steps_otherwise(monkeypatch):
    from siclip.training import step

    def run(fused: bool) -> tuple[torch.optim.Optimizer, torch.Tensor]:
        torch.manual_seed(0)
        w = torch.nn.Parameter(torch.randn(4, 3))
        opt = step.adamw([{"params": [w], "weight_decay": 0.1}], lr=1e-2, betas=(0.9, 0.98), eps=1e-6, fused=fused)
        for _ in range(3):
            w.grad = torch.ones_like(w)
            opt.step()
        return opt, w.detach()

    fused, w_fused = run(True)
    plain, w_plain = run(False)
    assert fused.defaults["fused"] is True and not plain.defaults["fused"]
    assert torch.allclose(w_fused, w_plain, atol=1e-6)  # one AdamW, two kernels
    real = torch.optim.AdamW

    def no_fused_kernel(*args, fused=None, **kwargs):  # as torch before 2.4 answers for parameters on the CPU
        if fused:
            raise RuntimeError("`fused=True` requires all the params to be floating point Tensors of supported devices")
        return real(*args, **kwargs)

    monkeypatch.setattr(torch.optim, "AdamW", no_fused_kernel)
    fallback, w_fallback = run(True)
    assert not fallback.defaults["fused"] and torch.equal(w_fallback, w_plain)
