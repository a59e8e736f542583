"""A run's folder stays inside its data root: its cleanups (half-written checkpoints, old ones) never
delete through a link that leads elsewhere, and `--out` cannot name a folder outside the root."""

from __future__ import annotations

import json

import pytest

from siclip.manifests.errors import SiclipError
from siclip.manifests.layout import DataRoot
from siclip.manifests.manifest import StageManifest
from siclip.training.runs import STATE, Run, checkpoint_name, run_folder


def _checkpoint(folder, step: int):
    ck = folder / checkpoint_name(step)
    ck.mkdir(parents=True)
    (ck / "model.safetensors").write_bytes(b"weights")
    (ck / STATE).write_text(json.dumps({"step": step}))
    return ck


def test_out_outside_the_root_is_refused(tmp_path):
    root = DataRoot(tmp_path / "data")
    for out in (tmp_path / "elsewhere", root.root / "runs" / ".." / ".." / "elsewhere"):
        with pytest.raises(SiclipError, match="a run lives inside its data root"):
            Run.at(root, out)
    assert Run.at(root, "name").path == root.runs / "name"


def test_reconcile_never_deletes_through_a_linked_checkpoints_folder(tmp_path):
    root = DataRoot(tmp_path / "data")
    run = Run.at(root, "r")
    elsewhere = tmp_path / "elsewhere"
    (elsewhere / ".tmp-step-000001").mkdir(parents=True)  # what reconcile removes when it is the run's own
    run.path.mkdir(parents=True)
    run.checkpoints_dir.symlink_to(elsewhere)
    with pytest.raises(SiclipError, match="outside the data root"):
        run.reconcile(log=lambda msg: None)
    assert (elsewhere / ".tmp-step-000001").is_dir()


def test_dropping_old_checkpoints_never_deletes_through_a_link(tmp_path):
    root = DataRoot(tmp_path / "data")
    run = Run.at(root, "r")
    mine = [_checkpoint(run.checkpoints_dir, s) for s in (2, 3)]
    run.reconcile(log=lambda msg: None)
    manifest = root.manifest_path("train").read_bytes()
    theirs = _checkpoint(tmp_path / "elsewhere", 1)
    (run.checkpoints_dir / theirs.name).symlink_to(theirs)  # the oldest "checkpoint" is a link out
    with pytest.raises(SiclipError, match="outside the data root"):
        run.reconcile(log=lambda msg: None)  # neither hashed nor recorded
    with pytest.raises(SiclipError, match="outside the data root"):
        run.drop_old(keep=1, after_write=True)
    assert (theirs / "model.safetensors").read_bytes() == b"weights"
    assert all(ck.is_dir() for ck in mine)
    assert root.manifest_path("train").read_bytes() == manifest  # nothing forgotten either
    assert StageManifest.load(root, "train").entries


def test_a_run_name_finds_the_data_roots_run_before_a_folder_of_that_name_here(tmp_path, monkeypatch):
    # `make demo` runs `siclip eval --data DATA --run demo` from a checkout, whose demo/ holds the demo's code
    here, data = tmp_path / "checkout", tmp_path / "data"
    (here / "demo").mkdir(parents=True)
    (data / "runs" / "demo").mkdir(parents=True)
    monkeypatch.chdir(here)
    assert run_folder("demo", str(data)) == data / "runs" / "demo"
    assert run_folder("demo").resolve() == here / "demo"  # no --data: a path
    with pytest.raises(SiclipError, match="--run other: no such run folder"):
        run_folder("other", str(data))
