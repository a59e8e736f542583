"""`python -m bench days`: the counts README's days-to-train table is built from."""

from __future__ import annotations

import importlib.util

import pytest

from bench.days import bench_days


def test_the_record_counts_both_towers_flops_and_the_loader_rate_and_says_why_a_preset_is_left_out():
    figures = bench_days(quick=True)
    tiny = figures["flops"]["tiny"]
    assert tiny["gflop_per_sample"] == pytest.approx(tiny["image_gflop"] + tiny["text_gflop"], abs=0.011)
    assert tiny["image_gflop"] > 0 and tiny["text_gflop"] > 0
    assert tiny["captions_per_image"] == 2  # the web caption and tiny.toml's one synthetic caption
    loader = figures["loader"]
    assert loader["samples_per_cpu_second"] > 0
    assert loader["cpu_ms_per_sample"] == pytest.approx(1000 / loader["samples_per_cpu_second"], rel=0.01)
    paper = figures["flops"]["paper"]
    if importlib.util.find_spec("timm") is None:
        assert "siclip[mobileclip]" in paper["skipped"]
    else:
        assert paper["model"] == "s0" and paper["gflop_per_sample"] > tiny["gflop_per_sample"]
