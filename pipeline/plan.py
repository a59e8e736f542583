"""Storage planning: bytes per row measured on a pilot shard, projected over the list, checked
against the budget and the free disk; and a worst-case size per shard, so that no shard starts
that could push the data root over its budget."""

from __future__ import annotations

import io
import json
from dataclasses import dataclass

import pyarrow as pa

from siclip.manifests.errors import SiclipError
from siclip.manifests.storage import format_size
from siclip.pipeline.reasons import classify

TAR_BLOCK = 512
STATS_FIXED = 4096  # img2dataset's _stats.json without its error counts
STATS_PER_ERROR = 512  # one distinct error message and its count; the counter keeps at most 1000
PARQUET_FILE_BOUND = 16 * 1024  # schema and footer
PARQUET_ROW_OVERHEAD = 1024  # key, status, sizes, sha256, error message
JSON_FIXED = 1024  # the .json member beyond url and caption (key, status, sizes, sha256), indented
EXIF_BOUND = 64 * 1024


def _pad(n: int) -> int:
    return TAR_BLOCK + -(-n // TAR_BLOCK) * TAR_BLOCK  # header + content padded to whole blocks


def image_bound(cfg) -> int:
    """The most bytes one encoded image can take at these settings (uncompressed RGB plus headers)."""
    side = cfg.image_size
    pixels = {"center_crop": side * side, "border": side * side, "keep_ratio_largest": side * side,
              "keep_ratio": int(side * side * cfg.max_aspect_ratio), "no": cfg.max_image_pixels}[cfg.resize_mode]
    return int(pixels * 3 * 1.1) + 2048  # cv2 writes no ICC or EXIF segments


def extra_json_bytes(table: pa.Table) -> list[int]:
    """Per row, the bytes its extra columns (those after url and caption) add to its .json: exactly their
    json.dumps(indent=4) as img2dataset writes them, one level deep in the sample's object."""
    extras = table.column_names[2:]
    if not extras:
        return [0] * table.num_rows
    return [len(json.dumps(row, indent=4)) for row in table.select(extras).to_pylist()]


def shard_bound(table: pa.Table, cfg) -> int:
    """Worst-case bytes of the shard made from `table` (tar + parquet + stats), from its rows' text sizes."""
    url_len = pa.compute.binary_length(table.column("url").cast(pa.binary())).to_pylist()
    cap_len = pa.compute.binary_length(table.column("caption").cast(pa.binary())).to_pylist()
    img = _pad(image_bound(cfg))
    exif = EXIF_BOUND if cfg.extract_exif else 0
    tar = 2 * TAR_BLOCK + 20 * TAR_BLOCK  # end-of-archive blocks and slack for tar record padding
    parquet = PARQUET_FILE_BOUND
    for u, c, x in zip(url_len, cap_len, extra_json_bytes(table)):
        meta = 2 * (u + c) + x + JSON_FIXED + exif  # json escapes can double a string
        tar += img + _pad(c) + _pad(meta)
        parquet += u + c + x + PARQUET_ROW_OVERHEAD + exif
    return tar + parquet + STATS_FIXED + STATS_PER_ERROR * min(len(url_len), 1000)


@dataclass
class Plan:
    """What the bulk of the download is expected to cost."""

    bytes_per_row: float
    rows: int
    done_bytes: int
    budget_bytes: int
    reserve_bytes: int
    other_stages_bytes: int

    @property
    def planned_bytes(self) -> int:
        return int(self.bytes_per_row * self.rows)

    @property
    def limit_bytes(self) -> int:
        """What the shards may use: the budget less the reserve and less what other stages already use."""
        return self.budget_bytes - self.reserve_bytes - self.other_stages_bytes

    def describe(self) -> str:
        return (f"plan: {format_size(self.bytes_per_row)}/row × {self.rows:,} rows = {format_size(self.planned_bytes)} "
                f"of {format_size(self.budget_bytes)}; {format_size(self.reserve_bytes)} reserved for captions, "
                f"teacher embeddings and checkpoints")


def check_fits(plan: Plan, free_disk: int, pending_bytes: int) -> None:
    """Raise when the plan cannot fit the free disk; the budget check is the caller's (it may --fit)."""
    if pending_bytes > free_disk:
        raise SiclipError(f"the plan needs {format_size(pending_bytes)} more but the disk has {format_size(free_disk)} free "
                          f"(budget {format_size(plan.budget_bytes)}); free space or use --fit with a smaller --budget")


def rows_that_fit(plan: Plan) -> int:
    """The largest row count whose projected bytes stay within the shards' share of the budget."""
    return max(0, int(plan.limit_bytes // plan.bytes_per_row)) if plan.bytes_per_row > 0 else plan.rows


def reencoded_bytes(tar_path, image_size: int, quality: int, encode_format: str, resize_mode: str) -> tuple[int, int]:
    """(image bytes now, image bytes at the candidate settings) for the images of a pilot tar, by
    re-encoding them with Pillow: an estimate of what --fit saves by lowering quality or size."""
    import tarfile

    from PIL import Image

    now = new = 0
    fmt = {"jpg": "JPEG", "webp": "WEBP", "png": "PNG"}[encode_format]
    with tarfile.open(tar_path) as tar:
        for m in tar:
            if not m.name.endswith("." + encode_format):
                continue
            data = tar.extractfile(m).read()
            now += len(data)
            img = Image.open(io.BytesIO(data))  # stage 1's own output, re-encoded as it is only to count bytes
            img.load()
            if max(img.size) != image_size:
                scale = image_size / (min(img.size) if resize_mode in ("center_crop", "keep_ratio") else max(img.size))
                img = img.resize((max(1, round(img.width * scale)), max(1, round(img.height * scale))), Image.BILINEAR)
            buf = io.BytesIO()
            img.save(buf, fmt, **({} if fmt == "PNG" else {"quality": quality}))
            new += buf.tell()
    return now, new


def stats_reasons(stats: dict) -> dict[str, int]:
    """Failures by reason from an img2dataset _stats.json."""
    out: dict[str, int] = {}
    for msg, n in stats.get("status_dict", {}).items():
        if msg == "success":
            continue
        r = classify(msg)
        out[r] = out.get(r, 0) + int(n)
    return out


def load_stats(path) -> dict:
    try:
        return json.loads(open(path).read())
    except (OSError, json.JSONDecodeError) as e:
        raise SiclipError(f"{path}: unreadable img2dataset stats ({e})") from None
