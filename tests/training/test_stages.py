"""What a stage takes over from the run and from the stages before it: the tensors `inherit_freeze` keeps
frozen, the pair-matching term's own parameters, the teacher's logit scale for CRD. Real `siclip train` runs
on small real shards."""

from __future__ import annotations

import json
import math
import os
import signal
from pathlib import Path

import pytest
import torch

from siclip_testing import siclip
from siclip.training.inherit import INHERITED
from train_helpers import assert_same_end, make_root, weights

SMALL_MODEL = ['image.image_size=16', 'image.patch_size=8', 'image.width=32', 'image.depth=2', 'image.heads=2',
               'image.share_attention=[[1, 2]]', 'text.width=32', 'text.depth=2', 'text.heads=2',
               'text.share_attention=[[1, 2]]', 'text.context_length=16', 'embed_dim=16']


def small_model(seed: int):
    from siclip.training.config import load_train_config
    from siclip.training.model import build_model, load_config

    overrides = load_train_config({"model_set": SMALL_MODEL, "stages": [{"steps": 1}]}).model_overrides()
    torch.manual_seed(seed)
    return build_model(load_config("tiny", overrides))


def train(root, tmp_path: Path, out: str, body: str, env=None, check=True):
    cfg = tmp_path / f"{out}.toml"
    cfg.write_text(f"model_set = {json.dumps(SMALL_MODEL)}\nbatch_size = 8\nworkers = 0\nsynthetic_captions = 0\n"
                   f"record_keys = true\n{body}")
    return siclip("train", "--data", root.root, "--config", cfg, "--out", out, check=check, env=env)


def stage(name: str, steps: int, extra: str = "", lr: float = 1e-3, **loss) -> str:
    terms = "".join(f"{k} = {v}\n" for k, v in {"clip_web": 1.0, "clip_synthetic": 0.0, **loss}.items())
    return f"[[stages]]\nname = '{name}'\nsteps = {steps}\nlr = {lr}\n{extra}\n[stages.loss]\n{terms}"


def test_inherit_freeze_holds_the_inherited_tensors_through_the_first_stage_only_and_never_logit_scale(tmp_path):
    root = make_root(tmp_path / "data", [16, 16])
    teacher = small_model(seed=7).save_pretrained(tmp_path / "teacher")
    body = (f"inherit_from = '{teacher}'\ninherit_freeze = true\ncheckpoint_every = 2\nkeep_checkpoints = 3\n"
            + stage("frozen", 3, pm=0.1) + stage("thawed", 2, pm=0.1))  # pm: the loss has a gradient before the fix too
    train(root, tmp_path, "run", body)
    run = root.runs / "run"
    report = json.loads((run / "inherit_report.json").read_text())
    inherited = {t["name"] for t in report["tensors"] if t["how"] in INHERITED}
    assert "logit_scale" in inherited  # copied from the teacher, and still it trains
    start, after_first, end = weights(teacher), weights(run / "checkpoints" / "step-000002"), weights(run / "final")
    stored = (inherited - {"logit_scale"}) & set(start)  # a tensor shared by several layers is stored once
    assert all(torch.equal(after_first[n], start[n]) for n in stored), "the first stage trained an inherited tensor"
    assert not torch.equal(after_first["logit_scale"], start["logit_scale"]), "logit_scale was frozen"
    thawed = [n for n in stored if not torch.equal(end[n], start[n])]
    assert len(thawed) > len(stored) // 2, "the second stage's globs (train = ['*']) did not unfreeze them"
    assert {t["name"] for t in report["tensors"] if t["frozen"]} == inherited - {"logit_scale"}
    # killed in the first stage after a checkpoint, the resumed run reads what stays frozen from the report (and
    # the PM term both stages share is saved and restored)
    res = train(root, tmp_path, "killed", body, check=False, env={**os.environ, "SICLIP_FAILPOINT": "logged:step-000003"})
    assert res.returncode == -signal.SIGKILL
    siclip("train", "--data", root.root, "--config", tmp_path / "killed.toml", "--out", "killed", "--resume")
    assert_same_end(run, root.runs / "killed")


def test_crd_compares_with_the_teachers_own_logit_scale_where_it_is_known(tmp_path):
    import torch.nn.functional as F
    from transformers import CLIPModel

    from siclip_testing import save_tiny
    from siclip.training.config import load_train_config
    from siclip.training.objective import Features, load_teacher, stage_objectives

    root = make_root(tmp_path / "data", [8], teacher_views=0)
    own = small_model(seed=7)
    with torch.no_grad():
        own.logit_scale.fill_(math.log(30.0))
    folder = own.save_pretrained(tmp_path / "teacher")
    clip_dir = save_tiny("clip", tmp_path / "tiny_clip")
    crd_stage = {"steps": 1, "loss": {"crd": 1.0}}
    cfg = load_train_config({"model_set": SMALL_MODEL, "stages": [
        {"name": "siclip", "teacher": str(folder), **crd_stage},
        {"name": "clipmodel", "teacher": str(clip_dir), **crd_stage},
        {"name": "sidecar", "teacher": "sidecar", **crd_stage}]})
    teachers = {s.name: load_teacher(s.teacher, root) for s in cfg.stages}
    objectives = stage_objectives(cfg.stages, 16, teachers, cfg.pm_k)
    assert objectives["siclip"].crd.teacher_scale == pytest.approx(30.0)
    assert objectives["clipmodel"].crd.teacher_scale == pytest.approx(
        float(CLIPModel.from_pretrained(clip_dir).logit_scale.exp()))
    assert objectives["sidecar"].crd.teacher_scale == 100.0  # sidecars record no scale
    assert objectives["clipmodel"].crd.teacher_scale < 50  # CLIP's initial 1/0.07, far from the default
    # a student that is its teacher, temperature included, has nothing to learn from CRD
    image, text = F.normalize(torch.randn(8, 16), dim=-1), F.normalize(torch.randn(8, 16), dim=-1)
    same = Features(image, text, torch.zeros(8, 0, 16), torch.zeros(8, 0, dtype=torch.bool), image, text)
    assert objectives["siclip"](same, torch.tensor(30.0))["crd"].item() == pytest.approx(0, abs=1e-5)
    assert objectives["sidecar"](same, torch.tensor(30.0))["crd"].item() > 0.01


def test_the_pair_matching_hyperplane_goes_on_from_stage_to_stage(tmp_path):
    from siclip.training.config import load_train_config
    from siclip.training.objective import stage_objectives

    stages = load_train_config({"stages": [{"name": n, "steps": 1, "loss": {"pm": pm}} for n, pm in
                                           (("a", 0.1), ("no-pm", 0.0), ("b", 0.1))]}).stages
    objectives = stage_objectives(stages, 16, {s.name: None for s in stages})
    assert objectives["a"].pm is objectives["b"].pm and objectives["no-pm"].pm is None
    assert len(list(objectives.parameters())) == 2  # the optimizer sees one t and one b

    # a real run: stage b learns at a vanishing rate, so it ends where it started, which is where stage a ended
    root = make_root(tmp_path / "data", [16, 16])
    train(root, tmp_path, "run", "checkpoint_every = 2\nkeep_checkpoints = 3\n"
          + stage("a", 2, pm=0.1) + stage("b", 2, lr=1e-9, pm=0.1))
    checkpoints = root.runs / "run" / "checkpoints"

    def pm_values(step: int) -> dict[str, float]:  # the loss terms' parameters, as save_state keeps them
        saved = torch.load(checkpoints / f"step-{step:06d}" / "accelerate" / "custom_checkpoint_0.pkl")
        return {k: float(v) for k, v in saved.items() if ".pm." in k}

    after_a, after_b = pm_values(2), pm_values(4)
    assert after_a["a.pm.log_scale"] != pytest.approx(math.log(10.0), abs=1e-4)  # stage a trained it
    assert after_a["a.pm.bias"] != pytest.approx(-10.0, abs=1e-4)
    for name, value in after_b.items():
        term = name.rsplit(".", 1)[1]
        assert value == pytest.approx(after_a[f"a.pm.{term}"], abs=1e-6), f"{name} started afresh in stage b"
