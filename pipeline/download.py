"""Driving img2dataset: shards of work through its Downloader, in waves whose worst-case sizes fit
the budget and the free disk, written to a staging folder and moved into `shards/` once verified.

A shard is finished when its tar, parquet and stats are in `shards/` and listed in the manifest;
anything else found there on start (a crash between the move and the manifest) is adopted when it
verifies and deleted when it does not, so a killed run, rerun, leaves every sample exactly once.
"""

from __future__ import annotations

import os
import re
import shutil
import sys
import tarfile
import threading
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path

import pyarrow as pa

from siclip.manifests.errors import DiskError, SiclipError
from siclip.manifests.io import fsync_dir, writing
from siclip.manifests.layout import DataRoot, shard_name
from siclip.manifests.manifest import ShardEntry, StageManifest
from siclip.manifests.storage import disk_free_bytes, format_size, parse_size
from siclip.pipeline.plan import load_stats, stats_reasons

SHARD_FILE = re.compile(r"^(\d{5,})(\.tar|\.parquet|_stats\.json)$")


def worker_env(cfg) -> dict[str, str]:
    """Environment every process that imports img2dataset needs: no network call from albumentations
    on import, and OpenCV's decoder refusing images past the pixel limit (decompression bombs)."""
    return {"NO_ALBUMENTATIONS_UPDATE": "1", "OPENCV_IO_MAX_IMAGE_PIXELS": str(int(cfg.max_image_pixels)),
            "WANDB_MODE": "disabled"}


def fetch_policy(cfg):
    """What a download try may fetch: the byte cap and which addresses (the deadline is `timeout`)."""
    import ipaddress

    from siclip.pipeline.fetch import FetchPolicy

    return FetchPolicy(max_bytes=parse_size(cfg.max_download_size), allow_private=cfg.allow_private_addresses,
                       allow_networks=tuple(ipaddress.ip_network(n, strict=False) for n in cfg.allow_networks))


def make_downloader(cfg, output_folder: Path):
    """An img2dataset Downloader writing webdataset shards with `cfg`'s settings into `output_folder`,
    fetching through pipeline.fetch (deadline per try, byte cap, public addresses only)."""
    os.environ.update(worker_env(cfg))
    from img2dataset.resizer import Resizer
    from img2dataset.writer import WebDatasetSampleWriter

    from siclip.pipeline.downloader import GuardedDownloader  # imports img2dataset: after worker_env

    resizer = Resizer(image_size=cfg.image_size, resize_mode=cfg.resize_mode, resize_only_if_bigger=False,
                      upscale_interpolation="lanczos", downscale_interpolation="area", encode_quality=cfg.quality,
                      encode_format=cfg.encode_format, skip_reencode=False, disable_all_reencoding=False,
                      min_image_size=cfg.min_image_size, max_image_area=float(cfg.max_image_pixels),
                      max_aspect_ratio=cfg.max_aspect_ratio or float("inf"), blurrer=None)
    return GuardedDownloader(fetch_policy(cfg), sample_writer_class=WebDatasetSampleWriter, resizer=resizer,
                             thread_count=cfg.threads, save_caption=True, extract_exif=cfg.extract_exif,
                             output_folder=str(output_folder), timeout=cfg.timeout,
                             column_list=["url", "caption", *cfg.save_additional_columns],  # into each sample's .json
                             number_sample_per_shard=cfg.samples_per_shard, oom_shard_count=5, compute_hash="sha256",
                             verify_hash_type=None, encode_format=cfg.encode_format, retries=cfg.retries,
                             user_agent_token=None,
                             disallowed_header_directives=["noai", "noimageai", "noindex", "noimageindex"])


def shard_files(folder: Path, shard_id: int) -> list[Path]:
    n = shard_name(shard_id)
    return [folder / f"{n}.tar", folder / f"{n}.parquet", folder / f"{n}_stats.json"]


def count_tar_images(path: Path, encode_format: str) -> int:
    """Samples with an image in a tar; raises SiclipError when the tar is truncated or corrupt."""
    try:
        with tarfile.open(path) as tar:
            return sum(1 for m in tar if m.name.endswith("." + encode_format))
    except (tarfile.TarError, OSError, EOFError) as e:
        raise SiclipError(f"{path}: corrupt or truncated tar ({e})") from None


def verify_staged(folder: Path, shard_id: int, encode_format: str) -> dict:
    """Check that a shard img2dataset wrote is whole; return its stats."""
    tar, parquet, stats_path = shard_files(folder, shard_id)
    for p in (tar, parquet, stats_path):
        if not p.is_file():
            raise SiclipError(f"{p}: missing after img2dataset finished the shard")
    stats = load_stats(stats_path)
    images = count_tar_images(tar, encode_format)
    if images != int(stats.get("successes", -1)):
        raise SiclipError(f"{tar}: {images} images but img2dataset's stats say {stats.get('successes')}")
    import pyarrow.parquet as pq

    try:
        rows = pq.read_metadata(parquet).num_rows
    except (pa.ArrowInvalid, OSError) as e:
        raise SiclipError(f"{parquet}: unreadable ({e})") from None
    if rows != int(stats.get("count", -1)):
        raise SiclipError(f"{parquet}: {rows} rows but img2dataset's stats say {stats.get('count')}")
    return stats


def record_shard(root: DataRoot, manifest: StageManifest, shard_id: int, stats: dict, **extra) -> ShardEntry:
    files = shard_files(root.shards, shard_id)
    return manifest.add(root, shard_name(shard_id), files, samples=int(stats["successes"]), rows=int(stats["count"]),
                        failures=stats_reasons(stats), seconds=round(float(stats.get("duration", 0)), 2), **extra)


def commit_staged(root: DataRoot, staging: Path, manifest: StageManifest, shard_id: int, encode_format: str,
                  **extra) -> ShardEntry:
    """Verify a staged shard, move it into shards/ and record it in the manifest (saved)."""
    stats = verify_staged(staging, shard_id, encode_format)
    root.shards.mkdir(parents=True, exist_ok=True)
    # the stats file moves last: a shard without it in shards/ is known to be incomplete
    for src, dst in zip(shard_files(staging, shard_id), shard_files(root.shards, shard_id)):
        os.replace(src, dst)
    fsync_dir(root.shards)
    entry = record_shard(root, manifest, shard_id, stats, **extra)
    manifest.save(root)
    return entry


def reconcile(root: DataRoot, manifest: StageManifest, encode_format: str, log=print) -> None:
    """Bring shards/ and the manifest into agreement after a crash: drop staging, drop manifest
    entries whose files are gone, adopt whole unlisted shards, delete partial ones."""
    # every listed file and every folder cleaned here must lie inside the root, checked before
    # anything changes: a link planted in a data root must not turn a rerun into a deletion elsewhere
    for rel, _ in manifest.files():
        root.abs(rel)
    staging = root.inside(root.work / "shards" / "staging")
    root.inside(root.shards)
    if staging.exists():
        shutil.rmtree(staging)
    changed = False
    for unit in list(manifest.entries):
        if not manifest.entry_ok(root, unit):
            log(f"shards: {unit} is listed but its files are missing or changed; it will be downloaded again")
            for p in shard_files(root.shards, int(unit)):
                p.unlink(missing_ok=True)
            del manifest.entries[unit]
            changed = True
    found: dict[int, list[Path]] = {}
    if root.shards.is_dir():
        for p in root.shards.iterdir():
            m = SHARD_FILE.match(p.name)
            if m and shard_name(int(m.group(1))) not in manifest.entries:
                found.setdefault(int(m.group(1)), []).append(p)
            elif p.name.startswith(".") and ".tmp" in p.name:
                p.unlink()
    for sid, paths in sorted(found.items()):
        try:
            stats = verify_staged(root.shards, sid, encode_format)
        except SiclipError as e:
            log(f"shards: removing incomplete shard {shard_name(sid)} left by an interrupted run ({e})")
            for p in paths:
                p.unlink(missing_ok=True)
            continue
        record_shard(root, manifest, sid, stats)
        log(f"shards: adopted shard {shard_name(sid)}, finished by an interrupted run")
        changed = True
    if changed:
        manifest.save(root)


class ShardRunner:
    """Runs shards of input rows through img2dataset under a hard byte budget, and within the free disk:
    the planner (`waves_of`) cuts the shards into waves that fit, and the distributor --distributor names
    (pipeline.distribute) runs each wave while this process records every shard it finishes."""

    def __init__(self, root: DataRoot, cfg, manifest: StageManifest, budget_bytes: int, progress=None):
        self.root, self.cfg, self.manifest, self.budget_bytes = root, cfg, manifest, budget_bytes
        self.staging = root.inside(root.work / "shards" / "staging")
        self.inputs = root.inside(root.work / "shards" / "input")  # img2dataset deletes each input when done
        self.progress = progress
        self.failed: list[int] = []
        self.stopped_by_budget: tuple[int, int] | None = None  # (shard id, its worst case) that did not fit
        self.stopped_by_disk: str | None = None  # why no shard can start on this disk any more
        self.waves = 0  # handed to the distributor
        self._started: set[int] = set()  # shards handed to the distributor
        self._handled: set[int] = set()  # shards recorded or failed

    def used_bytes(self) -> int:
        from siclip.manifests.storage import StorageBudget

        return StorageBudget.load(self.root).used_bytes

    def run_in_process(self, shard_id: int, table: pa.Table, bound: int, extra: dict | None = None) -> bool:
        """Download one shard in this process (the pilot); False when its worst case does not fit."""
        self.run([(shard_id, table, bound)], extra, pilot=True)
        return not self.stopped_by_budget

    def run(self, jobs: list[tuple[int, pa.Table, int]], extra: dict | None = None, pilot: bool = False) -> None:
        """Download `jobs` (shard id, rows, worst-case bytes), wave by wave, with the distributor
        --distributor names (in this process for the pilot)."""
        if not jobs:
            return
        from siclip.pipeline import distribute

        self._started, self._handled = set(), set()  # a pilot redone by --fit is the same shard again
        self.staging.mkdir(parents=True, exist_ok=True)
        os.environ.update(worker_env(self.cfg))  # inherited by the download processes
        name = "in-process" if pilot else self.cfg.distributor
        engine = distribute.in_process if pilot else distribute.by_name(name)
        downloader = make_downloader(self.cfg, self.staging)
        with distribute.session(name, self.cfg.process_count):
            for wave in self.waves_of(jobs):
                if not pilot:
                    self.waves += 1
                    print(f"shards: wave {self.waves}: {len(wave)} shard(s) ({shard_name(wave[0][0])}.."
                          f"{shard_name(wave[-1][0])}) to {name}", file=sys.stderr, flush=True)
                with self._recording(wave, extra or {}):
                    failed = engine(self.cfg.process_count, downloader, self._inputs(wave), 1000, 0) or {}
                for sid, _, bound in wave:
                    if sid in self._handled or sid not in self._started:
                        continue
                    if self._finished(sid):
                        self._commit(sid, extra or {}, bound)
                    else:
                        self._fail(sid, failed.get(sid) or f"img2dataset's {name} distributor did not finish it", bound)

    def waves_of(self, jobs: list):
        """The planner: `jobs` in order, in waves of as many shards as fit together, each planned once
        the one before has been recorded: the bytes in use plus the worst case of every shard of the
        wave fit the budget, and their worst cases fit the free disk. It stops at a shard that fits
        neither alone."""
        queue = list(jobs)
        while queue and not self.stopped_by_disk:
            room, disk = self.budget_bytes - self.used_bytes(), disk_free_bytes(self.staging)
            n = total = 0
            for _, _, bound in queue:
                if total + bound > room:
                    break
                if total + bound > disk:
                    break
                n, total = n + 1, total + bound
            if n == 0:
                sid, _, bound = queue[0]
                if bound <= room:
                    self.stopped_by_disk = (f"shard {shard_name(sid)} could take up to {format_size(bound)} but the "
                                            f"disk holding {self.root.root} has {format_size(disk)} free")
                else:
                    self.stopped_by_budget = (sid, bound)
                return
            yield queue[:n]
            queue = queue[n:]

    def _inputs(self, wave: list):
        """(shard id, input file) for the distributor, each written when it is asked for: a shard whose
        worst case no longer fits the free disk (filled up under the wave) is not started, nor any after it."""
        for sid, table, bound in wave:
            if self.stopped_by_disk or self._disk_short(bound):
                return
            try:
                path = self._write_input(sid, table)
            except DiskError as e:
                self.stopped_by_disk = str(e)
                return
            self._started.add(sid)
            yield sid, path

    @contextmanager
    def _recording(self, wave: list, extra: dict):
        """While a wave runs: record each shard as soon as it is finished (a killed job keeps it), and
        report progress."""
        stop, errors = threading.Event(), []

        def watch() -> None:
            try:
                while not stop.wait(0.5):
                    for sid, _, bound in wave:
                        if sid not in self._handled and self._finished(sid):
                            self._commit(sid, extra, bound)
                    if self.progress:
                        self.progress(self._staged_bytes())
            except BaseException as e:  # noqa: BLE001 - raised again in the job's thread
                errors.append(e)

        watcher = threading.Thread(target=watch, name="siclip-shards-record", daemon=True)
        watcher.start()
        try:
            yield
        finally:
            stop.set()
            watcher.join()
        if errors:
            raise errors[0]

    def _finished(self, shard_id: int) -> bool:
        """img2dataset has written the shard's stats, last and whole."""
        try:
            load_stats(shard_files(self.staging, shard_id)[2])
            return True
        except SiclipError:
            return False

    def _write_input(self, shard_id: int, table: pa.Table) -> str:
        self.inputs.mkdir(parents=True, exist_ok=True)
        path = self.inputs / f"{shard_name(shard_id)}.arrow"
        with writing(path), pa.OSFile(str(path), "wb") as f, pa.ipc.new_file(f, table.schema) as w:
            w.write_table(table)
        return str(path)

    def _disk_short(self, bound: int) -> bool:
        """True, and the job stops at the disk, when the free disk no longer holds a shard's worst case."""
        free = disk_free_bytes(self.staging)
        if free < bound and not self.stopped_by_disk:
            self.stopped_by_disk = (f"the disk holding {self.root.root} has {format_size(free)} free, less than a "
                                    f"shard's worst case ({format_size(bound)})")
        return free < bound

    def _fail(self, shard_id: int, reason: str, bound: int) -> None:
        print(f"shards: shard {shard_name(shard_id)} failed: {reason}", file=sys.stderr, flush=True)
        for p in shard_files(self.staging, shard_id):
            p.unlink(missing_ok=True)
        self._handled.add(shard_id)
        self.failed.append(shard_id)
        self._disk_short(bound)  # the disk filled up under it, most likely

    def _commit(self, shard_id: int, extra: dict, bound: int) -> None:
        self._handled.add(shard_id)
        try:
            commit_staged(self.root, self.staging, self.manifest, shard_id, self.cfg.encode_format, **extra)
        except DiskError as e:  # moved into shards/ but not recorded: the rerun adopts it (or redoes it)
            self.stopped_by_disk = self.stopped_by_disk or str(e)
            print(f"shards: shard {shard_name(shard_id)} not recorded: {e}", file=sys.stderr, flush=True)
        except SiclipError as e:
            self._fail(shard_id, str(e), bound)

    def _staged_bytes(self) -> int:
        try:
            return sum(p.stat().st_size for p in self.staging.iterdir())
        except OSError:
            return 0

def params_of(cfg) -> dict:
    d = asdict(cfg)
    return {k: d[k] for k in cfg.OUTPUT_KEYS}


def budget_stop_message(stopped: tuple[int, int], remaining: int) -> str:
    sid, bound = stopped
    return (f"stopped at the budget: shard {shard_name(sid)} could take up to {format_size(bound)} "
            f"but only {format_size(remaining)} of the budget is left")
