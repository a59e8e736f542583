"""Driving img2dataset: one shard of work at a time through its Downloader, admitted only when its
worst-case size fits the budget, written to a staging folder and moved into `shards/` once verified.

A shard is finished when its tar, parquet and stats are in `shards/` and listed in the manifest;
anything else found there on start (a crash between the move and the manifest) is adopted when it
verifies and deleted when it does not, so a killed run, rerun, leaves every sample exactly once.
"""

from __future__ import annotations

import ctypes
import multiprocessing
import os
import re
import shutil
import signal
import sys
import tarfile
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

    from siclip.pipeline.fetch import GuardedDownloader  # imports img2dataset: after worker_env

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


# --- download processes ------------------------------------------------------------------------
#
# Each worker is a spawned process that takes shards from its own pipe, one at a time, for the
# whole run. Workers are started and reaped only by the thread that runs ShardRunner.run, which
# outlives them: Linux sends the parent-death signal that _die_with_parent asks for when the
# *thread* that started a process ends, not its process. (A multiprocessing.Pool with
# maxtasksperchild started replacement workers from its handler thread, and terminate() ended that
# thread first: the kernel killed those workers, one while it held the task queue's lock, and
# terminate() then waited for that lock for ever.)

def _die_with_parent(parent_pid: int) -> None:
    """Ask Linux to SIGKILL this worker when the thread that started it ends, so a killed job leaves
    no orphan still writing into the staging folder that the rerun cleans."""
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except OSError:
        pass
    if os.getppid() != parent_pid:  # the parent died before prctl took effect
        os._exit(1)


def _worker_main(cfg, staging: str, parent_pid: int, conn) -> None:
    """Download each (shard id, input file) received on `conn` and answer (shard id, ok, error or
    None); None ends."""
    _die_with_parent(parent_pid)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole group: the runner stops us
    # img2dataset's per-shard ThreadPool takes a multiprocessing lock. Under the "spawn" default this
    # process inherits, that lock is registered with the job's resource tracker, and a worker killed
    # mid-shard ends the job with a "leaked semaphore" warning after its summary. This process never
    # starts another, so it can use "fork" locks, which are unlinked as soon as they are made.
    multiprocessing.set_start_method("fork", force=True)
    downloader = make_downloader(cfg, Path(staging))
    try:
        while (job := conn.recv()) is not None:
            ok, _ = downloader(job)
            conn.send((job[0], ok, downloader.last_error))
    except EOFError:  # the runner closed the pipe without a word: nothing left to do
        pass


def exit_reason(exitcode: int | None) -> str:
    """How a worker process ended, in words."""
    if exitcode is not None and exitcode < 0:
        name = signal.Signals(-exitcode).name
        return f"killed by {name}" + (", as the out-of-memory killer does" if name == "SIGKILL" else "")
    return f"exit status {exitcode}"


class _Worker:
    """One download process, the pipe it takes shards from, and the shard it runs (if any)."""

    def __init__(self, ctx, cfg, staging: Path):
        self.conn, child = ctx.Pipe()
        self.process = ctx.Process(target=_worker_main, args=(cfg, str(staging), os.getpid(), child), daemon=True)
        self.process.start()
        child.close()  # the worker holds the only other end: its death reads as end-of-file here
        self.job: tuple[int, int] | None = None  # (shard id, worst-case bytes) while it runs a shard

    def start(self, shard_id: int, bound: int, input_path: str) -> bool:
        """Hand it a shard; False when it is already gone."""
        try:
            self.conn.send((shard_id, input_path))
        except OSError:
            return False
        self.job = (shard_id, bound)
        return True

    def result(self) -> tuple[int, bool, str | None] | None:
        """(shard id, ok, error) once it has answered; None while it works; EOFError (or a reset
        pipe's OSError) when it died."""
        if self.conn.poll():
            answer = self.conn.recv()
            self.job = None
            return answer
        if not self.process.is_alive():
            raise EOFError
        return None

    def stop(self, wait_s: float) -> None:
        try:
            self.conn.send(None)
        except OSError:
            pass
        self.process.join(wait_s)
        if self.process.is_alive():
            self.process.kill()
            self.process.join()
        self.conn.close()


# --- main side -----------------------------------------------------------------------------------

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
    """Runs shards of input rows through img2dataset under a hard byte budget, and within the free disk."""

    def __init__(self, root: DataRoot, cfg, manifest: StageManifest, budget_bytes: int, progress=None):
        self.root, self.cfg, self.manifest, self.budget_bytes = root, cfg, manifest, budget_bytes
        self.staging = root.inside(root.work / "shards" / "staging")
        self.inputs = root.inside(root.work / "shards" / "input")  # img2dataset deletes each input when done
        self.progress = progress
        self.failed: list[int] = []
        self.stopped_by_budget: tuple[int, int] | None = None  # (shard id, its worst case) that did not fit
        self.stopped_by_disk: str | None = None  # why no shard can start on this disk any more
        self.waves = 0  # handed to pyspark or ray

    def used_bytes(self) -> int:
        from siclip.manifests.storage import StorageBudget

        return StorageBudget.load(self.root).used_bytes

    def _write_input(self, shard_id: int, table: pa.Table) -> str:
        self.inputs.mkdir(parents=True, exist_ok=True)
        path = self.inputs / f"{shard_name(shard_id)}.arrow"
        with writing(path), pa.OSFile(str(path), "wb") as f, pa.ipc.new_file(f, table.schema) as w:
            w.write_table(table)
        return str(path)

    def _fail(self, shard_id: int, reason: str, bound: int = 0) -> None:
        print(f"shards: shard {shard_name(shard_id)} failed: {reason}", file=sys.stderr, flush=True)
        for p in shard_files(self.staging, shard_id):
            p.unlink(missing_ok=True)
        self.failed.append(shard_id)
        free = disk_free_bytes(self.staging)
        if bound and free < bound and not self.stopped_by_disk:  # the disk filled up under it, most likely
            self.stopped_by_disk = (f"the disk holding {self.root.root} has {format_size(free)} free, less than a "
                                    f"shard's worst case ({format_size(bound)})")

    def _commit(self, shard_id: int, extra: dict, bound: int = 0) -> None:
        try:
            commit_staged(self.root, self.staging, self.manifest, shard_id, self.cfg.encode_format, **extra)
        except DiskError as e:  # moved into shards/ but not recorded: the rerun adopts it (or redoes it)
            self.stopped_by_disk = self.stopped_by_disk or str(e)
            print(f"shards: shard {shard_name(shard_id)} not recorded: {e}", file=sys.stderr, flush=True)
        except SiclipError as e:
            self._fail(shard_id, str(e), bound)

    def _done(self, shard_id: int, ok: bool, extra: dict, error: str | None = None, bound: int = 0) -> None:
        if ok:
            self._commit(shard_id, extra, bound)
        else:
            self._fail(shard_id, f"img2dataset could not download it ({error or 'its error is above'})", bound)

    def run_in_process(self, shard_id: int, table: pa.Table, bound: int, extra: dict | None = None) -> bool:
        """Download one shard in this process (the pilot); False when its worst case does not fit."""
        if self.used_bytes() + bound > self.budget_bytes:
            self.stopped_by_budget = (shard_id, bound)
            return False
        self.staging.mkdir(parents=True, exist_ok=True)
        downloader = make_downloader(self.cfg, self.staging)
        ok, _ = downloader((shard_id, self._write_input(shard_id, table)))
        self._done(shard_id, ok, extra or {}, downloader.last_error, bound)
        return True

    def run(self, jobs: list[tuple[int, pa.Table, int]], extra: dict | None = None) -> None:
        """Download `jobs` (shard id, rows, worst-case bytes) in parallel; a shard starts only when the
        bytes in use plus the worst case of every shard in flight, its own included, fit the budget,
        and the worst case still to be written fits the free disk. A worker that dies fails its shard
        by name and is replaced, until as many have died as run at once (at least 2): then the shards
        not started yet fail too, rather than die the same way."""
        if not jobs:
            return
        self.staging.mkdir(parents=True, exist_ok=True)
        os.environ.update(worker_env(self.cfg))
        if self.cfg.distributor != "multiprocessing":
            return self._run_waves(jobs, extra or {})
        from multiprocessing.connection import wait

        ctx = multiprocessing.get_context("spawn")
        slots = min(self.cfg.process_count, len(jobs))
        queue = list(jobs)
        workers: list[_Worker] = []
        lost = 0
        used = self.used_bytes()
        try:
            while True:
                while queue and len(workers) < slots and lost < max(2, slots):
                    workers.append(_Worker(ctx, self.cfg, self.staging))
                dead = self._admit(queue, workers, used)
                if dead:  # found when handing them a shard: replace them before going on
                    lost += dead
                    continue
                busy = [w for w in workers if w.job]
                if not busy:
                    break
                wait([w.conn for w in busy] + [w.process.sentinel for w in busy], timeout=0.5)
                for w in busy:
                    bound = w.job[1]
                    try:
                        answer = w.result()
                    except (EOFError, OSError):
                        workers.remove(w)
                        lost += 1
                        w.process.join()
                        self._fail(w.job[0], f"its download process (pid {w.process.pid}) died "
                                             f"({exit_reason(w.process.exitcode)})")
                        continue
                    if answer:
                        sid, ok, error = answer
                        self._done(sid, ok, extra or {}, error, bound)
                        used = self.used_bytes()
                if self.progress:
                    self.progress(self._staged_bytes())
        finally:
            for w in workers:
                w.stop(0 if w.job else 10)  # a worker still busy here means the run is being abandoned
        if queue and not workers:
            print(f"shards: {lost} download processes died; not starting the other {len(queue)} shard(s) "
                  "(is the machine out of memory?)", file=sys.stderr, flush=True)
            self.failed += [sid for sid, _, _ in queue]
        elif queue and not self.stopped_by_disk:
            self.stopped_by_budget = (queue[0][0], queue[0][2])

    def _admit(self, queue: list, workers: list[_Worker], used: int) -> int:
        """Hand queued shards to idle workers while `used` plus the worst case of every shard in
        flight fits the budget, and what they may still write fits the free disk; return how many
        workers were found dead (dropped; the shard stays queued)."""
        in_flight = sum(w.job[1] for w in workers if w.job)
        dead = 0
        for w in [w for w in workers if not w.job]:
            if not queue or self.stopped_by_disk or used + in_flight + queue[0][2] > self.budget_bytes:
                break
            sid, table, bound = queue[0]
            if not self._disk_has_room(bound, in_flight):
                if in_flight == 0:  # nothing running will free a reservation: it will never fit
                    self.stopped_by_disk = self._disk_stop_message(sid, bound)
                break
            try:
                path = self._write_input(sid, table)
            except DiskError as e:
                self.stopped_by_disk = str(e)
                break
            if not w.start(sid, bound, path):
                workers.remove(w)
                w.process.join()
                dead += 1
                continue
            queue.pop(0)
            in_flight += bound
        return dead

    def _disk_has_room(self, bound: int, in_flight: int) -> bool:
        """The free disk holds this shard's worst case and what the shards in flight may still write
        (their worst case less what they have written)."""
        return bound + max(0, in_flight - self._staged_bytes()) <= disk_free_bytes(self.staging)

    def _disk_stop_message(self, shard_id: int, bound: int) -> str:
        return (f"shard {shard_name(shard_id)} could take up to {format_size(bound)} but the disk holding "
                f"{self.root.root} has {format_size(disk_free_bytes(self.staging))} free")

    def _run_waves(self, jobs, extra) -> None:
        """pyspark/ray: img2dataset's own distributor, fed waves of shards that fit the budget (and the
        free disk) together."""
        from img2dataset import distributor as dist

        fn = {"pyspark": "pyspark_distributor", "ray": "ray_distributor"}[self.cfg.distributor]
        downloader = make_downloader(self.cfg, self.staging)
        queue = list(jobs)
        with distributor_session(self.cfg.distributor, self.cfg.process_count):
            self._waves(queue, downloader, getattr(dist, fn), extra)

    def _waves(self, queue: list, downloader, distribute, extra: dict) -> None:
        while queue and not self.stopped_by_disk:
            room = self.budget_bytes - self.used_bytes()
            disk = disk_free_bytes(self.staging)
            wave = []
            while queue and room >= queue[0][2] and disk >= queue[0][2]:
                sid, table, bound = queue.pop(0)
                room, disk = room - bound, disk - bound
                try:
                    wave.append((sid, self._write_input(sid, table), bound))
                except DiskError as e:
                    self.stopped_by_disk = str(e)
                    queue.insert(0, (sid, table, bound))
                    break
            if not wave:
                if not self.stopped_by_disk and disk < queue[0][2] <= room:
                    self.stopped_by_disk = self._disk_stop_message(queue[0][0], queue[0][2])
                elif not self.stopped_by_disk:
                    self.stopped_by_budget = (queue[0][0], queue[0][2])
                return
            self.waves += 1
            print(f"shards: wave {self.waves}: {len(wave)} shard(s) ({shard_name(wave[0][0])}..{shard_name(wave[-1][0])}) "
                  f"to {self.cfg.distributor}", file=sys.stderr, flush=True)
            distribute(self.cfg.process_count, downloader, iter([w[:2] for w in wave]), 1000, 1)
            for sid, _, bound in wave:
                if shard_files(self.staging, sid)[2].exists():
                    self._commit(sid, extra, bound)
                else:
                    self._fail(sid, f"img2dataset's {self.cfg.distributor} distributor did not finish it", bound)

    def _staged_bytes(self) -> int:
        try:
            return sum(p.stat().st_size for p in self.staging.iterdir())
        except OSError:
            return 0


@contextmanager
def distributor_session(name: str, processes: int):
    """One Spark session or Ray runtime for the whole run (img2dataset's distributors start and stop
    one per call, that is per wave): started here, local with `processes` CPUs and no web UI, unless
    one is running already or the environment names a cluster (PYSPARK_SUBMIT_ARGS with --master;
    RAY_ADDRESS), and stopped at the end."""
    if name == "pyspark":
        from pyspark.sql import SparkSession

        if SparkSession.getActiveSession() is not None:
            yield
            return
        # Spark starts its Python workers with PYSPARK_PYTHON, `python3` on the PATH by default: this one
        # has the packages the downloader needs
        os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
        builder = SparkSession.builder.appName("siclip-shards").config("spark.ui.enabled", "false") \
            .config("spark.ui.showConsoleProgress", "false")  # our progress line is the one to read
        if "--master" not in os.environ.get("PYSPARK_SUBMIT_ARGS", ""):
            os.environ.setdefault("SPARK_LOCAL_IP", "127.0.0.1")  # local mode listens on loopback only
            builder = builder.master(f"local[{processes}]")
        spark = builder.getOrCreate()
        spark.sparkContext.setLogLevel("ERROR")
        try:
            yield
        finally:
            spark.stop()
    else:
        import ray

        if ray.is_initialized():
            yield
            return
        if os.environ.get("RAY_ADDRESS"):
            ray.init()
        else:  # img2dataset's distributor would start Ray with every core and its dashboard
            ray.init(num_cpus=processes, include_dashboard=False, configure_logging=False, _node_ip_address="127.0.0.1")
        try:
            yield
        finally:
            ray.shutdown()


def params_of(cfg) -> dict:
    d = asdict(cfg)
    return {k: d[k] for k in cfg.OUTPUT_KEYS}


def budget_stop_message(stopped: tuple[int, int], remaining: int) -> str:
    sid, bound = stopped
    return (f"stopped at the budget: shard {shard_name(sid)} could take up to {format_size(bound)} "
            f"but only {format_size(remaining)} of the budget is left")
