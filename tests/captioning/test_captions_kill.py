"""SIGKILL at any moment, then rerun: exactly one complete sidecar per shard, the same captions."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from siclip.manifests.layout import DataRoot
from siclip.manifests.manifest import StageManifest
from siclip.manifests.progress import EVERY_ENV
from siclip.cli import main

from captions_helpers import all_sidecars, captions, sidecar_rows

REPO = Path(__file__).resolve().parents[2]


def _start(root: DataRoot, *extra: str, stderr=subprocess.DEVNULL) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", EVERY_ENV: "0"}
    return subprocess.Popen([sys.executable, "-m", "siclip.cli", "captions", "--data", str(root.root), "--model", "tiny",
                             "--max-new-tokens", "12", "--workers", "0", "--batch-size", "1", *extra],
                            cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=stderr, text=True)


def _kill_when(proc: subprocess.Popen, ready, timeout: float = 120) -> None:
    """SIGKILL the job at the moment `ready()` first holds; fail if it never comes or the job ends first."""
    deadline = time.monotonic() + timeout
    while not ready():
        if proc.poll() is not None:
            raise AssertionError(f"the job exited ({proc.returncode}) before the moment to kill it")
        if time.monotonic() > deadline:
            proc.kill()
            proc.wait()
            raise AssertionError(f"the moment to kill the job never came within {timeout} s")
        time.sleep(0.005)
    os.kill(proc.pid, signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL, "the job had already exited when the kill landed"


def _consistent_after_kill(root: DataRoot, expected: dict) -> set:
    """What a kill may leave: complete sidecars (listed or not) and temp files, never a listed entry that
    does not check out nor a truncated sidecar under its final name. Returns the shards listed."""
    listed = StageManifest.load(root, "captions")
    for name in listed.entries:
        assert listed.entry_ok(root, name, rehash=True), f"manifest lists {name} but its sidecar does not check out"
    for path in root.captions.glob("*.arrow"):
        rows = sidecar_rows(path)
        assert rows == expected[path.name], f"{path.name} is not the complete sidecar"
    return set(listed.entries)


def test_sigkill_at_several_moments_then_rerun(shards_root, tmp_path):
    reference = DataRoot(tmp_path / "reference")
    import shutil

    shutil.copytree(shards_root.root, reference.root)
    assert captions(reference, "--workers", "0") == 0

    expected = all_sidecars(reference)
    names = sorted(StageManifest.load(shards_root, "shards").entries)
    captions_dir = shards_root.captions
    # 1: while the first sidecar is being written (its temp file exists) or right after
    _kill_when(_start(shards_root), lambda: any(captions_dir.glob(".*.tmp-*")) or any(captions_dir.glob("*.arrow")))
    first = _consistent_after_kill(shards_root, expected)
    assert len(first) < len(names)
    # 2: once a shard is recorded and the next sidecar exists: the job was killed with work left
    _kill_when(_start(shards_root), lambda: len(StageManifest.load(shards_root, "captions").entries) >= 1
               and len(list(captions_dir.glob("*.arrow"))) >= 2)
    second = _consistent_after_kill(shards_root, expected)
    assert first <= second and len(second) >= 1

    assert captions(shards_root, "--workers", "0") == 0
    assert sorted(p.name for p in captions_dir.iterdir()) == [f"{n}.arrow" for n in names] + ["_config.toml"]
    assert all_sidecars(shards_root) == expected
    assert sorted(StageManifest.load(shards_root, "captions").entries) == names
    assert main(["manifest", str(shards_root.root), "--verify"]) == 0


def test_sidecar_written_but_not_recorded_is_adopted_not_redone(shards_root, capsys):
    """The window a kill can hit between a sidecar's rename and the manifest save."""
    assert captions(shards_root, "--workers", "0") == 0
    m = StageManifest.load(shards_root, "captions")
    del m.entries["00001"]
    m.save(shards_root)
    stale = shards_root.captions / ".00002.arrow.tmp-99999"
    stale.write_bytes(b"half a sidecar")
    mtime = (shards_root.captions / "00001.arrow").stat().st_mtime_ns

    capsys.readouterr()
    assert captions(shards_root, "--workers", "0") == 0
    err = capsys.readouterr().err
    assert "removed 1 partial file(s)" in err and "recorded 1 complete sidecar(s)" in err
    assert not stale.exists()
    assert (shards_root.captions / "00001.arrow").stat().st_mtime_ns == mtime
    assert sorted(StageManifest.load(shards_root, "captions").entries) == sorted(StageManifest.load(shards_root, "shards").entries)


def test_sigkill_during_an_overwrite_leaves_the_old_entries_then_the_rerun_replaces_them(shards_root):
    assert captions(shards_root, "--workers", "0") == 0
    old = all_sidecars(shards_root)
    names = sorted(StageManifest.load(shards_root, "shards").entries)
    # many long captions per image: the first shard's 8 batches take long after its first one is reported
    slow = ("--seed", "7", "--overwrite", "--num-captions", "8", "--max-new-tokens", "30")
    proc = _start(shards_root, *slow, stderr=subprocess.PIPE)
    for line in proc.stderr:  # killed at the first batch's progress line, before any new sidecar is written
        if line.startswith("captions: 1/24 samples"):
            os.kill(proc.pid, signal.SIGKILL)
            break
    proc.stderr.close()
    assert proc.wait() == -signal.SIGKILL, "the job ended before its first batch was reported"
    assert _consistent_after_kill(shards_root, old) == set(names)  # every old entry, each checking out
    assert main(["manifest", str(shards_root.root), "--verify"]) == 0

    proc = _start(shards_root, *slow)
    assert proc.wait() == 0
    m = StageManifest.load(shards_root, "captions")
    assert sorted(m.entries) == names and all(e.params["seed"] == 7 for e in m.entries.values())
    assert all(len(caps) == 8 for rows in all_sidecars(shards_root).values() for caps, _ in rows.values())
    assert main(["manifest", str(shards_root.root), "--verify"]) == 0


def test_a_replacement_written_but_not_recorded_is_adopted_not_redone(shards_root, capsys):
    """The same window in an --overwrite run: the new sidecar is in place, the manifest still lists the old one."""
    assert captions(shards_root, "--workers", "0") == 0
    listed_old = shards_root.manifest_path("captions").read_bytes()
    assert captions(shards_root, "--workers", "0", "--seed", "7", "--overwrite", "--set", 'shards=["00001"]') == 0
    replaced = shards_root.captions / "00001.arrow"
    mtime = replaced.stat().st_mtime_ns
    shards_root.manifest_path("captions").write_bytes(listed_old)
    assert main(["manifest", str(shards_root.root), "--verify"]) != 0  # the entry of 00001 no longer checks out

    capsys.readouterr()
    assert captions(shards_root, "--workers", "0", "--seed", "7", "--overwrite") == 0
    err = capsys.readouterr().err
    assert "recorded 1 complete sidecar(s)" in err and "2 to do" in err
    assert replaced.stat().st_mtime_ns == mtime
    m = StageManifest.load(shards_root, "captions")
    assert sorted(m.entries) == ["00000", "00001", "00002"] and all(e.params["seed"] == 7 for e in m.entries.values())
    assert main(["manifest", str(shards_root.root), "--verify"]) == 0
