"""Storage planning in numbers: a shard's worst case bounds what it can really take, the plan's arithmetic,
and failure reasons counted from img2dataset's stats."""

from __future__ import annotations

import io
import json
import tarfile

import pyarrow as pa
import pytest

from siclip.manifests.errors import SiclipError
from siclip.pipeline.config import ShardsConfig
from siclip.pipeline.plan import (Plan, check_fits, image_bound, load_stats, reencoded_bytes, rows_that_fit, shard_bound,
                           stats_reasons)


def cfg(**kw) -> ShardsConfig:
    return ShardsConfig(urls="-", **kw)


def test_image_bound_is_an_uncompressed_picture_of_the_target_size_plus_headers():
    assert image_bound(cfg(image_size=64)) == int(64 * 64 * 3 * 1.1) + 2048
    assert image_bound(cfg(image_size=100, resize_mode="border")) == int(100 * 100 * 3 * 1.1) + 2048
    assert image_bound(cfg(image_size=10, resize_mode="keep_ratio", max_aspect_ratio=4)) == int(400 * 3 * 1.1) + 2048
    assert image_bound(cfg(resize_mode="no", max_image_pixels=1000)) == int(1000 * 3 * 1.1) + 2048


def test_shard_bound_grows_with_every_row_and_with_the_text_it_carries():
    def table(n, url="http://h/x.jpg", caption="c"):
        return pa.table({"url": [url] * n, "caption": [caption] * n})

    c = cfg(image_size=64)
    one, two = shard_bound(table(1), c), shard_bound(table(2), c)
    per_row = two - one
    assert per_row >= image_bound(c) + 3 * 512  # the image, the caption and the json members, each with a tar header
    assert shard_bound(table(1, caption="x" * 5000), c) >= one + 2 * 5000  # json escapes may double the caption
    assert shard_bound(table(1, url="http://h/" + "u" * 3000), c) >= one + 2.5 * 3000  # in the json and the parquet
    assert shard_bound(table(1), cfg(image_size=64, extract_exif=True)) > one + 64 * 1024


def test_shard_bound_holds_a_real_tar_of_its_rows():
    """The tar that webdataset writes for the rows, with the largest image they could have, fits the bound."""
    rows = pa.table({"url": [f"http://h/{i}.jpg" for i in range(5)], "caption": ["a caption " * 20] * 5})
    c = cfg(image_size=32)
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for i in range(5):
            meta = json.dumps({"url": rows["url"][i].as_py(), "caption": rows["caption"][i].as_py(), "key": f"{i:09d}",
                               "status": "success", "error_message": None, "width": 32, "height": 32,
                               "original_width": 32, "original_height": 32, "sha256": "0" * 64}, indent=4).encode()
            for ext, data in (("jpg", bytes(image_bound(c))), ("txt", rows["caption"][i].as_py().encode()), ("json", meta)):
                info = tarfile.TarInfo(f"{i:09d}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    assert buf.tell() <= shard_bound(rows, c)


def plan(**kw) -> Plan:
    return Plan(**{"bytes_per_row": 100.0, "rows": 1000, "done_bytes": 800, "budget_bytes": 200_000,
                   "reserve_bytes": 50_000, "other_stages_bytes": 30_000, **kw})


def test_plan_arithmetic():
    p = plan()
    assert p.planned_bytes == 100_000
    assert p.limit_bytes == 200_000 - 50_000 - 30_000
    assert rows_that_fit(p) == 1200
    assert rows_that_fit(plan(budget_bytes=90_000)) == 100
    assert rows_that_fit(plan(budget_bytes=10_000)) == 0
    assert rows_that_fit(plan(bytes_per_row=0)) == 1000
    assert p.describe() == ("plan: 100 B/row × 1,000 rows = 100 KB of 200 KB; 50 KB reserved for captions, teacher "
                            "embeddings and checkpoints")


def test_check_fits_compares_what_is_left_to_download_with_the_free_disk():
    check_fits(plan(), free_disk=1000, pending_bytes=1000)
    with pytest.raises(SiclipError, match="the plan needs 1 KB more but the disk has 999 B free .budget 200 KB."):
        check_fits(plan(), free_disk=999, pending_bytes=1001)


def test_failures_by_reason_from_the_stats(tmp_path):
    stats = {"status_dict": {"success": 5, "HTTP Error 404: Not Found": 2, "timed out": 1, "image too small": 3}}
    assert stats_reasons(stats) == {"http_404": 2, "timeout": 1, "image_too_small": 3}
    (tmp_path / "s.json").write_text(json.dumps(stats))
    assert load_stats(tmp_path / "s.json") == stats
    (tmp_path / "bad.json").write_text("{")
    with pytest.raises(SiclipError, match="bad.json: unreadable img2dataset stats"):
        load_stats(tmp_path / "bad.json")


def test_reencoding_at_a_lower_quality_or_size_shrinks_the_images(tmp_path):
    from PIL import Image

    from demo.loopback import make_image

    tar_path = tmp_path / "00000.tar"
    with tarfile.open(tar_path, "w") as tar:
        for i in range(3):
            img = Image.open(io.BytesIO(make_image(i, min_side=128, max_side=128)[0])).convert("RGB")
            buf = io.BytesIO()
            img.save(buf, "JPEG", quality=95)
            info = tarfile.TarInfo(f"{i:09d}.jpg")
            info.size = buf.tell()
            buf.seek(0)
            tar.addfile(info, buf)
    now, same = reencoded_bytes(tar_path, 128, 95, "jpg", "center_crop")
    _, lower = reencoded_bytes(tar_path, 128, 50, "jpg", "center_crop")
    _, smaller = reencoded_bytes(tar_path, 64, 95, "jpg", "center_crop")
    assert abs(same - now) < 0.1 * now and lower < 0.7 * now and smaller < 0.5 * now
