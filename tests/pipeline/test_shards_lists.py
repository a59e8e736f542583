"""`siclip shards` on URL lists as the field has them: a folder of parquet files with extra columns kept in
each sample's json (LAION's and DataComp's layout), and a .txt list of one URL per line. Real img2dataset
against a loopback server."""

from __future__ import annotations

import json
import tarfile
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
from siclip_testing import SMALL, siclip

from siclip.manifests.layout import DataRoot
from siclip.manifests.manifest import StageManifest


def samples(data: Path) -> list[dict]:
    """Every sample in the shards as its .json, plus the text of its .txt member as `_txt`."""
    out = []
    for tar_path in sorted((data / "shards").glob("*.tar")):
        with tarfile.open(tar_path) as tar:
            members = {m.name: tar.extractfile(m).read() for m in tar}
        for name, raw in members.items():
            if name.endswith(".json"):
                out.append({**json.loads(raw), "_txt": members[name[:-5] + ".txt"].decode()})
    return out


def test_a_folder_of_parquet_files_keeps_its_extra_columns_in_each_sample(tmp_path, image_server):
    from demo.loopback import ImageServer

    with ImageServer(dict(image_server.files)) as server:  # its own server: this test makes a URL recover
        rows = [(f"{server.base}/{p}", c) for p, c in image_server.good_rows[:8]]
        rows.insert(3, (f"{server.base}/status/500", "a server error"))  # retried below, with its columns
        lists = tmp_path / "laion"
        lists.mkdir()
        for name, part in (("part-1.parquet", rows[5:]), ("part-0.parquet", rows[:5])):  # read in name order
            first = 0 if name == "part-0.parquet" else 5
            pq.write_table(pa.table({"URL": [u for u, _ in part], "TEXT": [c for _, c in part],
                                     "uid": [f"uid{first + i}" for i in range(len(part))],
                                     "similarity": [0.25 + first + i for i in range(len(part))]}), lists / name)
        data = tmp_path / "data"
        args = ["shards", "--urls", lists, "--data", data, *SMALL, "--url-col", "URL", "--caption-col", "TEXT",
                "--set", "save_additional_columns=['uid', 'similarity']"]
        res = siclip(*args)
        assert f"{lists}: 2 files, 9 rows, 9 to download" in res.stderr
        got = samples(data)
        assert len(got) == 8 == StageManifest.load(DataRoot(data), "shards").total_samples
        want = {u: (f"uid{i}", 0.25 + i, c) for i, (u, c) in enumerate(rows)}
        assert {s["url"]: (s["uid"], s["similarity"], s["caption"]) for s in got} == \
            {u: w for u, w in want.items() if "status" not in u}
        assert all(s["_txt"] == s["caption"] for s in got)
        # keyed in file-name order: part-0's rows first
        assert [s["uid"] for s in sorted(got, key=lambda s: s["key"])] == [f"uid{i}" for i in range(9) if i != 3]

        # a rerun resumes the same job: the same list, the same shards
        assert "every planned shard is already finished" in siclip(*args).stderr
        other = siclip(*args[:-1], "save_additional_columns=['uid']", check=False)
        assert other.returncode == 2
        assert "save_additional_columns=['uid', 'similarity'] (now ['uid'])" in other.stderr.strip().splitlines()[-1]

        server.files["status/500"] = server.files[image_server.good_rows[0][0]]
        siclip(*args, "--retry-failed")
    retried = [s for s in samples(data) if "status" in s["url"]]
    assert [(s["uid"], s["similarity"], s["caption"]) for s in retried] == [("uid3", 3.25, "a server error")]
    assert StageManifest.load(DataRoot(data), "shards").total_samples == 9


def test_a_txt_list_is_one_url_per_line(tmp_path, good_rows):
    urls = tmp_path / "urls.txt"
    urls.write_text(f"{good_rows[0][0]}\n\n{good_rows[1][0]}\r\n{good_rows[2][0]}\n")
    data = tmp_path / "data"
    res = siclip("shards", "--urls", urls, "--data", data, *SMALL)
    assert f"{urls}: 3 rows, 3 to download" in res.stderr
    got = samples(data)
    assert sorted(s["url"] for s in got) == sorted(u for u, _ in good_rows[:3])
    assert {(s["caption"], s["_txt"]) for s in got} == {("", "")}


def test_lists_that_cannot_be_read_are_one_line_errors_before_anything_downloads(tmp_path, good_rows):
    lists = tmp_path / "lists"
    lists.mkdir()
    res = siclip("shards", "--urls", f"{lists}/*.parquet", "--data", tmp_path / "d", *SMALL, check=False)
    assert res.returncode == 2
    assert res.stderr.strip().splitlines()[-1] == \
        f"siclip shards: error: URL list {lists}/*.parquet: the pattern matches no file"
    pq.write_table(pa.table({"url": [good_rows[0][0]], "caption": ["a"]}), lists / "a.parquet")
    (lists / "b.csv").write_text(f"url,caption\n{good_rows[1][0]},b\n")
    res = siclip("shards", "--urls", lists, "--data", tmp_path / "d", *SMALL, check=False)
    assert res.returncode == 2 and "mixes formats" in res.stderr.strip().splitlines()[-1]
    assert not (tmp_path / "d").exists()


def test_a_data_root_made_before_save_additional_columns_existed_is_refused_in_one_line(shards_root, good_rows,
                                                                                       tmp_path):
    from siclip_testing import write_list

    path = shards_root.manifest_path("shards")
    manifest = json.loads(path.read_text())
    del manifest["params"]["save_additional_columns"]  # as a siclip before this release wrote it
    path.write_text(json.dumps(manifest))
    before = path.read_bytes()
    urls = write_list(tmp_path / "urls.parquet", good_rows)
    res = siclip("shards", "--urls", urls, "--data", shards_root.root, *SMALL, check=False)
    assert res.returncode == 2
    assert res.stderr.strip().splitlines()[-1] == (
        f"siclip shards: error: {path}: params save_additional_columns unknown or missing; this siclip neither "
        f"writes nor reads that: rerun into a new data root")
    assert path.read_bytes() == before
