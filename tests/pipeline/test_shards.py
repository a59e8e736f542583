"""`siclip shards`: real img2dataset against a loopback server, real tars, real SIGKILL."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest
from siclip_testing import REPO, SMALL, siclip, write_list

from manifests.layout import DataRoot
from manifests.manifest import StageManifest


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
    res = siclip("shards", "--urls", urls, "--data", tmp_path / "data", *SMALL)
    assert "refused: no_url 1, scheme_file 1" in res.stderr
    m = StageManifest.load(DataRoot(tmp_path / "data"), "shards")
    failures: dict[str, int] = {}
    for e in m.entries.values():
        for r, n in e["failures"].items():
            failures[r] = failures.get(r, 0) + n
    expected: dict[str, int] = {}
    for _, _, outcome in bad_rows:
        if outcome not in ("success", "scheme_file", "no_url"):
            expected[outcome] = expected.get(outcome, 0) + 1
    assert failures == expected
    assert m.total_samples == 6 + 1  # the good pictures and the 1x1 one
    assert sum(e["rows"] for e in m.entries.values()) == len(rows) - 2
    assert len(tar_samples(tmp_path / "data")) == 7
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
    t = time.monotonic()
    res = siclip("shards", "--urls", urls, "--data", data, *SMALL)
    assert time.monotonic() - t < 30
    assert "every planned shard is already finished" in res.stderr
    assert {p.name: (p.stat().st_mtime_ns, p.stat().st_size) for p in (data / "shards").glob("0*")} == before
    assert (data / "manifests" / "shards.json").read_text() == manifest_before


def test_rerun_with_other_output_settings_is_refused(shards_root, good_rows, tmp_path):
    urls = write_list(tmp_path / "urls.parquet", good_rows)
    res = siclip("shards", "--urls", urls, "--data", shards_root.root, *SMALL, "--image-size", "96", check=False)
    assert res.returncode == 2
    assert "image_size=64 (now 96)" in res.stderr.strip().splitlines()[-1]


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


def test_verify_catches_a_flipped_byte_and_a_truncated_tar(shards_root):
    data = shards_root.root
    assert siclip("manifest", data, "--verify").returncode == 0
    t0, t1 = data / "shards" / "00000.tar", data / "shards" / "00001.tar"
    raw = bytearray(t0.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    t0.write_bytes(bytes(raw))
    t1.write_bytes(t1.read_bytes()[:3000])
    res = siclip("manifest", data, "--verify", check=False)
    assert res.returncode == 1
    bad = [line for line in res.stderr.splitlines() if line.startswith("verify: shards:")]
    assert len(bad) == 2
    assert str(t0) in bad[0] and "sha256 mismatch" in bad[0]
    assert str(t1) in bad[1] and "size" in bad[1]


def test_rerun_repairs_a_damaged_shard(shards_root, good_rows, tmp_path):
    data = shards_root.root
    t1 = data / "shards" / "00001.tar"
    t1.write_bytes(t1.read_bytes()[:3000])
    urls = write_list(tmp_path / "urls.parquet", good_rows)
    res = siclip("shards", "--urls", urls, "--data", data, *SMALL)
    assert "00001 is listed but its files are missing or changed" in res.stderr
    assert siclip("manifest", data, "--verify").returncode == 0
    assert sorted(s["url"] for s in tar_samples(data)) == sorted(u for u, _ in good_rows)


@pytest.mark.parametrize("kill_when", ["pilot", "bulk"])
def test_sigkill_then_rerun_leaves_every_sample_once(tmp_path, image_server, kill_when):
    # slow responses make each shard take about a second, so the kill lands mid-shard
    rows = [(f"{image_server.base}/slow/0.25/{p}", c) for p, c in image_server.good_rows] * 2
    urls = write_list(tmp_path / "urls.parquet", rows)
    data = tmp_path / "data"
    args = ["shards", "--urls", urls, "--data", data, *SMALL, "--threads", "2"]
    env = {**os.environ, "PYTHONPATH": str(REPO), "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "manifests.cli", *map(str, args)], cwd=REPO, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    staging = data / "work" / "shards" / "staging"
    manifest = data / "manifests" / "shards.json"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if kill_when == "pilot" and staging.is_dir() and any(staging.glob("*.tar")):
            break
        if kill_when == "bulk" and manifest.exists() and len(json.loads(manifest.read_text())["entries"]) >= 2 \
                and any(staging.glob("*.tar")):
            break
        time.sleep(0.05)
    else:
        proc.kill()
        pytest.fail("the job never reached the point to kill it")
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    time.sleep(1.0)
    # no orphaned worker goes on writing after its parent died
    sizes = {p: p.stat().st_size for p in staging.glob("*")}
    time.sleep(1.5)
    assert {p: p.stat().st_size for p in staging.glob("*") if p.exists()} == {p: s for p, s in sizes.items() if p.exists()}

    siclip(*args)
    samples = tar_samples(data)
    urls_got = sorted(s["url"] for s in samples)
    assert urls_got == sorted(u for u, _ in rows)  # every sample, each exactly once (the list repeats each URL twice)
    assert len({s["key"] for s in samples}) == len(samples)
    assert siclip("manifest", data, "--verify").returncode == 0
    assert not list(staging.glob("*"))
    m = StageManifest.load(DataRoot(data), "shards")
    assert sorted(m.entries) == [f"{i:05d}" for i in range(6)]


def test_retry_failed_downloads_only_retryable_failures(tmp_path, good_rows, bad_rows, image_server):
    rows = good_rows[:4] + [(u, c) for u, c, o in bad_rows if o in ("http_5xx", "http_404", "timeout", "decode_error")]
    urls = write_list(tmp_path / "urls.parquet", rows)
    data = tmp_path / "data"
    siclip("shards", "--urls", urls, "--data", data, *SMALL)
    first = StageManifest.load(DataRoot(data), "shards")
    # the server "recovers": the slow and the 500 URLs now answer with a picture
    image_server.files["status/500"] = image_server.files["img/000001.png"]
    image_server.files["slow/4/img/000000.jpg"] = image_server.files["img/000000.jpg"]
    try:
        res = siclip("shards", "--urls", urls, "--data", data, *SMALL, "--retry-failed")
    finally:
        del image_server.files["status/500"], image_server.files["slow/4/img/000000.jpg"]
    assert "2 rows failed for a retryable reason" in res.stderr
    second = StageManifest.load(DataRoot(data), "shards")
    new = sorted(set(second.entries) - set(first.entries))
    assert len(new) == 1 and second.entries[new[0]]["rows"] == 2
    assert second.total_samples == first.total_samples + 2
    again = siclip("shards", "--urls", urls, "--data", data, *SMALL, "--retry-failed")
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


def test_a_plan_larger_than_the_free_disk_is_refused(tmp_path, good_rows):
    """On a 1 MB file system, with a budget of 1 GB: the error names both figures."""
    import shutil

    mnt = tmp_path / "small"
    mnt.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mnt)], capture_output=True).returncode == 0
    try:
        urls = write_list(tmp_path / "urls.parquet", good_rows * 20)
        args = ["--urls", urls, "--data", mnt / "data", "--image-size", "64", "--samples-per-shard", "2",
                "--processes", "1", "--budget", "1GB", "--reserve", "0%"]
        if mounted:
            res = siclip("shards", *args, check=False)
            out = res.stderr
            code = res.returncode
        else:  # no permission to mount here: the same check with the free space the stage sees made small
            import io
            from contextlib import redirect_stderr

            import pipeline.stage as stage
            from manifests.cli import main

            old = stage.disk_free_bytes
            stage.disk_free_bytes = lambda _p: 1_000_000
            buf = io.StringIO()
            try:
                with redirect_stderr(buf):
                    code = main(["shards", *map(str, args)])
            finally:
                stage.disk_free_bytes = old
            out = buf.getvalue()
        last = out.strip().splitlines()[-1]
        assert code == 2, out
        assert "the plan needs" in last and "but the disk has" in last and "free (budget 1 GB)" in last
        assert "warning: the budget 1 GB is larger than the free disk" in out
    finally:
        if mounted:
            subprocess.run(["umount", str(mnt)], check=False)
    shutil.rmtree(mnt, ignore_errors=True)


def test_fit_by_quality_lowers_quality_instead_of_rows(good_rows, tmp_path):
    urls = write_list(tmp_path / "urls.parquet", good_rows)
    args = [a for a in SMALL if a not in ("--budget", "1GB")] + ["--samples-per-shard", "3", "--image-size", "128"]
    siclip("shards", "--urls", urls, "--data", tmp_path / "full", *args, "--budget", "1GB")
    budget = int(_full_need(tmp_path / "full") * 0.85)
    res = siclip("shards", "--urls", urls, "--data", tmp_path / "data", *args, "--budget", str(budget), "--fit",
                 "--set", "fit_by=quality", check=False)
    assert res.returncode in (0, 3), res.stderr
    assert "the pilot shard is downloaded again with it" in res.stderr
    m = StageManifest.load(DataRoot(tmp_path / "data"), "shards")
    assert m.params["quality"] < 95
    with tarfile.open(tmp_path / "data" / "shards" / "00000.tar") as tar:  # the pilot was redone at that quality
        assert sum(m.size for m in tar if m.name.endswith(".jpg")) < _jpg_bytes(tmp_path / "full" / "shards" / "00000.tar")
    # the same command again resumes with the quality --fit chose instead of refusing the changed setting
    again = siclip("shards", "--urls", urls, "--data", tmp_path / "data", *args, "--budget", str(budget), "--fit",
                   "--set", "fit_by=quality", check=False)
    assert again.returncode in (0, 3), again.stderr
    assert StageManifest.load(DataRoot(tmp_path / "data"), "shards").entries.keys() >= m.entries.keys()
    assert manifest_json(tmp_path / "data")["used_bytes"] <= budget
    assert manifest_json(tmp_path / "data")["used_bytes"] <= budget
