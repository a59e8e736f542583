"""siclip captions and siclip teacher report while a shard is worked, one line per batch at most: the samples
done of all, the rate, the ETA and the shards finished, on stderr, in this process and from dask workers."""

from __future__ import annotations

import re

import pytest

from siclip.manifests.manifest import StageManifest
from siclip.manifests.progress import EVERY_ENV

from captions_helpers import captions, teacher

LINE = re.compile(r"^(captions|teacher): (\d+)/(\d+) samples \(\d+%\) \| [\d.,]+ samples/s \| ETA \S+ \| (\d+)/3 shards$")


def progress_lines(err: str, stage: str) -> list[tuple[int, int]]:
    """(samples done, shards finished) of each progress line of `stage`, in order."""
    return [(int(m[2]), int(m[4])) for m in map(LINE.match, err.splitlines()) if m and m[1] == stage]


@pytest.mark.parametrize("workers", ["0", "1"])
def test_captions_report_each_batch_before_the_shard_finishes(shards_root, monkeypatch, capsys, workers):
    monkeypatch.setenv(EVERY_ENV, "0")  # every batch: no line is held back by the interval
    capsys.readouterr()
    assert captions(shards_root, "--workers", workers, "--batch-size", "3") == 0
    err = capsys.readouterr().err
    lines = progress_lines(err, "captions")
    total = StageManifest.load(shards_root, "shards").total_samples
    assert total == 24
    # the first shard's 8 samples in batches of 3: 3 and 6 done while no shard has finished yet
    assert (3, 0) in lines and (6, 0) in lines
    counts = [n for n, _ in lines]
    assert counts == sorted(counts) and lines[-1] == (total, 3)
    assert err.strip().splitlines()[-1].startswith("captions: done: 3 sidecar(s) written")  # the one-line summary stays


def test_teacher_reports_each_batch_before_the_shard_finishes(shards_root, monkeypatch, capsys):
    monkeypatch.setenv(EVERY_ENV, "0")
    capsys.readouterr()
    assert teacher(shards_root, "--teacher", "tiny", "--set", "captions=false", "--batch-size", "5") == 0
    err = capsys.readouterr().err
    lines = progress_lines(err, "teacher")
    assert (5, 0) in lines and (13, 1) in lines  # a batch of the first shard, then of the second
    assert lines[-1] == (24, 3)
    assert err.strip().splitlines()[-1].startswith("teacher: done: 3 sidecar(s) written")


def test_a_bad_progress_interval_is_one_line(shards_root, monkeypatch, capsys):
    monkeypatch.setenv(EVERY_ENV, "soon")
    capsys.readouterr()
    assert captions(shards_root, "--workers", "0") == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err == f"siclip captions: error: {EVERY_ENV}='soon' is not a number of seconds (0 or more)"
