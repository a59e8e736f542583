"""`python -m bench train`: its memory measure is exact on graphs of known size, and gradient caching holds flat."""

from __future__ import annotations

import torch

from bench.train import SavedActivations, _activation_memory, _loader_rate, make_bench_root


def test_saved_activations_counts_what_autograd_holds_and_frees():
    x = torch.randn(1000, requires_grad=True)
    with SavedActivations() as saved:
        y = x.exp()  # saves its result: 4,000 bytes
        z = (y * 3).sum()  # multiplying by a constant saves nothing of size
        assert saved.now == 4000
        w = x.sin()  # saves x: 4,000 bytes more
        assert saved.now == 8000
        (z + w.sum()).backward()
        del y, z, w
        assert saved.now == 0
    assert saved.peak == 8000


def test_gradient_caching_holds_one_micro_batch_of_activations_whatever_the_batch():
    micro = 4
    plain_micro = _activation_memory(micro, micro)
    plain_big = _activation_memory(8 * micro, 8 * micro)
    cached_big = _activation_memory(8 * micro, micro)
    assert plain_big > 6 * plain_micro  # without caching, activations grow with the batch ...
    assert cached_big <= 1.3 * plain_micro  # ... with it they stay at one micro-batch's
    assert _activation_memory(16 * micro, micro) <= 1.05 * cached_big


def test_the_loader_rate_is_measured_on_real_batches(tmp_path):
    from siclip.training.config import load_train_config

    root = make_bench_root(tmp_path / "data", shards=2, per_shard=24, size=48)
    cfg = load_train_config("tiny", ["batch_size=8", "workers=1", "shuffle_buffer=16"])
    rate, batch = _loader_rate(cfg, root, 4)
    assert rate > 0 and batch["pixels"].shape == (8, 3, 64, 64) and batch["syn_valid"].all()
