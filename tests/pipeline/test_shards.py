"""`siclip shards`: real img2dataset against a loopback server, real tars, real SIGKILL."""

from __future__ import annotations

import json
import tarfile
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from shards_helpers import kill_group, start_job, tail, wait_for
from siclip_testing import FAULT_TIMEOUT, SLOW_S, SMALL, fault_rows, siclip, write_list

from siclip.manifests.io import sha256_file
from siclip.manifests.layout import DataRoot
from siclip.manifests.manifest import StageManifest
from siclip.pipeline.config import ShardsConfig
from siclip.pipeline.plan import shard_bound
from siclip.pipeline.reasons import classify


def manifest_json(data: Path) -> dict:
    return json.loads(siclip("manifest", data, "--json").stdout)


def tar_samples(data: Path) -> list[dict]:
    """The .json metadata of every sample in every tar under shards/ (opening each tar fully)."""
    out = []
    for tar_path in sorted((data / "shards").glob("*.tar")):
        with tarfile.open(tar_path) as tar:
            for m in tar:
                if m.name.endswith(".json"):
                    out.append(json.loads(tar.extractfile(m).read()))
    return out


def test_counts_and_failure_reasons(tmp_path, good_rows, bad_rows):
    rows = good_rows[:6] + [(u, c) for u, c, _ in bad_rows]
    urls = write_list(tmp_path / "urls.parquet", rows)
    # most rows fail here on purpose: the check against the pilot's success rate is not what this test is about
    res = siclip("shards", "--urls", urls, "--data", tmp_path / "data", *SMALL, *FAULT_TIMEOUT,
                 "--set", "min_success_ratio=0")
    assert "refused: no_url 1, scheme_file 1" in res.stderr
    # each row's own outcome, from img2dataset's per-row records
    outcome = {}
    for parquet in (tmp_path / "data" / "shards").glob("*.parquet"):
        for r in pq.read_table(parquet, columns=["url", "status", "error_message"]).to_pylist():
            outcome[r["url"]] = "success" if r["status"] == "success" else classify(r["error_message"])
    assert outcome == {**{u: "success" for u, _ in good_rows[:6]},
                       **{u: o for u, _, o in bad_rows if o not in ("scheme_file", "no_url")}}
    m = StageManifest.load(DataRoot(tmp_path / "data"), "shards")
    failures: dict[str, int] = {}
    for e in m.entries.values():
        for r, n in e.failures.items():
            failures[r] = failures.get(r, 0) + n
    expected: dict[str, int] = {}
    for _, _, outcome in bad_rows:
        if outcome not in ("success", "scheme_file", "no_url"):
            expected[outcome] = expected.get(outcome, 0) + 1
    assert failures == expected
    assert m.total_samples == 6  # the good pictures; the 1x1 one is under min_image_size
    assert sum(e.rows for e in m.entries.values()) == len(rows) - 2
    assert len(tar_samples(tmp_path / "data")) == 6
    assert "shards: done:" in res.stderr.splitlines()[-1]


def test_shards_are_webdataset_with_resized_images(shards_data, good_rows):
    from PIL import Image
    import io

    tars = sorted((shards_data / "shards").glob("*.tar"))
    assert [t.name for t in tars] == ["00000.tar", "00001.tar", "00002.tar"]
    with tarfile.open(tars[0]) as tar:
        names = tar.getnames()
        jpg = next(n for n in names if n.endswith(".jpg"))
        key = jpg[:-4]
        assert {f"{key}.jpg", f"{key}.txt", f"{key}.json"} <= set(names)
        assert Image.open(io.BytesIO(tar.extractfile(jpg).read())).size == (64, 64)
        caption = tar.extractfile(f"{key}.txt").read().decode()
    assert caption in {c for _, c in good_rows}
    info = manifest_json(shards_data)
    assert info["stages"]["shards"] == {"files": 9, "samples": len(good_rows),
                                        "bytes": sum(p.stat().st_size for p in (shards_data / "shards").glob("0*"))}
    assert info["used_bytes"] == info["stages"]["shards"]["bytes"] and info["budget_bytes"] == 10**9
    entry = json.loads((shards_data / "manifests" / "shards.json").read_text())["entries"]["00000"]
    assert set(entry["files"]) == {"shards/00000.tar", "shards/00000.parquet", "shards/00000_stats.json"}
    assert all(len(f["sha256"]) == 64 for f in entry["files"].values())


def test_rerun_is_a_no_op(shards_root, good_rows, tmp_path):
    data = shards_root.root
    urls = write_list(tmp_path / "urls.parquet", good_rows)
    before = {p.name: (p.stat().st_mtime_ns, p.stat().st_size) for p in (data / "shards").glob("0*")}
    manifest_before = (data / "manifests" / "shards.json").read_text()
    res = siclip("shards", "--urls", urls, "--data", data, *SMALL)
    assert "every planned shard is already finished" in res.stderr
    assert {p.name: (p.stat().st_mtime_ns, p.stat().st_size) for p in (data / "shards").glob("0*")} == before
    assert (data / "manifests" / "shards.json").read_text() == manifest_before


def test_rerun_with_other_output_settings_is_refused(shards_root, good_rows, tmp_path):
    urls = write_list(tmp_path / "urls.parquet", good_rows)
    res = siclip("shards", "--urls", urls, "--data", shards_root.root, *SMALL, "--image-size", "96", check=False)
    assert res.returncode == 2
    assert "image_size=64 (now 96)" in res.stderr.strip().splitlines()[-1]


def test_rerun_with_a_different_url_list_is_refused(shards_root, good_rows, tmp_path):
    data = shards_root.root
    manifest_before = (data / "manifests" / "shards.json").read_text()
    other = list(good_rows)
    other[5] = (other[5][0], other[5][1] + " (edited)")  # one caption changed: other samples
    urls = write_list(tmp_path / "urls.parquet", other)
    res = siclip("shards", "--urls", urls, "--data", data, *SMALL, check=False)
    assert res.returncode == 2
    assert "made with a different URL list" in res.stderr.strip().splitlines()[-1]
    assert (data / "manifests" / "shards.json").read_text() == manifest_before


def test_a_second_job_on_the_same_data_root_is_refused(tmp_path, image_server, good_rows):
    slow = [(f"{image_server.base}/slow/3/{p}", c) for p, c in image_server.good_rows]
    data = tmp_path / "data"
    args = ["--data", data, *SMALL, "--threads", "2"]
    log = tmp_path / "first.log"
    first = start_job(["shards", "--urls", write_list(tmp_path / "slow.parquet", slow), *args], log)
    try:
        wait_for(lambda: "pilot shard 00000" in log.read_text(), first, log, "the first job started its pilot")
        storage = (data / "manifests" / "storage.json").read_bytes()
        res = siclip("shards", "--urls", write_list(tmp_path / "urls.parquet", good_rows), *args, check=False)
        assert first.poll() is None, tail(log)  # the first job was still running all along
    finally:
        kill_group(first)
    assert res.returncode == 2
    assert res.stderr.strip().splitlines()[-1] == (f"siclip shards: error: another 'siclip shards' job is running on "
                                                   f"{data} (lock {data / 'manifests' / '.shards.lock'})")
    assert (data / "manifests" / "storage.json").read_bytes() == storage


def _jpg_bytes(tar_path: Path) -> int:
    with tarfile.open(tar_path) as tar:
        return sum(m.size for m in tar if m.name.endswith(".jpg"))


def _full_need(shards_data: Path) -> int:
    return manifest_json(shards_data)["used_bytes"]


def test_budget_below_need_stops_with_a_suggestion(shards_data, good_rows, tmp_path):
    budget = int(_full_need(shards_data) * 0.9)
    urls = write_list(tmp_path / "urls.parquet", good_rows)
    args = [a for a in SMALL if a not in ("--budget", "1GB")] + ["--samples-per-shard", "3"]
    res = siclip("shards", "--urls", urls, "--data", tmp_path / "data", *args, "--budget", str(budget), check=False)
    last = res.stderr.strip().splitlines()[-1]
    assert res.returncode == 2 and "exceeds the budget" in last and "--fit" in last
    assert manifest_json(tmp_path / "data")["used_bytes"] <= budget


def test_budget_below_need_with_fit_never_exceeds_it(shards_data, good_rows, tmp_path):
    budget = int(_full_need(shards_data) * 0.9)
    urls = write_list(tmp_path / "urls.parquet", good_rows)
    args = [a for a in SMALL if a not in ("--budget", "1GB")] + ["--samples-per-shard", "3"]
    res = siclip("shards", "--urls", urls, "--data", tmp_path / "data", *args, "--budget", str(budget), "--fit",
                 check=False)
    assert res.returncode in (0, 3), res.stderr
    assert "--fit: keeping" in res.stderr
    info = manifest_json(tmp_path / "data")
    assert 0 < info["stages"]["shards"]["samples"] < len(good_rows)
    assert info["used_bytes"] <= budget
    assert sum(p.stat().st_size for p in (tmp_path / "data" / "shards").glob("0*")) <= budget


def _bounds(urls: Path, sps: int = 8, image_size: int = 64) -> list[int]:
    """The worst case of each shard of the list, as the runner's admission computes it."""
    table = pq.read_table(urls)
    cfg = ShardsConfig(urls=str(urls), image_size=image_size, samples_per_shard=sps)
    return [shard_bound(table.slice(i, sps), cfg) for i in range(0, table.num_rows, sps)]


def test_a_bulk_shard_whose_worst_case_does_not_fit_is_never_started(shards_data, good_rows, tmp_path):
    """The plan fits the budget, but the pilot plus the next shard's worst case does not."""
    urls = write_list(tmp_path / "urls.parquet", good_rows)
    bounds = _bounds(urls)
    pilot = sum(f.bytes for f in StageManifest.load(DataRoot(shards_data), "shards").entries["00000"].files.values())
    budget = pilot // 2 + bounds[1]  # a pilot that came out smaller by half would still leave shard 1 out
    assert bounds[0] <= budget and 3 * pilot < budget, "the sizes this test relies on have changed"
    args = [a for a in SMALL if a not in ("--budget", "1GB")]
    res = siclip("shards", "--urls", urls, "--data", tmp_path / "data", *args, "--budget", budget, check=False)
    assert res.returncode == 3, res.stderr
    assert "plan: " in res.stderr and "exceeds" not in res.stderr  # the plan itself fitted
    assert res.stderr.strip().splitlines()[-1].startswith("shards: stopped at the budget: shard 00001 could take up to")
    assert sorted(StageManifest.load(DataRoot(tmp_path / "data"), "shards").entries) == ["00000"]  # of 3 planned
    assert not list((tmp_path / "data" / "shards").glob("00001*"))


def test_the_planner_cuts_waves_that_fit_the_budget_beside_the_bytes_in_use(shards_root):
    """Every backend gets the same waves: in order, each as many shards as fit what the finished
    shards leave of the budget, each planned after the one before; it stops at a shard that never fits."""
    from siclip.pipeline.download import ShardRunner

    manifest = StageManifest.load(shards_root, "shards")
    used = manifest.total_bytes
    assert used > 0
    runner = ShardRunner(shards_root, ShardsConfig(urls="-", data=str(shards_root.root)), manifest, used + 100)
    jobs = [(sid, None, bound) for sid, bound in [(3, 40), (4, 40), (5, 30), (6, 100), (7, 60), (8, 101), (9, 1)]]
    waves = [[sid for sid, _, _ in wave] for wave in runner.waves_of(jobs)]
    assert waves == [[3, 4], [5], [6], [7]]
    assert runner.stopped_by_budget == (8, 101) and runner.stopped_by_disk is None


def test_a_pilot_whose_worst_case_exceeds_the_budget_is_never_started(good_rows, tmp_path):
    urls = write_list(tmp_path / "urls.parquet", good_rows)
    budget = _bounds(urls)[0] - 1
    args = [a for a in SMALL if a not in ("--budget", "1GB")]
    res = siclip("shards", "--urls", urls, "--data", tmp_path / "data", *args, "--budget", budget, check=False)
    assert res.returncode == 2
    assert "cannot hold even the pilot shard" in res.stderr.strip().splitlines()[-1]
    assert not (tmp_path / "data").exists()  # refused before it started, and a failed start leaves nothing


@pytest.fixture
def small_disk(tmpfs):
    """A 1 MB file system (tmpfs), mounted for one test."""
    return tmpfs("1m")


def test_a_pilot_larger_than_the_free_disk_is_refused(small_disk, good_rows, tmp_path):
    urls = write_list(tmp_path / "urls.parquet", good_rows)
    need = _bounds(urls, image_size=256)[0]
    assert need > 1_000_000
    res = siclip("shards", "--urls", urls, "--data", small_disk / "data", *SMALL, "--image-size", "256", check=False)
    last = res.stderr.strip().splitlines()[-1]
    assert res.returncode == 2
    assert "the pilot shard could need" in last and "but the disk has" in last and "MB free (budget 1 GB)" in last
    assert not list(small_disk.rglob("*.tar"))


def test_a_finished_unlisted_shard_is_adopted_and_a_truncated_one_removed(shards_root, good_rows, tmp_path):
    """What a crash between a shard's move into shards/ and the manifest save leaves behind."""
    data = shards_root.root
    m = StageManifest.load(shards_root, "shards")
    kept, cut = data / "shards" / "00001.tar", data / "shards" / "00002.tar"
    kept_before = (sha256_file(kept), kept.stat().st_mtime_ns, m.entries["00001"])
    del m.entries["00001"], m.entries["00002"]
    m.save(shards_root)
    cut.write_bytes(cut.read_bytes()[:3000])
    res = siclip("shards", "--urls", write_list(tmp_path / "urls.parquet", good_rows), "--data", data, *SMALL)
    assert "shards: adopted shard 00001, finished by an interrupted run" in res.stderr
    assert "shards: removing incomplete shard 00002 left by an interrupted run" in res.stderr
    after = StageManifest.load(shards_root, "shards")
    assert (sha256_file(kept), kept.stat().st_mtime_ns) == kept_before[:2]  # adopted as it was, not downloaded again
    assert after.entries["00001"].files == kept_before[2].files
    assert sorted(after.entries) == ["00000", "00001", "00002"]
    assert siclip("manifest", data, "--verify").returncode == 0
    assert sorted(s["url"] for s in tar_samples(data)) == sorted(u for u, _ in good_rows)


def test_a_reserve_larger_than_the_budget_is_refused_before_anything_runs(good_rows, tmp_path):
    urls = write_list(tmp_path / "urls.parquet", good_rows)
    res = siclip("shards", "--urls", urls, "--data", tmp_path / "data", "--budget", "1GB", "--reserve", "2GB", check=False)
    assert res.returncode == 2
    assert res.stderr.strip().splitlines()[-1] == ("siclip shards: error: the reserve 2 GB leaves nothing of the "
                                                   "budget 1 GB for the shards: lower --reserve or raise --budget")
    assert not (tmp_path / "data").exists()


def test_a_shard_that_img2dataset_fails_is_named_and_the_job_exits_1(good_rows, tmp_path, capfd):
    from siclip.pipeline.download import ShardRunner
    from siclip.pipeline.stage import _finish

    root = DataRoot(tmp_path / "data")
    cfg = ShardsConfig(urls="-", data=str(root.root), image_size=64, samples_per_shard=4, processes=2, threads=4)
    manifest = StageManifest("shards")
    good = pa.table({"url": [u for u, _ in good_rows[:4]], "caption": [c for _, c in good_rows[:4]]})
    bad = good.drop_columns(["caption"])  # img2dataset fails the whole shard when a column it needs is missing
    runner = ShardRunner(root, cfg, manifest, budget_bytes=10**9)
    runner.run([(1, good, shard_bound(good, cfg)), (2, bad, shard_bound(good, cfg))])
    assert runner.failed == [2] and sorted(manifest.entries) == ["00001"]
    assert not list(runner.staging.iterdir())
    assert _finish(root, cfg, manifest, runner, time.monotonic()) == 1
    err = capfd.readouterr().err
    assert "shards: shard 00002 failed: img2dataset could not download it" in err
    assert err.strip().splitlines()[-1] == "shards: 1 shard(s) failed (00002); rerun the same command to retry them"


def test_verify_catches_a_flipped_byte_and_a_truncated_tar(shards_root):
    data = shards_root.root
    assert siclip("manifest", data, "--verify").returncode == 0
    t0, t1 = data / "shards" / "00000.tar", data / "shards" / "00001.tar"
    gone = data / "shards" / "00002.parquet"
    raw = bytearray(t0.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    t0.write_bytes(bytes(raw))
    t1.write_bytes(t1.read_bytes()[:3000])
    gone.unlink()
    res = siclip("manifest", data, "--verify", check=False)
    assert res.returncode == 1
    bad = [line for line in res.stderr.splitlines() if line.startswith("verify: shards:")]
    assert len(bad) == 3
    assert str(t0) in bad[0] and "sha256 mismatch" in bad[0]
    assert str(t1) in bad[1] and "size" in bad[1]
    assert bad[2] == f"verify: shards: {gone}: missing"
    assert res.stderr.strip().splitlines()[-1] == "verify: 6/9 files ok, 3 missing or corrupt"


def test_rerun_repairs_a_damaged_shard(shards_root, good_rows, tmp_path):
    data = shards_root.root
    t1 = data / "shards" / "00001.tar"
    t1.write_bytes(t1.read_bytes()[:3000])
    urls = write_list(tmp_path / "urls.parquet", good_rows)
    res = siclip("shards", "--urls", urls, "--data", data, *SMALL)
    assert "00001 is listed but its files are missing or changed" in res.stderr
    assert siclip("manifest", data, "--verify").returncode == 0
    assert sorted(s["url"] for s in tar_samples(data)) == sorted(u for u, _ in good_rows)


def test_retry_failed_downloads_only_retryable_failures(tmp_path, image_server, refused_url):
    from demo.loopback import ImageServer

    with ImageServer(dict(image_server.files)) as server:  # its own server: this test makes it "recover"
        good = [(f"{server.base}/{p}", c) for p, c in image_server.good_rows[:4]]
        rows = good + [(u, c) for u, c, o in fault_rows(server.base, refused_url)
                       if o in ("http_5xx", "http_404", "timeout", "decode_error")]
        urls = write_list(tmp_path / "urls.parquet", rows)
        data = tmp_path / "data"
        args = ["shards", "--urls", urls, "--data", data, *SMALL, *FAULT_TIMEOUT]
        siclip(*args)
        first = StageManifest.load(DataRoot(data), "shards")
        # the slow and the 500 URLs now answer with a picture
        server.files["status/500"] = server.files["img/000001.png"]
        server.files[f"slow/{SLOW_S}/img/000000.jpg"] = server.files["img/000000.jpg"]
        res = siclip(*args, "--retry-failed")
        assert "2 rows failed for a retryable reason" in res.stderr
        second = StageManifest.load(DataRoot(data), "shards")
        new = sorted(set(second.entries) - set(first.entries))
        assert len(new) == 1 and second.entries[new[0]].rows == 2
        assert second.total_samples == first.total_samples + 2
        again = siclip(*args, "--retry-failed")
    assert "0 rows failed for a retryable reason" in again.stderr
    assert StageManifest.load(DataRoot(data), "shards").entries.keys() == second.entries.keys()


def test_missing_list_and_missing_column_are_one_line_errors(tmp_path, good_rows):
    res = siclip("shards", "--urls", tmp_path / "nope.csv", "--data", tmp_path / "d", check=False)
    assert res.returncode == 2
    assert res.stderr.strip().splitlines()[-1] == f"siclip shards: error: URL list {tmp_path / 'nope.csv'} does not exist"
    urls = write_list(tmp_path / "urls.parquet", good_rows[:2])
    res = siclip("shards", "--urls", urls, "--data", tmp_path / "d", "--caption-col", "text", check=False)
    last = res.stderr.strip().splitlines()[-1]
    assert res.returncode == 2 and "no column 'text'" in last and "columns are: url, caption" in last
    res = siclip("shards", "--urls", urls, "--data", tmp_path / "d", "--set", "image_sise=64", check=False)
    assert "unknown key 'image_sise' (did you mean 'image_size'?)" in res.stderr
    assert not (tmp_path / "d" / "shards").exists() or not any((tmp_path / "d" / "shards").glob("*.tar"))


def test_a_plan_larger_than_the_free_disk_is_refused(small_disk, tmp_path, good_rows):
    """On a 1 MB file system, with a budget of 1 GB: the error names both figures."""
    urls = write_list(tmp_path / "urls.parquet", good_rows * 20)
    res = siclip("shards", "--urls", urls, "--data", small_disk / "data", "--image-size", "64", "--samples-per-shard", "2",
                 "--processes", "1", "--budget", "1GB", "--reserve", "0%", "--allow-private-addresses", check=False)
    last = res.stderr.strip().splitlines()[-1]
    assert res.returncode == 2, res.stderr
    assert "the plan needs" in last and "but the disk has" in last and "free (budget 1 GB)" in last
    assert "warning: the budget 1 GB is larger than the free disk" in res.stderr


FIT_ARGS = [a for a in SMALL if a not in ("--budget", "1GB")] + ["--samples-per-shard", "3", "--image-size", "128"]


@pytest.fixture(scope="module")
def full_128(tmp_path_factory, good_rows):
    """The good pictures at 128 px with no budget pressure: what --fit has to squeeze."""
    d = tmp_path_factory.mktemp("full128")
    urls = write_list(d / "urls.parquet", good_rows)
    siclip("shards", "--urls", urls, "--data", d / "data", *FIT_ARGS, "--budget", "1GB")
    return urls, d / "data"


def test_fit_by_quality_lowers_quality_instead_of_rows(full_128, tmp_path):
    urls, full = full_128
    budget = int(_full_need(full) * 0.85)
    args = ["shards", "--urls", urls, "--data", tmp_path / "data", *FIT_ARGS, "--budget", budget, "--fit",
            "--set", "fit_by=quality"]
    res = siclip(*args, check=False)
    assert res.returncode in (0, 3), res.stderr
    assert "the pilot shard is downloaded again with it" in res.stderr
    m = StageManifest.load(DataRoot(tmp_path / "data"), "shards")
    assert m.params["quality"] < 95
    pilot = tmp_path / "data" / "shards" / "00000.tar"
    assert _jpg_bytes(pilot) < _jpg_bytes(full / "shards" / "00000.tar")  # the pilot was redone at that quality
    pilot_sha = sha256_file(pilot)
    # the same command again resumes with the quality --fit chose instead of refusing the changed setting
    again = siclip(*args, check=False)
    assert again.returncode in (0, 3), again.stderr
    resumed = StageManifest.load(DataRoot(tmp_path / "data"), "shards")
    assert resumed.entries.keys() >= m.entries.keys() and resumed.params["quality"] == m.params["quality"]
    assert sha256_file(pilot) == pilot_sha  # kept, not redone
    assert manifest_json(tmp_path / "data")["used_bytes"] <= budget


def test_fit_by_image_size_lowers_the_size_instead_of_rows(full_128, tmp_path):
    from PIL import Image
    import io

    urls, full = full_128
    budget = int(_full_need(full) * 0.85)
    res = siclip("shards", "--urls", urls, "--data", tmp_path / "data", *FIT_ARGS, "--budget", budget, "--fit",
                 "--set", "fit_by=image_size", check=False)
    assert res.returncode in (0, 3), res.stderr
    assert "--fit: image_size" in res.stderr and "the pilot shard is downloaded again with it" in res.stderr
    m = StageManifest.load(DataRoot(tmp_path / "data"), "shards")
    size = m.params["image_size"]
    assert size < 128 and m.params["quality"] == 95
    with tarfile.open(tmp_path / "data" / "shards" / "00000.tar") as tar:  # the pilot was redone at that size
        sizes = {Image.open(io.BytesIO(tar.extractfile(x).read())).size for x in tar if x.name.endswith(".jpg")}
    assert sizes == {(size, size)}
    assert manifest_json(tmp_path / "data")["used_bytes"] <= budget
