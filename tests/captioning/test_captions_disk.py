"""`siclip captions` on a disk that fills up (a real tmpfs, filled by the test between a shard's
sidecar and its manifest save): the job goes on to the other shards and ends with its summary,
nothing written is lost, and the rerun records the unrecorded sidecar without making it again."""

from __future__ import annotations

import shutil

from captions_helpers import captions
from siclip_testing import fill_disk

from siclip.manifests.layout import DataRoot
from siclip.manifests.manifest import StageManifest
from siclip.manifests.samples import iter_samples


def test_a_disk_full_at_the_manifest_save_goes_on_and_the_rerun_recovers(shards_root, tmpfs, monkeypatch, capsys):
    import siclip.captioning.jobs as jobs

    disk = tmpfs("2m")
    root = DataRoot(disk / "data")
    shutil.copytree(shards_root.root, root.root)
    filler = []
    real = jobs.caption_shard

    def then_fill(task, captioner, report):  # the disk fills up once shard 00000's sidecar is written
        res = real(task, captioner, report)
        if task.shard == "00000":
            filler.append(fill_disk(disk))
        return res

    monkeypatch.setattr(jobs, "caption_shard", then_fill)
    capsys.readouterr()
    assert captions(root, "--workers", "0") == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert any(line.startswith("captions: shard 00000: sidecar written but not recorded: cannot write ") and
               "manifests/captions.json: No space left on device (errno 28)" in line for line in lines)
    for shard in ("00001", "00002"):  # the job went on to them; the full disk refused their sidecars too
        assert any(line.startswith(f"captions: shard {shard} skipped: cannot write ") and
                   f"captions/{shard}.arrow: No space left on device" in line for line in lines)
    assert lines[-2] == ("captions: 1 sidecar(s) written but not recorded (00000): make room and rerun the same "
                         "command, which records them without making them again")
    assert lines[-1].startswith("captions: done: 1 sidecar(s) written, 0 already there, 2 shard(s) skipped")
    sidecar = root.captions / "00000.arrow"
    made = sidecar.stat().st_mtime_ns
    assert not root.manifest_path("captions").exists()  # nothing half-written in its place

    filler[0].unlink()
    monkeypatch.setattr(jobs, "caption_shard", real)
    assert captions(root, "--workers", "0") == 0
    err = capsys.readouterr().err
    assert "recorded 1 complete sidecar(s) that an interrupted run wrote but did not list" in err
    assert "2 to do" in err
    assert sidecar.stat().st_mtime_ns == made  # recorded as it was, not made again
    assert sorted(StageManifest.load(root, "captions").entries) == ["00000", "00001", "00002"]
    for shard in ("00000", "00001", "00002"):
        assert len(list(iter_samples(root, shard, ("captions",)))) == 8
