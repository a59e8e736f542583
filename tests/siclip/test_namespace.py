"""One import name: siclip's four folders import as siclip.manifests, siclip.pipeline, siclip.captioning and
siclip.training, so a user's own modules of those names shadow nothing of ours, and ours shadow nothing of theirs."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_a_users_own_training_and_pipeline_modules_shadow_nothing(tmp_path):
    (tmp_path / "training.py").write_text("WHO = 'the user'\n")
    (tmp_path / "pipeline").mkdir()
    (tmp_path / "pipeline" / "__init__.py").write_text("WHO = 'the user'\n")
    (tmp_path / "manifests.py").write_text("raise ImportError('the user module was imported')\n")
    code = ("import training, pipeline\n"
            "import siclip.training.model, siclip.pipeline.urls, siclip.captioning.config, siclip.manifests.layout\n"
            "from siclip.cli import build_parser\n"
            "build_parser()\n"
            "print(training.WHO == pipeline.WHO == 'the user', siclip.training.model.__file__)\n")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    res = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, env=env,
                         timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
    users_modules_seen, model_file = res.stdout.split()
    assert users_modules_seen == "True"
    assert Path(model_file) == REPO / "training" / "model.py"


def test_the_command_runs_as_a_module_and_its_help_loads_no_torch():
    code = ("import sys\nfrom siclip.cli import build_parser\nbuild_parser()\n"
            "print(sorted(m for m in ('torch', 'img2dataset', 'distributed', 'transformers') if m in sys.modules))\n")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert res.returncode == 0 and res.stdout.strip() == "[]", res.stderr[-2000:]
    res = subprocess.run([sys.executable, "-m", "siclip", "--help"], capture_output=True, text=True, env=env,
                         timeout=120)
    assert res.returncode == 0 and "shards" in res.stdout and "train" in res.stdout
