"""`--data` that cannot be a data root (a file, a path under a file, a read-only file system, /proc):
one line naming the path and the reason, from every verb, and nothing written."""

from __future__ import annotations

import shutil
import subprocess

import pytest
from siclip_testing import siclip


def last_line(res) -> str:
    assert "Traceback" not in res.stderr, res.stderr
    return res.stderr.strip().splitlines()[-1]


def shards(data, urls) -> str:
    res = siclip("shards", "--urls", urls, "--data", data, "--allow-private-addresses", check=False)
    assert res.returncode == 2
    return last_line(res)


@pytest.fixture
def urls(tmp_path, good_rows):
    from siclip_testing import write_list

    return write_list(tmp_path / "urls.parquet", good_rows[:2])


def test_a_file_or_a_path_under_a_file(tmp_path, urls):
    a_file = tmp_path / "a-file"
    a_file.write_text("not a folder\n")
    assert shards(a_file, urls) == f"siclip shards: error: data root {a_file} is a file, not a folder"
    assert shards(a_file / "data", urls) == (f"siclip shards: error: data root {a_file / 'data'}: {a_file} is a file, "
                                             "so no folder can be made under it")
    assert a_file.read_text() == "not a folder\n"
    for verb in (["captions", "--model", "tiny"], ["teacher", "--teacher", "tiny"], ["train", "--config", "tiny"]):
        res = siclip(verb[0], "--data", a_file, *verb[1:], check=False)
        assert res.returncode == 2
        assert last_line(res) == f"siclip {verb[0]}: error: data root {a_file} is a file, not a folder"
    res = siclip("manifest", a_file, check=False)
    assert (res.returncode, last_line(res)) == (2, f"siclip manifest: error: data root {a_file} is a file, not a folder")


def test_under_proc(urls):
    assert shards("/proc/siclip-data", urls) == ("siclip shards: error: data root /proc/siclip-data is on /proc, a proc "
                                                 "file system the kernel makes up: choose a folder on a disk")


def test_on_a_read_only_file_system(tmpfs, shards_data, urls):
    ro = tmpfs("1m", "ro")
    assert shards(ro / "data", urls) == f"siclip shards: error: data root {ro / 'data'} cannot be made: {ro} is mounted read-only"
    # a data root that was written, then mounted read-only: the stages that write refuse it up front,
    # the storage table and --verify still read it
    disk = tmpfs("4m")
    shutil.copytree(shards_data, disk / "data")
    subprocess.run(["mount", "-o", "remount,ro", str(disk)], check=True)
    res = siclip("captions", "--data", disk / "data", "--model", "tiny", check=False)
    assert (res.returncode, last_line(res)) == (2, f"siclip captions: error: data root {disk / 'data'} cannot be "
                                                   f"written: {disk} is mounted read-only")
    assert siclip("manifest", disk / "data", "--verify").returncode == 0
    res = siclip("manifest", disk / "data", "--verify", "--repair", check=False)
    assert res.returncode == 2 and "cannot be written" in last_line(res)
