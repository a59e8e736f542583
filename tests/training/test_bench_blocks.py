"""`siclip bench blocks --json`: the ratios it reports are those of its own raw timings and of the towers'
parameter counts, counted here on towers built independently from the shapes it reports."""

import json

import pytest

from training.bench import bench_blocks
from training.model import ImageTowerConfig, TextTowerConfig, TextTransformer, VisionTransformer, count_parameters


def _towers(kind: str, shape: dict) -> dict:
    """Pre-LN, and SAS-P sharing attention 1<->2, 3<->4, ... at the reported shape."""
    dims = {k: v for k, v in shape.items() if k != "batch"}
    pairs = [[i, i + 1] for i in range(1, dims["depth"], 2)]
    if kind == "text":
        return {b: TextTransformer(TextTowerConfig(**dims, block=b, share_attention=pairs if b == "sasp" else []), 512)
                for b in ("preln", "sasp")}
    return {b: VisionTransformer(ImageTowerConfig(**dims, patch_size=16, block=b,
                                                  share_attention=pairs if b == "sasp" else []), 512)
            for b in ("preln", "sasp")}


def test_quick_bench_ratios_are_its_timings_and_the_towers_parameter_counts(capsys):
    result = bench_blocks(quick=True)
    json.dumps(result)  # the CLI prints it as JSON
    for kind, r in (("text", result), ("image", result["image"])):
        towers = _towers(kind, r["shape"])
        blocks = {b: count_parameters(t.blocks) for b, t in towers.items()}
        whole = {b: count_parameters(t) for b, t in towers.items()}
        assert r["params"] == blocks
        assert r["param_ratio"] == pytest.approx(blocks["sasp"] / blocks["preln"])
        assert r["param_ratio_tower"] == pytest.approx(whole["sasp"] / whole["preln"])
        assert 0.7 < r["param_ratio"] < 0.85  # no value/output projections, attention shared in pairs
        # speed-ups: the baseline's median time over SAS-P's, from the raw medians it returns
        t = r["seconds"]
        assert all(t[b][what] > 0 for b in ("preln", "sasp") for what in ("infer", "train"))
        assert r["inference_speedup"] == pytest.approx(t["preln"]["infer"] / t["sasp"]["infer"])
        assert r["train_step_speedup"] == pytest.approx(t["preln"]["train"] / t["sasp"]["train"])
        assert r["repeats"] >= 3
    table = capsys.readouterr().err
    assert "text" in table and "image" in table and f"inference x{result['inference_speedup']:.3f}" in table
