"""Running one task per shard: in this process, or on dask (a local cluster on 127.0.0.1, or an
existing scheduler). Each worker builds the model once, on its first task, and keeps it.

Both distributors have the same shape: `run(tasks, job, setup, on_result)`; `setup()` builds the model (a
functools.partial of a module-level function, which pickles by reference), `job(task, model) -> result`.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from typing import Callable

from distributed.diagnostics.plugin import WorkerPlugin


def run_in_process(tasks: list, job: Callable, setup: Callable, on_result: Callable[[dict], None]) -> None:
    model = setup()
    for task in tasks:
        on_result(job(task, model))


class WorkerModel(WorkerPlugin):
    """A dask worker plugin holding one model per worker process, built on first use."""

    def __init__(self, name: str, setup: Callable):
        self.name, self.build = name, setup
        self._model = None
        self._lock = threading.Lock()
        self.loaded_at = None

    def setup(self, worker=None):  # dask calls this on each worker; the model loads lazily
        self._lock = threading.Lock()

    def teardown(self, worker=None):
        self._model = None

    def __getstate__(self):
        return {"name": self.name, "build": self.build}

    def __setstate__(self, state):
        self.__dict__.update(state, _model=None, _lock=threading.Lock(), loaded_at=None)

    def model(self):
        with self._lock:
            if self._model is None:
                self._model = self.build()
                self.loaded_at = time.time()
            return self._model


def _run_on_worker(task, job: Callable, plugin: str) -> dict:
    from distributed import get_worker

    holder = get_worker().plugins[plugin]
    result = job(task, holder.model())
    result["worker"] = {"pid": os.getpid(), "model_loaded_at": holder.loaded_at}
    return result


def local_cluster_threads(workers: int) -> int:
    """Torch threads per worker process so that the workers share the cores without oversubscribing.

    One core per worker stays free for its prefetch thread: torch's OpenMP threads spin at barriers,
    and a decode thread competing with them for a core stalls generation for seconds."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    per_worker = max(1, cores // max(1, workers))
    return max(1, per_worker - 1)


def run_on_dask(tasks: list, job: Callable, setup: Callable, on_result: Callable[[dict], None],
                workers: int = 1, scheduler: str | None = None, log=print) -> None:
    from distributed import Client, LocalCluster, as_completed

    cluster = None
    if scheduler:
        client = Client(scheduler, timeout="20s")
        log(f"dask: connected to {scheduler} ({len(client.scheduler_info()['workers'])} workers)")
    else:
        # 127.0.0.1 and no dashboard: the job opens no port that other machines can reach
        cluster = LocalCluster(n_workers=workers, threads_per_worker=1, processes=True, host="127.0.0.1",
                               dashboard_address=None, silence_logs=logging.ERROR)
        client = Client(cluster)
        log(f"dask: local cluster of {workers} worker process(es) at {cluster.scheduler_address}")
    name = f"siclip-model-{os.getpid()}-{id(tasks)}"
    try:
        client.register_plugin(WorkerModel(name, setup), name=name)
        futures = [client.submit(_run_on_worker, t, job, name, key=f"{name}-{t.shard}", pure=False) for t in tasks]
        for fut in as_completed(futures):
            on_result(fut.result())
    finally:
        try:
            client.unregister_worker_plugin(name)
        except Exception:
            pass
        client.close()
        if cluster is not None:
            cluster.close()
