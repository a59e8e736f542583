"""`siclip bench blocks --json`: SAS-P with sharing against pre-LN, both towers, measured in one run."""

import json
import math

from training.bench import bench_blocks

KEYS = {"param_ratio", "inference_speedup", "train_step_speedup"}


def test_quick_bench_reports_ratios_for_both_towers(capsys):
    result = bench_blocks(quick=True)
    assert KEYS <= set(result) and KEYS <= set(result["image"])
    for tower in (result, result["image"]):
        assert 0.7 < tower["param_ratio"] < 0.85  # no value/output projections, attention shared in pairs
        assert all(math.isfinite(tower[k]) and tower[k] > 0 for k in ("inference_speedup", "train_step_speedup"))
    json.dumps(result)  # the CLI prints it as JSON
    table = capsys.readouterr().err
    assert "text" in table and "image" in table and "inference" in table
