"""The Makefile's verbs run in the user's environment: a hub model is reachable from `make captions` unless the user
turns the hub off; the tests turn it off by themselves."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.skipif(shutil.which("make") is None, reason="needs GNU make")


def make_env_seen(target: str, tmp_path: Path, **env_extra: str) -> dict[str, str]:
    """Run `make TARGET` with the siclip command and the venv's python replaced by a script that prints the
    environment it was started with; `install` is taken as done."""
    fake = tmp_path / "fake"
    fake.write_text("#!/bin/sh\nenv\n")
    fake.chmod(0o755)
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "WANDB_MODE", "MAKEFLAGS")}
    env.update(env_extra)
    out = subprocess.run(["make", "-s", "-C", str(ROOT), "-o", "install", target, f"SICLIP={fake}", f"PY={fake}",
                          "DATA=data/none"], env=env, capture_output=True, text=True, check=True).stdout
    return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)


@pytest.mark.parametrize("target", ["captions", "teacher", "train", "shards"])
def test_user_verbs_reach_the_hub_unless_the_user_says_otherwise(target, tmp_path):
    seen = make_env_seen(target, tmp_path)
    assert "HF_HUB_OFFLINE" not in seen and "WANDB_MODE" not in seen
    assert seen.get("NO_ALBUMENTATIONS_UPDATE") == "1"
    assert make_env_seen(target, tmp_path, HF_HUB_OFFLINE="1").get("HF_HUB_OFFLINE") == "1"

