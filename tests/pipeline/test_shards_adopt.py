"""`siclip shards --adopt`: shards that img2dataset made elsewhere (a real `img2dataset.download` against the
loopback server) taken into a data root, checked, recorded as stage 1 records its own, and used by stages 2
and 3 unchanged; every bad or foreign tar refused in one line that names it, nothing adopted before lost."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from siclip.manifests.io import sha256_file
from siclip.manifests.layout import DataRoot
from siclip.manifests.manifest import StageManifest
from siclip.manifests.storage import format_size
from siclip_testing import TINY_MODEL_SET, siclip, write_list, write_tar

PER_TAR, TARS = 8, 3  # the 24 good pictures of the shared loopback server


@pytest.fixture(scope="module")
def made_elsewhere(tmp_path_factory, good_rows):
    """An img2dataset output folder (00000.tar, .parquet, _stats.json, ...), written by img2dataset.download
    itself in a process of its own, as a user's earlier download would have been (it spawns its workers)."""
    from bench.shards import RAW_SCRIPT

    d = tmp_path_factory.mktemp("img2dataset")
    urls = write_list(d / "urls.parquet", good_rows)
    script = d / "download.py"
    script.write_text(RAW_SCRIPT)
    res = subprocess.run([sys.executable, str(script), str(urls), str(d / "out"), "64", str(PER_TAR), "1", "4"],
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    assert sorted(p.name for p in (d / "out").glob("*.tar")) == [f"{i:05d}.tar" for i in range(TARS)]
    return d / "out"


@pytest.fixture
def source(made_elsewhere, tmp_path):
    """A private copy of the img2dataset folder, for tests that add bad tars to it."""
    return Path(shutil.copytree(made_elsewhere, tmp_path / "i2d"))


def adopt(source, data, *extra, check=True, env=None):
    return siclip("shards", "--adopt", source, "--data", data, "--budget", "1GB", "--reserve", "0%", *extra,
                  check=check, env=env)


def error_line(res) -> str:
    assert res.returncode == 2, res.stderr[-2000:]
    last = res.stderr.strip().splitlines()[-1]
    assert last.startswith("siclip shards: error: ") and "Traceback" not in res.stderr
    return last


def entries(data: Path) -> dict:
    return StageManifest.load(DataRoot(data), "shards").entries


def verify(data: Path) -> None:
    res = siclip("manifest", data, "--verify", "--json")
    assert json.loads(res.stdout)["stages"]["shards"]["files"] == len(entries(data))


def members_of(tar: Path) -> list[tuple[str, bytes]]:
    with tarfile.open(tar) as t:
        return [(m.name, t.extractfile(m).read()) for m in t.getmembers()]


TINY_TRAIN = TINY_MODEL_SET + """
batch_size = 8
workers = 0
val_shards = 1
checkpoint_every = 3
[[stages]]
name = "clip"
steps = 3
warmup_steps = 1
[stages.loss]
clip_web = 1.0
clip_synthetic = 1.0
"""


def test_img2dataset_shards_are_adopted_then_captioned_trained_and_evaluated_unchanged(made_elsewhere, tmp_path):
    data = tmp_path / "data"
    res = adopt(made_elsewhere, data)
    assert "3 to hard-link" in res.stderr and f"shards: done: 3 shards, {PER_TAR * TARS} samples" in res.stderr
    got = entries(data)
    assert sorted(got) == ["00000", "00001", "00002"]
    for unit, e in got.items():
        src, tar = made_elsewhere / f"{unit}.tar", data / "shards" / f"{unit}.tar"
        stats = json.loads((made_elsewhere / f"{unit}_stats.json").read_text())
        # recorded as stage 1 records its own: the tar's bytes and sha256, the samples and rows of its stats
        assert e.dump()["files"] == {f"shards/{unit}.tar": {"bytes": src.stat().st_size, "sha256": sha256_file(src)}}
        assert (e.samples, e.rows, e.source) == (stats["successes"], stats["count"], str(src))
        assert os.path.samefile(src, tar) and not tar.is_symlink()  # a hard link: no second copy on the disk
    assert json.loads((data / "manifests" / "storage.json").read_text())["budget_bytes"] == 10**9
    verify(data)

    again = adopt(made_elsewhere, data)  # a rerun adds nothing
    assert "3 adopted already, 0 to hard-link" in again.stderr and entries(data) == got

    siclip("captions", "--data", data, "--model", "tiny", "--workers", "0", "--num-captions", "1")
    (tmp_path / "train.toml").write_text(TINY_TRAIN)
    siclip("train", "--data", data, "--config", tmp_path / "train.toml", "--out", "adopted", timeout=600)
    out = json.loads(siclip("eval", "--run", "adopted", "--data", data, "--retrieval", "--json").stdout)
    assert out["retrieval"]["samples"] == PER_TAR and out["retrieval"]["unreadable"] == 0  # the held-out tar


def test_brace_notation_names_the_same_tars_and_adopting_by_either_form_again_adds_nothing(made_elsewhere,
                                                                                            tmp_path):
    data = tmp_path / "data"
    adopt(f"{made_elsewhere}/{{00000..00002}}.tar", data)
    got = entries(data)
    assert [e.source for e in got.values()] == [str(made_elsewhere / f"{i:05d}.tar") for i in range(TARS)]
    res = adopt(made_elsewhere, data)
    assert "3 adopted already" in res.stderr and entries(data) == got


def test_the_same_tar_under_another_path_is_adopted_once(made_elsewhere, tmp_path):
    twin = Path(shutil.copytree(made_elsewhere, tmp_path / "twin"))
    data = tmp_path / "data"
    adopt(made_elsewhere, data)
    res = adopt(twin, data)
    assert f"{twin / '00001.tar'} is the same tar as shard 00001 (sha256); not adopted twice" in res.stderr
    assert len(entries(data)) == TARS and sorted(p.name for p in (data / "shards").glob("*.tar")) == \
        [f"{i:05d}.tar" for i in range(TARS)]
    assert "3 adopted already, 0 to" in adopt(twin, data).stderr  # and is not read again


def test_copy_makes_files_of_the_data_roots_own(made_elsewhere, tmp_path):
    data = tmp_path / "data"
    res = adopt(made_elsewhere, data, "--copy")
    assert "3 to copy" in res.stderr
    for unit, e in entries(data).items():
        tar = data / "shards" / f"{unit}.tar"
        assert not os.path.samefile(made_elsewhere / f"{unit}.tar", tar)
        assert e.files[f"shards/{unit}.tar"].sha256 == sha256_file(made_elsewhere / f"{unit}.tar")
    verify(data)


def test_a_source_on_another_file_system_needs_copy_and_no_symbolic_link_is_made(made_elsewhere, tmp_path, tmpfs):
    other = tmpfs("4m")
    shutil.copytree(made_elsewhere, other / "i2d")
    data = tmp_path / "data"
    line = error_line(adopt(other / "i2d", data, check=False))
    assert f"{other / 'i2d' / '00000.tar'} is on another file system than the data root {data}: pass --copy" in line
    assert not data.exists()  # a first run that adopted nothing leaves nothing behind
    adopt(other / "i2d", data, "--copy")
    assert len(entries(data)) == TARS and not any(p.is_symlink() for p in (data / "shards").iterdir())
    verify(data)


def test_killed_between_placing_a_tar_and_recording_it_the_rerun_finishes_without_duplicates(made_elsewhere,
                                                                                             tmp_path):
    data = tmp_path / "data"
    killed = adopt(made_elsewhere, data, check=False, env={**os.environ, "SICLIP_FAILPOINT": "adopt-placed:00001"})
    assert killed.returncode == -9, killed.stderr[-2000:]  # a real SIGKILL, no cleanup
    assert sorted(entries(data)) == ["00000"] and (data / "shards" / "00001.tar").exists()  # placed, not listed
    res = adopt(made_elsewhere, data)
    assert "removing 00001.tar, left unlisted by an interrupted run" in res.stderr
    got = entries(data)
    assert sorted(got) == ["00000", "00001", "00002"]
    assert sorted(e.source for e in got.values()) == [str(made_elsewhere / f"{i:05d}.tar") for i in range(TARS)]
    assert sorted(p.name for p in (data / "shards").iterdir()) == ["00000.tar", "00001.tar", "00002.tar",
                                                                   "_config.toml"]
    verify(data)


def test_tars_over_the_budget_are_refused_before_any_is_adopted(made_elsewhere, tmp_path):
    data = tmp_path / "data"
    res = siclip("shards", "--adopt", made_elsewhere, "--data", data, "--budget", "10KB", "--reserve", "0%",
                 check=False)
    size = format_size(sum(p.stat().st_size for p in made_elsewhere.glob("*.tar")))
    assert f"the 3 tar(s) to adopt take {size}, but the budget 10 KB less the reserve 0 B leaves 10 KB" in \
        error_line(res)
    assert not data.exists()


def _no_image(folder: Path) -> Path:
    return write_tar(folder / "00003.tar", [("000.txt", b"a caption"), ("000.json", b"{}"), ("001.txt", b"more")])


def _one_without_image(folder: Path) -> Path:
    return write_tar(folder / "00003.tar", members_of(folder / "00000.tar") + [("zzz.txt", b"no picture")])


def _key_twice_apart(folder: Path) -> Path:
    members = members_of(folder / "00000.tar")
    return write_tar(folder / "00003.tar", members + [members[0]])  # a key back after other keys


def _member_twice(folder: Path) -> Path:
    members = members_of(folder / "00000.tar")
    return write_tar(folder / "00003.tar", members[:1] + members)  # 'KEY.jpg' twice in a row: one would be lost


def _cut_in_a_member(folder: Path) -> Path:
    data = (folder / "00000.tar").read_bytes()
    (folder / "00003.tar").write_bytes(data[:len(data) // 2 + 100])
    return folder / "00003.tar"


def _cut_between_samples(folder: Path) -> Path:
    """Cut where a sample's first member starts: every member left is whole, only the end is missing."""
    with tarfile.open(folder / "00000.tar") as t:
        start = [m for m in t.getmembers() if m.name.endswith(".jpg")][4].offset
    (folder / "00003.tar").write_bytes((folder / "00000.tar").read_bytes()[:start])
    (folder / "00003_stats.json").unlink(missing_ok=True)
    return folder / "00003.tar"


def _stats_disagree(folder: Path) -> Path:
    tar = folder / "00003.tar"
    shutil.copyfile(folder / "00000.tar", tar)
    stats = json.loads((folder / "00000_stats.json").read_text())
    (folder / "00003_stats.json").write_text(json.dumps({**stats, "successes": stats["successes"] + 2}))
    return tar


@pytest.mark.parametrize("make, says", [
    (_no_image, "no image member in any of its 2 samples"),
    (_one_without_image, "sample zzz has no image member"),
    (_key_twice_apart, "appears twice (members not grouped by key)"),
    (_member_twice, "appears twice (key "),
    (_cut_in_a_member, "truncated, or not a tar"),
    (_cut_between_samples, "truncated, or not a tar"),
    (_stats_disagree, "samples, but its 00003_stats.json says img2dataset wrote"),
], ids=lambda x: getattr(x, "__name__", "")[1:] if callable(x) else "")
def test_a_bad_or_foreign_tar_is_refused_in_one_line_naming_it_and_what_was_adopted_stays(source, tmp_path, make,
                                                                                         says):
    data = tmp_path / "data"
    adopt(source, data)
    before = entries(data)
    bad = make(source)
    line = error_line(adopt(source, data, check=False))
    assert line.startswith(f"siclip shards: error: {bad}: ") and says in line, line
    assert entries(data) == before and not (data / "shards" / "00003.tar").exists()
    verify(data)


def test_the_tars_before_a_bad_one_are_kept_and_the_rerun_adopts_the_rest_once_it_is_gone(source, tmp_path):
    data = tmp_path / "data"
    _no_image(source)  # 00003
    renamed = [(f"x{name}", body) for name, body in members_of(source / "00000.tar")]  # other keys, other bytes
    write_tar(source / "00004.tar", renamed)  # and no _stats.json: its samples are counted in it
    error_line(adopt(source, data, check=False))
    assert sorted(entries(data)) == ["00000", "00001", "00002"]
    (source / "00003.tar").unlink()
    adopt(source, data)
    got = entries(data)
    assert sorted(got) == ["00000", "00001", "00002", "00003"]
    assert (got["00003"].source, got["00003"].samples) == (str(source / "00004.tar"), len(renamed) // 3)
    verify(data)


@pytest.mark.parametrize("spec, says", [
    ("{folder}", "the folder holds no .tar file"),
    ("{folder}/{{00000..00002}}.tar", "matches no tar"),
    ("{folder}/nothing.tar", "matches no tar"),
])
def test_a_source_that_matches_no_tar_is_refused_in_one_line(tmp_path, spec, says):
    folder = tmp_path / "empty"
    folder.mkdir()
    (folder / "notes.txt").write_text("no shards here")
    spec = spec.format(folder=folder)
    line = error_line(adopt(spec, tmp_path / "data", check=False))
    assert line.startswith(f"siclip shards: error: --adopt {spec}: ") and says in line, line
    assert not (tmp_path / "data").exists()


def test_brace_notation_with_a_missing_tar_names_it(made_elsewhere, tmp_path):
    line = error_line(adopt(f"{made_elsewhere}/{{00000..00004}}.tar", tmp_path / "data", check=False))
    assert f"{made_elsewhere / '00003.tar'} does not exist (2 of the 5 tars named are missing)" in line


def test_downloaded_and_adopted_shards_do_not_share_a_data_root(made_elsewhere, shards_root, tmp_path, good_rows):
    line = error_line(adopt(made_elsewhere, shards_root.root, check=False))
    assert "were downloaded from a URL list by 'siclip shards --urls'; adopt into another --data" in line
    data = tmp_path / "adopted"
    adopt(made_elsewhere, data)
    urls = write_list(tmp_path / "urls.parquet", good_rows)
    res = siclip("shards", "--urls", urls, "--data", data, "--budget", "1GB", "--allow-private-addresses", check=False)
    assert "were adopted by 'siclip shards --adopt'; download a URL list into another --data" in error_line(res)
    assert len(entries(data)) == TARS


@pytest.mark.parametrize("args, says", [
    (["--urls", "x.parquet", "--adopt", "d"], "--urls and --adopt both given"),
    (["--urls", "x.parquet", "--copy"], "--copy copies the tars that --adopt takes in: pass --adopt SOURCE too"),
])
def test_adopt_flags_that_do_not_go_together_are_one_line_errors(tmp_path, args, says):
    assert says in error_line(siclip("shards", *args, "--data", tmp_path / "data", check=False))
