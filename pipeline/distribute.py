"""The engines that run a wave of shards: each is a function with img2dataset's distributor
signature, `(processes_count, downloader, reader, subjob_size, max_shard_retry)`, and the caller
(`download.ShardRunner`) does not know which one runs. `reader` yields (shard id, input file);
the downloader writes each finished shard, stats last, into its output folder. The two written
here return {shard id: why it failed} for the shards they know failed; img2dataset's return None.

- `in_process`: this process, one shard after another (the pilot);
- `local`: spawned download processes that die with the job and whose loss fails their shard by name;
- `pyspark`, `ray`: img2dataset's own distributors, inside one `session` for the whole run.
"""

from __future__ import annotations

import ctypes
import multiprocessing
import os
import signal
import sys
from contextlib import contextmanager


def shard_error(error: str | None) -> str:
    return f"img2dataset could not download it ({error or 'its error is above'})"


def in_process(processes_count, downloader, reader, subjob_size, max_shard_retry) -> dict[int, str]:
    """Download each shard here, one after another."""
    failed = {}
    for row in reader:
        ok, _ = downloader(row)
        if not ok:
            failed[row[0]] = shard_error(downloader.last_error)
    return failed


# --- local download processes --------------------------------------------------------------------
#
# Each worker is a spawned process that takes shards from its own pipe, one at a time, for the
# whole wave. Workers are started and reaped only by the thread that calls `local`, which outlives
# them: Linux sends the parent-death signal that _die_with_parent asks for when the *thread* that
# started a process ends, not its process. (A multiprocessing.Pool with maxtasksperchild started
# replacement workers from its handler thread, and terminate() ended that thread first: the kernel
# killed those workers, one while it held the task queue's lock, and terminate() then waited for
# that lock for ever.)

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


def _worker_main(downloader, parent_pid: int, conn) -> None:
    """Download each (shard id, input file) received on `conn` and answer (shard id, ok, error or
    None); None ends."""
    _die_with_parent(parent_pid)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole group: the job stops us
    # img2dataset's per-shard ThreadPool takes a multiprocessing lock. Under the "spawn" default this
    # process inherits, that lock is registered with the job's resource tracker, and a worker killed
    # mid-shard ends the job with a "leaked semaphore" warning after its summary. This process never
    # starts another, so it can use "fork" locks, which are unlinked as soon as they are made.
    multiprocessing.set_start_method("fork", force=True)
    try:
        while (row := conn.recv()) is not None:
            ok, _ = downloader(row)
            conn.send((row[0], ok, downloader.last_error))
    except EOFError:  # the job closed the pipe without a word: nothing left to do
        pass


def exit_reason(exitcode: int | None) -> str:
    """How a worker process ended, in words."""
    if exitcode is not None and exitcode < 0:
        name = signal.Signals(-exitcode).name
        return f"killed by {name}" + (", as the out-of-memory killer does" if name == "SIGKILL" else "")
    return f"exit status {exitcode}"


class _Worker:
    """One download process, the pipe it takes shards from, and the shard it runs (if any)."""

    def __init__(self, ctx, downloader):
        self.conn, child = ctx.Pipe()
        self.process = ctx.Process(target=_worker_main, args=(downloader, os.getpid(), child), daemon=True)
        self.process.start()
        child.close()  # the worker holds the only other end: its death reads as end-of-file here
        self.shard: int | None = None  # the shard id it runs

    def start(self, row) -> bool:
        """Hand it a shard; False when it is already gone."""
        try:
            self.conn.send(row)
        except OSError:
            return False
        self.shard = row[0]
        return True

    def result(self) -> tuple[int, bool, str | None] | None:
        """(shard id, ok, error) once it has answered; None while it works; EOFError (or a reset
        pipe's OSError) when it died."""
        if self.conn.poll():
            answer = self.conn.recv()
            self.shard = None
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


def local(processes_count, downloader, reader, subjob_size, max_shard_retry) -> dict[int, str]:
    """Download the shards of `reader` in `processes_count` spawned processes, taking the next shard
    from `reader` only when a process is free. A process that dies fails its shard by name and is
    replaced, until as many have died as run at once (at least 2): then the shards not started yet
    fail too, rather than die the same way."""
    from multiprocessing.connection import wait

    ctx = multiprocessing.get_context("spawn")
    rows = iter(reader)
    row = None  # taken from the reader, not handed out yet: a shard is taken only when a process is free
    workers: list[_Worker] = []
    failed: dict[int, str] = {}
    lost = 0
    try:
        while True:
            while lost < max(2, processes_count):
                idle = next((w for w in workers if w.shard is None), None)
                if idle is None and len(workers) >= processes_count:
                    break
                if row is None and (row := next(rows, None)) is None:
                    break
                if idle is None:
                    idle = _Worker(ctx, downloader)
                    workers.append(idle)
                if idle.start(row):
                    row = None
                else:  # it died between shards: replace it
                    workers.remove(idle)
                    idle.process.join()
                    lost += 1
            busy = [w for w in workers if w.shard is not None]
            if not busy:
                break
            wait([w.conn for w in busy] + [w.process.sentinel for w in busy])
            for w in busy:
                try:
                    answer = w.result()
                except (EOFError, OSError):
                    workers.remove(w)
                    lost += 1
                    w.process.join()
                    failed[w.shard] = (f"its download process (pid {w.process.pid}) died "
                                       f"({exit_reason(w.process.exitcode)})")
                    continue
                if answer and not answer[1]:
                    failed[answer[0]] = shard_error(answer[2])
    finally:
        for w in workers:
            w.stop(0 if w.shard is not None else 10)  # a worker still busy here means the run is being abandoned
    left = ([] if row is None else [row]) + (list(rows) if lost >= max(2, processes_count) else [])
    if left:
        print(f"shards: {lost} download processes died; not starting the other {len(left)} shard(s) "
              "(is the machine out of memory?)", file=sys.stderr, flush=True)
        failed.update({r[0]: f"not started: {lost} download processes died" for r in left})
    return failed


# --- Spark and Ray -------------------------------------------------------------------------------

def by_name(name: str):
    """The distributor --distributor names."""
    if name == "multiprocessing":
        return local
    from img2dataset import distributor as dist

    return {"pyspark": dist.pyspark_distributor, "ray": dist.ray_distributor}[name]


@contextmanager
def session(name: str, processes: int):
    """One Spark session or Ray runtime for the whole run (img2dataset's distributors start and stop
    one per call, that is per wave): started here, local with `processes` CPUs and no web UI, unless
    one is running already or the environment names a cluster (PYSPARK_SUBMIT_ARGS with --master;
    RAY_ADDRESS), and stopped at the end. Nothing for the local processes."""
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
    elif name == "ray":
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
    else:
        yield
