"""The shards stage's config (defaults in pipeline/shards.toml)."""

from __future__ import annotations

import ipaddress
import os
import typing
from pathlib import Path
from typing import ClassVar, Literal

from pydantic import field_validator, model_validator

from siclip.config import Field, bounded, config, flag
from siclip.manifests.storage import format_size, parse_reserve, parse_size

DEFAULT_CONFIG = Path(__file__).with_name("shards.toml")
ResizeMode = Literal["center_crop", "border", "keep_ratio", "keep_ratio_largest", "no"]
Distributor = Literal["multiprocessing", "pyspark", "ray"]
# img2dataset's `input_format` names ("json" reads JSON lines or one JSON list of objects); "auto": from each
# file's name. pipeline/urls.py reads compression from the file itself, so "csv.gz" reads as "csv".
InputFormat = Literal["auto", "parquet", "csv", "csv.gz", "tsv", "tsv.gz", "json", "json.gz", "jsonl", "jsonl.gz",
                      "txt", "txt.gz"]
INPUT_FORMATS = typing.get_args(InputFormat)
# what img2dataset writes into each sample's .json itself: a kept column by one of these names would be overwritten
SAMPLE_JSON_KEYS = ("url", "caption", "key", "status", "error_message", "width", "height", "original_width",
                    "original_height", "exif", "sha256")
ALLOW_PRIVATE_FLAG = "--allow-private-addresses"  # named by every refusal of a private address


@config
class ShardsConfig:
    WHERE: ClassVar[str] = ""  # its refusals name the key alone: `siclip shards: error: quality must be ...`

    urls: str = flag("", "URL list: a file, or a folder or glob of files ('lists/*.parquet'), read in file-name order: "
                     "parquet, csv, tsv, jsonl or txt (one URL per line), optionally .gz", metavar="FILE|DIR|GLOB")
    data: str = flag("data", "data root", metavar="DATA")
    budget: str = flag("1TB", "storage budget for everything under the data root", metavar="SIZE")
    reserve: str = flag("40%", "part of the budget kept for captions, teacher embeddings, checkpoints", metavar="PCT|SIZE")
    adopt: str = flag("", "instead of --urls: take in webdataset tars made elsewhere, an img2dataset output folder "
                      "or brace notation such as '/d/{00000..00099}.tar' (hard-linked into DATA/shards)",
                      metavar="SOURCE")
    copy: bool = flag(False, "with --adopt: copy the tars instead of hard-linking them (needed when SOURCE is on "
                      "another file system than DATA)", switch=True)
    image_size: int = flag(256, "target image size in pixels", metavar="PX", gt=0)
    resize_mode: ResizeMode = flag("center_crop", "img2dataset resize mode")
    encode_format: Literal["jpg", "webp", "png"] = flag("jpg", "image encoding in the shards")
    quality: int = flag(95, "JPEG/WebP quality", metavar="Q", ge=1, le=100)
    samples_per_shard: int = flag(10000, "rows of the URL list per shard", metavar="N", gt=0)
    processes: int = flag(0, "download processes (0: one per core)", metavar="N", ge=0, zero="one per core")
    threads: int = flag(64, "download threads per process", metavar="N", gt=0)
    input_format: InputFormat = flag("auto", "format of the list's files, as img2dataset names it (auto: from each "
                                     "file's name)")
    url_col: str = flag("url", "URL column of the list", metavar="NAME")
    caption_col: str = flag("caption", "caption column of the list (empty: none, every caption empty)", metavar="NAME")
    distributor: Distributor = flag("multiprocessing", "img2dataset distributor")
    fit: bool = flag(False, "lower the sample count (or --set fit_by=...) until the plan fits the budget", switch=True)
    retry_failed: bool = flag(False, "re-download samples that failed for a retryable reason into new shards",
                              switch=True)
    allow_private_addresses: bool = flag(False, "also fetch from loopback, private, link-local and other non-public "
                                         "addresses (data served on your own network)", switch=True)
    drop_duplicate_urls: bool = flag(False, "download each URL once: keep the first row of each (duplicates are "
                                     "counted and reported either way)", switch=True)
    # columns of the list kept in each sample's .json (and the shard's .parquet), as img2dataset's
    # save_additional_columns does, e.g. ["similarity", "uid"]
    save_additional_columns: list[str] = Field(default_factory=list)
    fit_by: Literal["samples", "quality", "image_size"] = "samples"  # what --fit lowers: samples, quality or image_size
    max_samples: int = 0  # download the first N valid rows of the list only; 0: every row
    timeout: float = bounded(10.0, gt=0, unit="seconds")  # seconds per download try, wall clock: connect, headers and body
    max_download_size: str = "20MB"  # a body over it fails as too_large
    allow_networks: list[str] = Field(default_factory=list)  # private networks fetched anyway, e.g. ["10.20.0.0/16"]
    retries: int = bounded(0, ge=0)  # further tries of a row whose download failed (not too_large or private_address rows)
    # an image whose shorter side is smaller (icons, tracking pixels) fails as image_too_small
    min_image_size: int = bounded(32, ge=0, zero="no minimum", unit="pixels")
    max_aspect_ratio: float = 0.0  # 0: no limit (keep_ratio needs one to bound the bytes of a sample)
    max_image_pixels: int = 89_478_485  # decoder limit against decompression bombs (PIL's default)
    extract_exif: bool = False  # EXIF in each sample's .json; off: unbounded, it would leave the worst case unknown
    allow_non_http: bool = False  # keep non-http(s) rows, not refused as scheme_*; the fetch reaches http(s) only
    # exit 1 when the net success rate falls below this fraction of the pilot's; 0: off
    min_success_ratio: float = bounded(0.5, ge=0, le=1)
    progress_every_s: float = 2.0  # seconds between progress lines on stderr

    @field_validator("max_download_size")
    @classmethod
    def _positive_size(cls, value: str) -> str:
        if parse_size(value) <= 0:
            raise ValueError(f"max_download_size must be more than 0 bytes, got {value!r}")
        return value

    @field_validator("allow_networks")
    @classmethod
    def _networks(cls, nets: list[str]) -> list[str]:
        for net in nets:
            try:
                ipaddress.ip_network(net, strict=False)
            except ValueError:
                raise ValueError(f"allow_networks: {net!r} is not a network such as 10.20.0.0/16 or fd00::/8") from None
        return nets

    @field_validator("save_additional_columns")
    @classmethod
    def _own_columns(cls, columns: list[str]) -> list[str]:
        taken = [c for c in columns if c in SAMPLE_JSON_KEYS]
        if taken:
            raise ValueError(f"save_additional_columns: {taken[0]!r} is a key img2dataset writes into each sample's "
                             f"json itself ({', '.join(SAMPLE_JSON_KEYS)}); the URL and caption columns are kept "
                             "as url and caption anyway")
        if len(set(columns)) < len(columns):
            raise ValueError(f"save_additional_columns names a column twice: {columns}")
        return columns

    @model_validator(mode="after")
    def _one_source_a_budget_and_a_bound(self) -> "ShardsConfig":
        if self.urls and self.adopt:
            raise ValueError("--urls and --adopt both given: download a URL list or adopt existing shards, "
                             "one per data root")
        if not (self.urls or self.adopt):
            raise ValueError("no URL list given: pass --urls FILE (or --adopt SOURCE for shards made elsewhere)")
        if self.copy and not self.adopt:
            raise ValueError("--copy copies the tars that --adopt takes in: pass --adopt SOURCE too")
        budget = parse_size(self.budget)
        reserve = parse_reserve(self.reserve, budget)
        if reserve >= budget:  # caught here, before the pilot downloads anything
            raise ValueError(f"the reserve {format_size(reserve)} leaves nothing of the budget {format_size(budget)} "
                             "for the shards: lower --reserve or raise --budget")
        if self.distributor != "multiprocessing":
            import importlib.util

            if importlib.util.find_spec(self.distributor) is None:
                raise ValueError(f"--distributor {self.distributor} needs its package: pip install "
                                 f"'siclip[{self.distributor}]'")
        if self.resize_mode == "keep_ratio" and self.max_aspect_ratio <= 0:
            raise ValueError("resize_mode keep_ratio leaves the long side unbounded, so the budget cannot be "
                             "enforced: add --set max_aspect_ratio=4 (or use center_crop/border/keep_ratio_largest)")
        return self

    @property
    def process_count(self) -> int:
        return self.processes or os.cpu_count() or 1

    # keys whose change makes different shards: a resumed run must match them
    OUTPUT_KEYS = ("image_size", "resize_mode", "encode_format", "quality", "samples_per_shard", "url_col",
                   "caption_col", "min_image_size", "max_aspect_ratio", "max_image_pixels", "extract_exif",
                   "save_additional_columns")
