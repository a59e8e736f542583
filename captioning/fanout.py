"""Running one task per shard: in this process, or on dask (a local cluster on 127.0.0.1, or an
existing scheduler). Each worker builds the model once, on its first task, and keeps it.

Both distributors have the same shape: `run(tasks, job, setup, on_result, on_batch)`; `setup()` builds the model
(a functools.partial of a module-level function, which pickles by reference), `job(task, model, report) -> result`,
where the job calls `report(rows)` after each batch with the rows of its shard done so far, and the distributor
hands that on as `on_batch(shard, rows)`. On dask the counts travel as worker events to this client: a worker's
stderr reaches the user only on a local cluster, and one line over all workers says more than one per worker.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from functools import partial
from typing import Callable

from distributed.diagnostics.plugin import WorkerPlugin

from siclip.manifests.progress import every_s_from_env

REPORT_EVERY_S = 1.0  # a worker's batch counts to the client, unless $SICLIP_PROGRESS_S says otherwise


def _ignore(*_) -> None:
    pass


def run_in_process(tasks: list, job: Callable, setup: Callable, on_result: Callable[[dict], None],
                   on_batch: Callable[[str, int], None] = _ignore) -> None:
    model = setup()
    for task in tasks:
        on_result(job(task, model, partial(on_batch, task.shard)))


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


def _run_on_worker(task, job: Callable, plugin: str, topic: str) -> dict:
    from distributed import get_worker

    worker = get_worker()
    holder = worker.plugins[plugin]
    # the client prints a line a second at most, and the scheduler keeps every event: no more than that
    every = every_s_from_env()
    every = REPORT_EVERY_S if every is None else every
    last = float("-inf")

    def report(rows: int) -> None:
        nonlocal last
        if time.monotonic() - last >= every:
            last = time.monotonic()
            worker.log_event(topic, {"shard": task.shard, "rows": rows})

    result = job(task, holder.model(), report)
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
                on_batch: Callable[[str, int], None] = _ignore, workers: int = 1, scheduler: str | None = None,
                log=print) -> None:
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
    topic = f"{name}-batches"
    try:
        # the handler runs on the client's event-loop thread, concurrently with on_result on this one
        client.subscribe_topic(topic, lambda event: on_batch(event[1]["shard"], event[1]["rows"]))
        client.register_plugin(WorkerModel(name, setup), name=name)
        futures = [client.submit(_run_on_worker, t, job, name, topic, key=f"{name}-{t.shard}", pure=False)
                   for t in tasks]
        for fut in as_completed(futures):
            on_result(fut.result())
    finally:
        try:
            client.unregister_worker_plugin(name)
            client.unsubscribe_topic(topic)
        except Exception:
            pass
        client.close()
        if cluster is not None:
            cluster.close()
