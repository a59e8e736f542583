"""siclip bench captions --quick: the figures it reports exist and are consistent."""

from __future__ import annotations

import pytest

from captioning.bench import bench_captions


def test_quick_bench_reports_ratio_rate_and_bytes_per_caption():
    res = bench_captions(quick=True)
    assert {"ratio", "images_per_s", "bytes_per_caption"} <= set(res)
    assert res["images_per_s"] > 0 and res["bytes_per_caption"] > 0
    assert res["ratio"] == res["tiny"]["images_per_s"] / res["tiny"]["pipeline_images_per_s"]
    tiny = res["tiny"]
    assert tiny["sidecar_bytes"] == pytest.approx(res["bytes_per_caption"] * tiny["images"] * 3)
    # steady state excludes model loading and cluster start; end to end includes them
    assert tiny["end_to_end_images_per_s"] < tiny["images_per_s"]
