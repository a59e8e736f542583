"""How `siclip train` chooses its mixed precision: precision = "auto" takes the one Accelerate was given, a named one
wins. Real `siclip train` runs on small real shards."""

from __future__ import annotations

import json
import os
from pathlib import Path

from siclip_testing import siclip
from train_helpers import make_root, small_config


def train(root, cfg: Path, out: str, *extra, check=True, env=None):
    return siclip("train", "--data", root.root, "--config", cfg, "--out", out, *extra, check=check, env=env)


def test_precision_auto_takes_the_mixed_precision_accelerate_was_given_and_a_named_one_wins(tmp_path):
    root = make_root(tmp_path / "data", [16, 16])
    cfg = small_config(tmp_path / "c.toml")
    plain = {k: v for k, v in os.environ.items() if k != "ACCELERATE_MIXED_PRECISION"}
    given = {**plain, "ACCELERATE_MIXED_PRECISION": "bf16"}  # what `accelerate launch --mixed_precision bf16` sets
    for out, sets, env, precision, why in (
            ("given", [], given, "bf16", "Accelerate's: ACCELERATE_MIXED_PRECISION=bf16"),
            ("named", ["--set", "precision=no"], given, "no", "precision = 'no' in the config"),
            ("plain", [], plain, "no", "siclip's for this device")):  # this CPU: fp32
        res = train(root, cfg, out, *sets, env=env)
        assert f"train: mixed precision {precision}, {why}" in res.stderr
        assert json.loads((root.runs / out / "data.json").read_text())["precision"] == precision
