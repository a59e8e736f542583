"""`siclip shards --distributor pyspark` (Spark in local[2]) and `--distributor ray` (Ray started
locally with 2 CPUs), for real: under a budget they make the same samples, shards and manifest as
the multiprocessing path, and a job killed with SIGKILL mid-wave, rerun, ends with every sample
exactly once. Run by `make test-scaleout`; skipped with the reason where the extras are missing."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from shards_helpers import alive, descendants, open_files, start_job, tail, wait_exit, wait_for
from siclip_testing import SMALL, siclip, write_list

from siclip.manifests.layout import DataRoot
from siclip.manifests.manifest import StageManifest
from siclip.manifests.samples import iter_shard
from siclip.pipeline.config import ShardsConfig
from siclip.pipeline.plan import shard_bound

pytestmark = pytest.mark.scaleout
DISTRIBUTORS = ["pyspark", "ray"]
EXIT_DEADLINE_S = 300  # Spark's JVM and Ray's runtime take a while to start on a loaded 2-core machine


def rows_of(base: str, good_rows, routes=("", "slow/0/")) -> list[tuple[str, str]]:
    """48 rows (6 shards of 8): the pictures twice, through two routes of the server (other URLs)."""
    return [(f"{base}/{r}{p}", c) for r in routes for p, c in good_rows]


def content(data: Path) -> dict:
    """What a data root's shards hold, as a user reads it: per shard its manifest counts and file names, and each
    sample's key, metadata, caption and image bytes; with the stage's parameters and plan."""
    m = StageManifest.load(DataRoot(data), "shards")
    shards = {}
    for name, e in m.entries.items():
        samples = [{"key": s["__key__"], "json": json.loads(s["json"]), "txt": s["txt"],
                    "jpg": hashlib.sha256(s["jpg"]).hexdigest()} for s in iter_shard(data / "shards" / f"{name}.tar")]
        shards[name] = {"samples": e.samples, "rows": e.rows, "failures": e.failures, "files": sorted(e.files),
                        "tar_bytes": e.files[f"shards/{name}.tar"].bytes, "content": sorted(samples, key=str)}
    # the pilot's bytes per row are measured (img2dataset's stats hold timings): a few bytes differ run to run
    plan = {k: v for k, v in m.info.plan.dump().items() if k not in ("bytes_per_row", "planned_bytes")}
    return {"shards": shards, "params": m.params, "plan": plan}


@pytest.fixture(scope="module")
def budgeted(tmp_path_factory, image_server, good_rows):
    """The URL list, a budget that holds the plan but not every shard's worst case at once, and what the
    multiprocessing path makes of them."""
    d = tmp_path_factory.mktemp("scaleout")
    rows = rows_of(image_server.base, image_server.good_rows)
    urls = write_list(d / "urls.parquet", rows)
    table = pq.read_table(urls)
    bounds = [shard_bound(table.slice(i, 8), ShardsConfig(urls="-", image_size=64)) for i in range(0, 48, 8)]
    budget = int(0.6 * sum(bounds))
    args = ["--urls", urls, *[a for a in SMALL if a not in ("--budget", "1GB")], "--budget", budget]
    siclip("shards", "--data", d / "multiprocessing", *args)
    return args, rows, d / "multiprocessing"


@pytest.mark.parametrize("distributor", DISTRIBUTORS)
def test_same_samples_shards_and_manifest_as_multiprocessing_under_a_budget(distributor, budgeted, tmp_path):
    args, rows, reference = budgeted
    data = tmp_path / "data"
    res = siclip("shards", "--data", data, *args, "--distributor", distributor, timeout=EXIT_DEADLINE_S)
    waves = [line for line in res.stderr.splitlines() if line.startswith("shards: wave ")]
    assert len(waves) >= 2, res.stderr[-3000:]  # the budget held back part of the shards until a wave finished
    assert all(line.endswith(f"to {distributor}") for line in waves)
    assert content(data) == content(reference)
    assert len(content(data)["shards"]) == 6
    info = json.loads(siclip("manifest", data, "--json").stdout)
    assert info["used_bytes"] <= info["budget_bytes"]
    assert siclip("manifest", data, "--verify").returncode == 0


def files_open_under(pid: int, folder: Path) -> list[Path]:
    return [p for p in open_files(pid) if folder in p.parents]


@pytest.mark.parametrize("distributor", DISTRIBUTORS)
def test_sigkill_mid_wave_then_rerun_leaves_every_sample_once(distributor, image_server, tmp_path):
    rows = rows_of(image_server.base, image_server.good_rows, ("slow/0.5/", "slow/0.6/"))  # 2 s a shard on 2 threads
    data = tmp_path / "data"
    args = ["shards", "--urls", write_list(tmp_path / "urls.parquet", rows), "--data", data, *SMALL,
            "--threads", "2", "--distributor", distributor]
    staging, log = data / "work" / "shards" / "staging", tmp_path / "job.log"
    job = start_job(args, log)
    family: list[int] = []
    try:
        # in the middle of a wave: a bulk shard's tar is being written by a worker of the distributor
        wait_for(lambda: staging.is_dir() and any(p.suffix == ".tar" and p.stem != "00000" for p in staging.iterdir()),
                 job, log, "a wave's tar appeared in staging", timeout=EXIT_DEADLINE_S)
        family = descendants(job.pid)
        os.kill(job.pid, signal.SIGKILL)  # the driver only, as `kill -9 PID` does
        job.wait()
        # Spark's and Ray's workers end with their driver: none writes into the data root after a short while
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and any(files_open_under(p, data) for p in family if alive(p)):
            time.sleep(0.5)
        assert not [p for p in family if alive(p) and files_open_under(p, data)], tail(log)
    finally:
        for p in family:  # Ray's dashboard and runtime-env agents outlive the driver by about a minute
            try:
                os.kill(p, signal.SIGKILL)
            except ProcessLookupError:
                pass
        try:
            os.killpg(job.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    assert not (data / "shards" / "00005.tar").exists(), "the job finished before the kill: " + tail(log)
    rerun = start_job(args, tmp_path / "rerun.log")
    assert wait_exit(rerun, tmp_path / "rerun.log", EXIT_DEADLINE_S) == 0, tail(tmp_path / "rerun.log")
    urls = [json.loads(s["json"])["url"] for tar in sorted((data / "shards").glob("*.tar")) for s in iter_shard(tar)]
    assert sorted(urls) == sorted(u for u, _ in rows)  # every sample exactly once
    assert siclip("manifest", data, "--verify").returncode == 0
    assert not any(staging.iterdir())
