"""`siclip shards`' download processes: they die with a killed job, a lost one is named instead of
hanging the job, and every run exits by itself, whatever the number of shards per process."""

from __future__ import annotations

import json
import os
import signal
import tarfile
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
from shards_helpers import (alive, folder_state, kill_group, open_tars, start_job, tail, wait_exit, wait_for,
                            workers_writing)
from siclip_testing import SMALL, siclip, write_list

from siclip.manifests.layout import DataRoot
from siclip.manifests.manifest import StageManifest

EXIT_DEADLINE_S = 120  # generous: a run here takes seconds; the bug this guards against hangs for ever


def tar_samples(data: Path) -> list[dict]:
    out = []
    for tar_path in sorted((data / "shards").glob("*.tar")):
        with tarfile.open(tar_path) as tar:
            out += [json.loads(tar.extractfile(m).read()) for m in tar if m.name.endswith(".json")]
    return out


def assert_every_sample_once(data: Path, rows) -> None:
    samples = tar_samples(data)
    assert sorted(s["url"] for s in samples) == sorted(u for u, _ in rows)
    assert len({s["key"] for s in samples}) == len(samples)
    assert siclip("manifest", data, "--verify").returncode == 0
    assert folder_state(data / "work" / "shards" / "staging") == {}


@dataclass
class SlowJob:
    """A job whose shards each take about a second (8 rows answered after 0.25 s, on 2 threads):
    long enough to be caught in the middle of one."""

    args: list
    data: Path
    rows: list
    log: Path

    @property
    def staging(self) -> Path:
        return self.data / "work" / "shards" / "staging"

    def start(self):
        return start_job(self.args, self.log)


@pytest.fixture
def slow_job(tmp_path, image_server):
    def make(shards: int) -> SlowJob:
        rows = [(f"{image_server.base}/slow/0.25/{p}", c) for p, c in image_server.good_rows] * 3
        rows = rows[:8 * shards]  # the list repeats URLs: each must still come out exactly as often
        urls = write_list(tmp_path / "urls.parquet", rows)
        data = tmp_path / "data"
        return SlowJob(["shards", "--urls", urls, "--data", data, *SMALL, "--threads", "2"], data, rows,
                       tmp_path / "job.log")
    return make


def test_sigkill_mid_pilot_then_rerun_leaves_every_sample_once(slow_job):
    sj = slow_job(3)
    job = sj.start()
    try:
        # the pilot runs in the job's own process: kill it while it writes the pilot's tar
        wait_for(lambda: "00000" in open_tars(job.pid, sj.staging), job, sj.log, "the pilot's tar was open")
    finally:
        kill_group(job)
    assert not (sj.data / "shards" / "00000.tar").exists()
    siclip(*sj.args)
    assert_every_sample_once(sj.data, sj.rows)
    assert sorted(StageManifest.load(DataRoot(sj.data), "shards").entries) == ["00000", "00001", "00002"]


def test_sigkill_mid_bulk_leaves_no_worker_alive_or_writing(slow_job):
    sj = slow_job(3)
    job = sj.start()
    try:
        # the moment to kill: both download processes are writing a shard's tar
        busy = list(wait_for(lambda: w if len(w := workers_writing(job.pid, sj.staging)) == 2 else None,
                             job, sj.log, "both workers were writing a shard"))
        os.kill(job.pid, signal.SIGKILL)
        job.wait()
        t0 = time.monotonic()

        def wait_dead(limit_s: float) -> list[int]:
            while any(alive(p) for p in busy) and time.monotonic() - t0 < limit_s:
                time.sleep(0.02)
            return [p for p in busy if alive(p)]

        wait_dead(0.3)
        before = folder_state(sj.staging)  # both shards had just started: an orphan would finish them later
        assert any(name.endswith(".tar") for name in before)  # the kill did land mid-shard
        survivors = wait_dead(1.0)
        assert not survivors, f"download processes {survivors} outlived the killed job by 1 s"
        time.sleep(1.5)  # a shard takes about a second
        assert folder_state(sj.staging) == before, "something wrote into staging after the job was killed"
    finally:
        kill_group(job)
    siclip(*sj.args)
    assert_every_sample_once(sj.data, sj.rows)


def test_a_finished_shard_is_recorded_while_its_wave_runs_and_a_kill_keeps_it(slow_job):
    """The whole list fits the budget, so it is one wave: each shard is still recorded when it is
    finished, not when the wave is, and a job killed mid-wave keeps it."""
    sj = slow_job(8)
    job = sj.start()

    def recorded() -> set[str]:
        try:
            return set(StageManifest.load(DataRoot(sj.data), "shards").entries)
        except Exception:  # noqa: BLE001 - not written yet
            return set()
    try:
        # recorded, and afterwards a download process still writing a shard: the wave had not ended
        kept = wait_for(lambda: r if len(r := recorded()) > 1 and workers_writing(job.pid, sj.staging) else None,
                        job, sj.log, "a bulk shard was recorded while others were written")
        os.kill(job.pid, signal.SIGKILL)
        job.wait()
    finally:
        kill_group(job)
    assert "wave 1: 7 shard(s) (00001..00007)" in sj.log.read_text()
    assert kept <= recorded()
    siclip(*sj.args)
    assert_every_sample_once(sj.data, sj.rows)


def test_a_lost_worker_fails_its_shard_by_name_instead_of_hanging(slow_job):
    sj = slow_job(6)  # more shards than workers: a replacement has to carry on
    job = sj.start()
    try:
        pid, shard = next(iter(wait_for(lambda: workers_writing(job.pid, sj.staging), job, sj.log,
                                        "a worker was writing a shard").items()))
        os.kill(pid, signal.SIGKILL)  # as the out-of-memory killer would
        code = wait_exit(job, sj.log, EXIT_DEADLINE_S)
    finally:
        kill_group(job)
    err = sj.log.read_text()
    assert code == 1, tail(sj.log)
    assert f"shards: shard {shard} failed: its download process (pid {pid}) died (killed by SIGKILL" in err
    assert f"1 shard(s) failed ({shard}); rerun the same command" in err.strip().splitlines()[-1]
    m = StageManifest.load(DataRoot(sj.data), "shards")
    assert sorted(m.entries) == [f"{i:05d}" for i in range(6) if f"{i:05d}" != shard]  # the others carried on
    siclip(*sj.args)
    assert_every_sample_once(sj.data, sj.rows)


# (processes, shards after the pilot): the hang needed more than 5 shards per process; both sides of that line
STRESS = [(1, 1), (1, 12), (2, 10), (2, 11), (2, 24), (3, 16)]


@pytest.mark.parametrize("procs, pool_shards", STRESS, ids=[f"p{p}-s{s}" for p, s in STRESS])
def test_every_run_exits_by_itself_with_a_complete_manifest(tmp_path, good_rows, procs, pool_shards):
    sps = 2
    n = (pool_shards + 1) * sps
    rows = [good_rows[i % len(good_rows)] for i in range(n)]
    urls = write_list(tmp_path / "urls.parquet", rows)
    data = tmp_path / "data"
    log = tmp_path / "job.log"
    job = start_job(["shards", "--urls", urls, "--data", data, "--image-size", "32", "--samples-per-shard", sps,
                     "--processes", procs, "--threads", "2", "--budget", "1GB", "--reserve", "0%",
                     "--set", "timeout=10", "--allow-private-addresses"], log)
    code = wait_exit(job, log, EXIT_DEADLINE_S)
    assert code == 0, tail(log)
    assert tail(log, 1).startswith(f"shards: done: {pool_shards + 1} shards, {n}/{n} images")
    m = StageManifest.load(DataRoot(data), "shards")
    assert sorted(m.entries) == [f"{i:05d}" for i in range(pool_shards + 1)] and m.total_samples == n
    assert folder_state(data / "work" / "shards" / "staging") == {}
