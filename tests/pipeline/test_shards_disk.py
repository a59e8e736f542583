"""`siclip shards` on a disk that fills up: a real tmpfs, filled by the test at a chosen moment. The
job stops in one line, keeps every shard it finished, and the same command, rerun once there is
room, ends with every sample exactly once."""

from __future__ import annotations

import json
import tarfile

import pyarrow as pa
import pytest
from siclip_testing import SMALL, fill_disk, siclip, write_list

from siclip.manifests.errors import DiskError
from siclip.manifests.layout import DataRoot
from siclip.manifests.manifest import StageManifest
from siclip.pipeline.config import ShardsConfig
from siclip.pipeline.download import ShardRunner


def tar_urls(data) -> list[str]:
    out = []
    for tar_path in sorted((data / "shards").glob("*.tar")):
        with tarfile.open(tar_path) as tar:
            out += [json.loads(tar.extractfile(m).read())["url"] for m in tar if m.name.endswith(".json")]
    return out


def test_a_disk_that_fills_up_mid_run_stops_the_job_in_one_line_and_the_rerun_finishes(tmpfs, image_server, tmp_path):
    from demo.loopback import ImageServer

    disk = tmpfs("4m")
    data = disk / "data"
    filler = []
    with ImageServer(dict(image_server.files)) as server:  # its own server: the test hooks a request
        rows = [(f"{server.base}/{p}", c) for p, c in image_server.good_rows]
        urls = write_list(tmp_path / "urls.parquet", rows)
        args = ["shards", "--urls", urls, "--data", data, *SMALL, "--processes", "1"]
        # the disk fills up as shard 00001 downloads its first picture
        server.before[image_server.good_rows[8][0]] = lambda: filler.append(fill_disk(disk))
        res = siclip(*args, check=False)
        assert filler, "the hook never ran: " + res.stderr[-2000:]
        assert "Traceback" not in res.stderr, res.stderr
        lines = res.stderr.strip().splitlines()
        assert res.returncode == 1, res.stderr[-3000:]
        assert lines[-2].startswith("shards: stopped at the free disk: the disk holding ")
        assert lines[-2].endswith("make room and rerun the same command (the 1 finished shard(s) are kept)")
        assert lines[-1] == "shards: 1 shard(s) failed (00001); rerun the same command to retry them"
        assert any(line.startswith("shards: shard 00001 failed: ") and "No space left on device" in line
                   for line in lines)
        assert sorted(StageManifest.load(DataRoot(data), "shards").entries) == ["00000"]  # 00002 never started
        assert siclip("manifest", data, "--verify").returncode == 0  # what was finished is whole

        filler[0].unlink()
        again = siclip(*args)
    assert "Traceback" not in again.stderr
    assert sorted(StageManifest.load(DataRoot(data), "shards").entries) == ["00000", "00001", "00002"]
    assert sorted(tar_urls(data)) == sorted(u for u, _ in rows)
    assert siclip("manifest", data, "--verify").returncode == 0
    assert not any((data / "work" / "shards" / "staging").iterdir())


def test_a_shard_whose_worst_case_exceeds_the_free_disk_is_never_started(tmpfs, image_server, tmp_path):
    """The disk fills up during the pilot, leaving room for what the bulk really needs but not for a
    shard's worst case: the bulk does not start (exit 3), and a rerun once there is room finishes."""
    from demo.loopback import ImageServer

    disk = tmpfs("4m")
    data = disk / "data"
    filler = []
    with ImageServer(dict(image_server.files)) as server:
        rows = [(f"{server.base}/{p}", c) for p, c in image_server.good_rows]
        urls = write_list(tmp_path / "urls.parquet", rows)
        args = ["shards", "--urls", urls, "--data", data, *SMALL]
        bound = _bound_of(urls)
        # as the pilot asks for its last picture, the disk is left with a little over what the pilot still writes
        server.before[image_server.good_rows[7][0]] = lambda: filler.append(fill_disk(disk, leave=bound // 2))
        res = siclip(*args, check=False)
        assert filler and res.returncode == 3, res.stderr[-3000:]
        assert "Traceback" not in res.stderr
        last = res.stderr.strip().splitlines()[-1]
        assert last.startswith(f"shards: stopped at the free disk: shard 00001 could take up to ")
        assert "but the disk holding" in last and "make room and rerun the same command (the 1 finished shard(s) are kept)" in last
        assert sorted(StageManifest.load(DataRoot(data), "shards").entries) == ["00000"]
        assert not any((data / "work" / "shards" / "staging").iterdir())  # nothing was started
        filler[0].unlink()
        siclip(*args)
    assert sorted(tar_urls(data)) == sorted(u for u, _ in rows)


def _bound_of(urls) -> int:
    import pyarrow.parquet as pq

    from siclip.pipeline.plan import shard_bound

    return shard_bound(pq.read_table(urls).slice(8, 8), ShardsConfig(urls="-", image_size=64))


def test_a_full_disk_refuses_the_shard_input_by_name(tmpfs):
    """pyarrow's OSError 28 (it names no file) becomes a DiskError naming the file it was writing."""
    disk = tmpfs("256k")
    root = DataRoot(disk / "data")
    runner = ShardRunner(root, ShardsConfig(urls="-", data=str(root.root)), StageManifest("shards"), 10**9)
    fill_disk(disk)
    table = pa.table({"url": ["http://127.0.0.1/a.jpg"] * 2000, "caption": ["x" * 100] * 2000})
    with pytest.raises(DiskError, match=r"cannot write .*/work/shards/input/00003\.arrow: No space left on device "
                                        r"\(errno 28\); make room and rerun the same command"):
        runner._write_input(3, table)
