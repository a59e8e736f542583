"""`siclip shards` says what went wrong, early or at the end: a run far below its pilot's success
rate, URLs as browsers send them, duplicate URLs, the net outcome after --retry-failed, and a
failed start that leaves the data root as it found it."""

from __future__ import annotations

import threading

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from siclip_testing import SMALL, siclip, write_list

from siclip.manifests.layout import DataRoot
from siclip.manifests.manifest import StageManifest
from demo.loopback import ImageServer
from siclip.pipeline.urls import browser_url, read_url_list


def last_lines(res, n: int = 1) -> list[str]:
    assert "Traceback" not in res.stderr, res.stderr
    return res.stderr.strip().splitlines()[-n:]


def test_a_server_dying_mid_run_fails_the_run_against_its_pilot_and_retry_failed_recovers(image_server, tmp_path):
    files = dict(image_server.files)
    data = tmp_path / "data"
    with ImageServer(files) as server:
        # 6 shards: the same pictures twice, the second time through a route that answers at once
        rows = [(f"{server.base}/{route}{p}", c) for route in ("", "slow/0/") for p, c in image_server.good_rows]
        urls = write_list(tmp_path / "urls.parquet", rows)
        args = ["shards", "--urls", urls, "--data", data, *SMALL, "--processes", "1"]

        def die():  # as shard 00001 starts: connections are refused from now on (those accepted are answered)
            threading.Thread(target=lambda: (server.httpd.shutdown(), server.httpd.server_close())).start()

        server.before[image_server.good_rows[8][0]] = die
        res = siclip(*args, check=False)
    assert res.returncode == 1, res.stderr[-3000:]
    verdict = last_lines(res)[0]
    assert verdict.startswith("shards: the run succeeded for ") and "below 0.5 × the pilot's 100.0% (min_success_ratio)" in verdict
    assert "--retry-failed downloads the timeouts, 5xx and connection errors again" in verdict
    m = StageManifest.load(DataRoot(data), "shards")
    assert len(m.entries) == 6 and m.total_samples < 24  # every shard finished, badly
    # the verdict is the data root's: a rerun with nothing to do says it again, unless the floor is lowered
    # under the rate: the pilot's 8 rows (16.7%) and those of shard 00001 that the server accepted before it
    # went, which depends on the timing of 8 threads (9 and 15 of 48 seen)
    assert siclip(*args, check=False).returncode == 1
    assert siclip(*args, "--set", "min_success_ratio=0.1").returncode == 0

    with ImageServer(files, port=server.port):  # the server is back
        res = siclip(*args, "--retry-failed")
    done = next(line for line in res.stderr.splitlines() if line.startswith("shards: done:"))
    assert f"48/48 images (100.0%), net of {48 - m.total_samples} row(s) downloaded again by --retry-failed" in done
    assert "failures: none;" in done  # the net outcome: every row that failed was recovered


def test_urls_with_spaces_and_non_ascii_letters_are_fetched_as_browsers_send_them(image_server, tmp_path):
    jpeg = image_server.files[image_server.good_rows[0][0]]
    with ImageServer({"img/a%20b/caf%C3%A9.jpg": jpeg, "img/x%20y.jpg?s=1%202": jpeg}) as server:
        rows = [(f"{server.base}/img/a b/café.jpg", "space and accent"), (f"{server.base}/img/x y.jpg?s=1 2", "query")]
        res = siclip("shards", "--urls", write_list(tmp_path / "urls.parquet", rows), "--data", tmp_path / "data",
                     *SMALL)
    assert "2/2 images (100.0%)" in res.stderr


@pytest.mark.parametrize("url, sent", [
    ("http://h/a b/é.jpg", "http://h/a%20b/%C3%A9.jpg"),
    ("http://h/already%20escaped.jpg?q=a+b&r=%C3%A9", "http://h/already%20escaped.jpg?q=a+b&r=%C3%A9"),
    ("HTTP://h:8080/x#frag", "http://h:8080/x"),
    ("http://bücher.example/a", "http://xn--bcher-kva.example/a"),
    ("http://[::1]:81/ü", "http://[::1]:81/%C3%BC"),
])
def test_browser_url(url, sent):
    assert browser_url(url) == sent


@pytest.mark.parametrize("url", ["http:///nohost.jpg", "http://a b.example/x.jpg", "http://h:port/x.jpg"])
def test_urls_no_request_can_be_made_of_are_refused_up_front(tmp_path, url):
    pq.write_table(pa.table({"url": [url, "http://h/ok.jpg"], "caption": ["bad", "ok"]}), tmp_path / "l.parquet")
    urls = read_url_list(tmp_path / "l.parquet")
    assert urls.refused == {"malformed_url": 1} and urls.table.column("url").to_pylist() == ["http://h/ok.jpg"]


def test_duplicate_urls_are_reported_and_dropped_on_request(good_rows, tmp_path):
    rows = good_rows[:5] + [good_rows[0]] * 3
    path = write_list(tmp_path / "urls.parquet", rows)
    kept, dropped = read_url_list(path), read_url_list(path, drop_duplicates=True)
    assert (kept.table.num_rows, kept.duplicates, kept.refused) == (8, 3, {})
    assert (dropped.table.num_rows, dropped.duplicates, dropped.refused) == (5, 3, {"duplicate_url": 3})
    res = siclip("shards", "--urls", path, "--data", tmp_path / "kept", *SMALL)
    assert ("shards: warning: 3 row(s) repeat the URL of an earlier row and will be downloaded again, as identical "
            "samples; --drop-duplicate-urls keeps the first row of each URL") in res.stderr
    res = siclip("shards", "--urls", path, "--data", tmp_path / "dropped", *SMALL, "--drop-duplicate-urls")
    assert "refused: duplicate_url 3" in res.stderr and "repeat the URL" not in res.stderr
    assert StageManifest.load(DataRoot(tmp_path / "dropped"), "shards").total_samples == 5


def test_a_failed_start_leaves_the_data_root_as_it_found_it(tmp_path, good_rows):
    no_urls = write_list(tmp_path / "none.parquet", [("file:///etc/hostname", "a local file")])
    fresh = tmp_path / "fresh"
    res = siclip("shards", "--urls", no_urls, "--data", fresh, *SMALL, check=False)
    assert res.returncode == 2 and "no downloadable http(s) URL" in last_lines(res)[0]
    assert not fresh.exists()
    existing = tmp_path / "existing"
    (existing / "notes").mkdir(parents=True)
    (existing / "notes" / "keep.txt").write_text("mine\n")
    tiny_budget = ["--budget", "1000", "--reserve", "0%"]
    res = siclip("shards", "--urls", write_list(tmp_path / "urls.parquet", good_rows), "--data", existing, *SMALL,
                 *tiny_budget, check=False)
    assert res.returncode == 2 and "cannot hold even the pilot shard" in last_lines(res)[0]
    assert sorted(str(p.relative_to(existing)) for p in existing.rglob("*")) == ["notes", "notes/keep.txt"]


def test_images_under_the_minimum_size_fail_by_name_and_the_minimum_is_a_setting(image_server, tmp_path):
    rows = [(f"{image_server.base}/bad/one.png", "one pixel"), (f"{image_server.base}/{image_server.good_rows[0][0]}", "ok")]
    urls = write_list(tmp_path / "urls.parquet", rows)
    res = siclip("shards", "--urls", urls, "--data", tmp_path / "default", *SMALL)
    assert "1/2 images (50.0%)" in res.stderr and "failures: image_too_small 1" in res.stderr
    res = siclip("shards", "--urls", urls, "--data", tmp_path / "any", *SMALL, "--set", "min_image_size=0")
    assert "2/2 images (100.0%)" in res.stderr
