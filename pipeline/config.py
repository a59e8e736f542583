"""The shards stage's config (defaults in pipeline/shards.toml)."""

from __future__ import annotations

import ipaddress
import os
from dataclasses import dataclass, field
from pathlib import Path

from siclip.manifests.errors import SiclipError
from siclip.manifests.storage import format_size, parse_reserve, parse_size

DEFAULT_CONFIG = Path(__file__).with_name("shards.toml")
RESIZE_MODES = ["center_crop", "border", "keep_ratio", "keep_ratio_largest", "no"]
DISTRIBUTORS = ["multiprocessing", "pyspark", "ray"]
FIT_BY = ["samples", "quality", "image_size"]
# img2dataset's `input_format` names ("json" reads JSON lines or one JSON list of objects); "auto": from each
# file's name. pipeline/urls.py reads compression from the file itself, so "csv.gz" reads as "csv".
INPUT_FORMATS = ("auto", "parquet", "csv", "csv.gz", "tsv", "tsv.gz", "json", "json.gz", "jsonl", "jsonl.gz", "txt",
                 "txt.gz")
# what img2dataset writes into each sample's .json itself: a kept column by one of these names would be overwritten
SAMPLE_JSON_KEYS = ("url", "caption", "key", "status", "error_message", "width", "height", "original_width",
                    "original_height", "exif", "sha256")
ALLOW_PRIVATE_FLAG = "--allow-private-addresses"  # named by every refusal of a private address


def flag(default, help, **kw):
    return field(default=default, metadata={"flag": True, "help": help, **kw})


@dataclass
class ShardsConfig:
    urls: str = flag("", "URL list: a file, or a folder or glob of files ('lists/*.parquet'), read in file-name order: "
                     "parquet, csv, tsv, jsonl or txt (one URL per line), optionally .gz", metavar="FILE|DIR|GLOB")
    data: str = flag("data", "data root", metavar="DATA")
    budget: str = flag("1TB", "storage budget for everything under the data root", metavar="SIZE")
    reserve: str = flag("40%", "part of the budget kept for captions, teacher embeddings, checkpoints", metavar="PCT|SIZE")
    adopt: str = flag("", "instead of --urls: take in webdataset tars made elsewhere, an img2dataset output folder "
                      "or brace notation such as '/d/{00000..00099}.tar' (hard-linked into DATA/shards)",
                      metavar="SOURCE")
    copy: bool = flag(False, "with --adopt: copy the tars instead of hard-linking them (needed when SOURCE is on "
                      "another file system than DATA)", kind="switch")
    image_size: int = flag(256, "target image size in pixels", metavar="PX")
    resize_mode: str = flag("center_crop", "img2dataset resize mode", choices=RESIZE_MODES)
    encode_format: str = flag("jpg", "image encoding in the shards", choices=["jpg", "webp", "png"])
    quality: int = flag(95, "JPEG/WebP quality", metavar="Q")
    samples_per_shard: int = flag(10000, "rows of the URL list per shard", metavar="N")
    processes: int = flag(0, "download processes (0: one per core)", metavar="N")
    threads: int = flag(64, "download threads per process", metavar="N")
    input_format: str = flag("auto", "format of the list's files, as img2dataset names it (auto: from each file's "
                             "name)", choices=list(INPUT_FORMATS))
    url_col: str = flag("url", "URL column of the list", metavar="NAME")
    caption_col: str = flag("caption", "caption column of the list (empty: none, every caption empty)", metavar="NAME")
    distributor: str = flag("multiprocessing", "img2dataset distributor", choices=DISTRIBUTORS)
    fit: bool = flag(False, "lower the sample count (or --set fit_by=...) until the plan fits the budget", kind="switch")
    retry_failed: bool = flag(False, "re-download samples that failed for a retryable reason into new shards", kind="switch")
    allow_private_addresses: bool = flag(False, "also fetch from loopback, private, link-local and other non-public "
                                         "addresses (data served on your own network)", kind="switch")
    drop_duplicate_urls: bool = flag(False, "download each URL once: keep the first row of each (duplicates are "
                                     "counted and reported either way)", kind="switch")
    # columns of the list kept in each sample's .json (and the shard's .parquet), as img2dataset's
    # save_additional_columns does, e.g. ["similarity", "uid"]
    save_additional_columns: list[str] = field(default_factory=list)
    fit_by: str = field(default="samples", metadata={"choices": FIT_BY})  # what --fit lowers: samples, quality or image_size
    max_samples: int = 0  # download the first N valid rows of the list only; 0: every row
    timeout: float = 10.0  # seconds per download try, wall clock: connect, headers and body
    max_download_size: str = "20MB"  # a body over it fails as too_large
    allow_networks: list[str] = field(default_factory=list)  # private networks fetched anyway, e.g. ["10.20.0.0/16"]
    retries: int = 0  # further tries of a row whose download failed (not too_large or private_address rows)
    min_image_size: int = 32  # an image whose shorter side is smaller (icons, tracking pixels) fails as image_too_small
    max_aspect_ratio: float = 0.0  # 0: no limit (keep_ratio needs one to bound the bytes of a sample)
    max_image_pixels: int = 89_478_485  # decoder limit against decompression bombs (PIL's default)
    extract_exif: bool = False  # EXIF in each sample's .json; off: unbounded, it would leave the worst case unknown
    allow_non_http: bool = False  # keep non-http(s) rows, not refused as scheme_*; the fetch reaches http(s) only
    min_success_ratio: float = 0.5  # exit 1 when the net success rate falls below this fraction of the pilot's; 0: off
    progress_every_s: float = 2.0  # seconds between progress lines on stderr

    def validate(self) -> None:
        if self.urls and self.adopt:
            raise SiclipError("--urls and --adopt both given: download a URL list or adopt existing shards, "
                              "one per data root")
        if not (self.urls or self.adopt):
            raise SiclipError("no URL list given: pass --urls FILE (or --adopt SOURCE for shards made elsewhere)")
        if self.copy and not self.adopt:
            raise SiclipError("--copy copies the tars that --adopt takes in: pass --adopt SOURCE too")
        budget = parse_size(self.budget)
        reserve = parse_reserve(self.reserve, budget)
        if reserve >= budget:  # caught here, before the pilot downloads anything
            raise SiclipError(f"the reserve {format_size(reserve)} leaves nothing of the budget {format_size(budget)} "
                              "for the shards: lower --reserve or raise --budget")
        for name in ("image_size", "samples_per_shard", "threads"):
            if getattr(self, name) <= 0:
                raise SiclipError(f"{name} must be positive, got {getattr(self, name)}")
        if self.processes < 0:
            raise SiclipError(f"processes must be 0 (one per core) or more, got {self.processes}")
        if not self.timeout > 0:
            raise SiclipError(f"timeout must be more than 0 seconds, got {self.timeout}")
        if parse_size(self.max_download_size) <= 0:
            raise SiclipError(f"max_download_size must be more than 0 bytes, got {self.max_download_size!r}")
        for net in self.allow_networks:
            try:
                ipaddress.ip_network(net, strict=False)
            except ValueError:
                raise SiclipError(f"allow_networks: {net!r} is not a network such as 10.20.0.0/16 or fd00::/8") from None
        if self.min_image_size < 0:
            raise SiclipError(f"min_image_size must be 0 (no minimum) or more pixels, got {self.min_image_size}")
        if not 0 <= self.min_success_ratio <= 1:
            raise SiclipError(f"min_success_ratio must be within 0..1 (a fraction of the pilot's success rate; 0 turns "
                              f"the check off), got {self.min_success_ratio}")
        if self.retries < 0:
            raise SiclipError(f"retries must be 0 or more, got {self.retries}")
        if not 1 <= self.quality <= 100:
            raise SiclipError(f"quality must be within 1..100, got {self.quality}")
        if self.resize_mode not in RESIZE_MODES:
            raise SiclipError(f"resize_mode {self.resize_mode!r}: choose one of {', '.join(RESIZE_MODES)}")
        if self.distributor not in DISTRIBUTORS:
            raise SiclipError(f"distributor {self.distributor!r}: choose one of {', '.join(DISTRIBUTORS)}")
        if self.distributor != "multiprocessing":
            import importlib.util

            if importlib.util.find_spec(self.distributor) is None:
                raise SiclipError(f"--distributor {self.distributor} needs its package: pip install 'siclip[{self.distributor}]'")
        if self.input_format not in INPUT_FORMATS:
            raise SiclipError(f"input_format {self.input_format!r}: choose one of {', '.join(INPUT_FORMATS)}")
        taken = [c for c in self.save_additional_columns if c in SAMPLE_JSON_KEYS]
        if taken:
            raise SiclipError(f"save_additional_columns: {taken[0]!r} is a key img2dataset writes into each sample's "
                              f"json itself ({', '.join(SAMPLE_JSON_KEYS)}); the URL and caption columns are kept "
                              "as url and caption anyway")
        if len(set(self.save_additional_columns)) < len(self.save_additional_columns):
            raise SiclipError(f"save_additional_columns names a column twice: {self.save_additional_columns}")
        if self.fit_by not in FIT_BY:
            raise SiclipError(f"fit_by {self.fit_by!r}: choose one of {', '.join(FIT_BY)}")
        if self.resize_mode == "keep_ratio" and self.max_aspect_ratio <= 0:
            raise SiclipError("resize_mode keep_ratio leaves the long side unbounded, so the budget cannot be "
                              "enforced: add --set max_aspect_ratio=4 (or use center_crop/border/keep_ratio_largest)")

    @property
    def process_count(self) -> int:
        return self.processes or os.cpu_count() or 1

    # keys whose change makes different shards: a resumed run must match them
    OUTPUT_KEYS = ("image_size", "resize_mode", "encode_format", "quality", "samples_per_shard", "url_col",
                   "caption_col", "min_image_size", "max_aspect_ratio", "max_image_pixels", "extract_exif",
                   "save_additional_columns")
