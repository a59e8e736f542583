"""What `siclip captions` and `siclip teacher` share: choosing the shards still to do, the budget
check, the fan-out, recording each finished sidecar in the stage manifest, progress per batch and summary."""

from __future__ import annotations

import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from siclip.config import print_config, to_toml
from siclip.manifests.errors import DiskError, SiclipError
from siclip.manifests.io import atomic_write_bytes, remove_stale_temps
from siclip.manifests.layout import DataRoot, open_data_root
from siclip.manifests.manifest import Inputs, StageManifest, check_file, stage_lock
from siclip.manifests.progress import Progress
from siclip.manifests.samples import finished_shards, sidecar_path
from siclip.manifests.storage import StorageBudget, disk_free_bytes, format_size
from siclip.manifests.messages import log
from siclip.captioning.jobs import ShardTask


@dataclass
class StageJob:
    """One stage-2 run: which stage, its parameters, how to build the model and what a task does."""

    stage: str  # "captions" or "teacher"
    cfg: object
    params: dict  # decides the sidecar's content; a sidecar made with other params is not reused
    setup: Callable  # builds the model on a worker: a functools.partial of a module-level function
    job: Callable  # run per shard: (ShardTask, model) -> result dict
    bytes_per_row: float  # a-priori sidecar size estimate, before any sidecar exists
    bytes_per_file: float = 0  # and what each sidecar file adds whatever its rows (a-priori too)
    needs: Callable | None = None  # (root, shard) -> reason the shard cannot run yet, or None
    inputs: tuple[str, ...] = ("shards",)  # the stages whose files a sidecar is made from (recorded, see Inputs)


@dataclass
class Tally:
    """What the finished tasks of one run add up to, for progress and the summary."""

    shards: int = 0
    samples: int = 0
    failed_samples: int = 0


def _estimate_bytes(manifest: StageManifest, rows: int, files: int, prior_per_row: float,
                    prior_per_file: float = 0) -> int:
    # measured bytes per row of the sidecars made so far (per-file costs included) beat the a-priori guess
    if manifest.total_samples:
        return int(rows * manifest.total_bytes / manifest.total_samples) + 4096
    return int(rows * prior_per_row + files * prior_per_file) + 4096


def run_stage(job: StageJob) -> int:
    """Run the stage over every finished shard not done yet; 0 if all shards have sidecars, 1 if some were skipped."""
    cfg, stage = job.cfg, job.stage
    root = open_data_root(cfg.data)
    if not root.manifest_path("shards").exists():
        raise SiclipError(f"{root.manifest_path('shards')} does not exist: run 'siclip shards' first")
    print_config(cfg, f"siclip {stage}")
    out_dir = getattr(root, stage)
    with stage_lock(root, stage):
        out_dir.mkdir(parents=True, exist_ok=True)
        stale = remove_stale_temps(root.inside(out_dir))
        if stale:
            log(f"{stage}: removed {stale} partial file(s) a killed run left in {out_dir}")
        shards = finished_shards(root)
        if cfg.shards:
            unknown = sorted(set(cfg.shards) - {s.name for s in shards})
            if unknown:
                raise SiclipError(f"shards {', '.join(unknown)} are not finished shards of {root.root} (see {root.manifest_path('shards')})")
            shards = [s for s in shards if s.name in set(cfg.shards)]
        manifest = StageManifest.load(root, stage)
        inputs = Inputs(root, job.inputs)
        todo, done, adopted = [], 0, 0
        for s in shards:
            entry = manifest.entries.get(s.name)
            if entry is not None and entry.params != job.params and not cfg.overwrite:
                raise SiclipError(
                    f"{stage} sidecar of shard {s.name} was made with other parameters ({_diff(entry.params, job.params)}); "
                    f"pass --overwrite to replace the {stage} sidecars, or keep the old parameters")
            if entry is not None and entry.params == job.params and manifest.entry_ok(root, s.name) \
                    and not inputs.changed(s.name, entry):
                done += 1
                continue
            path = sidecar_path(root, stage, s.name)
            # a sidecar on disk that its entry does not list: a run killed, or a disk full, between the sidecar's
            # rename and the manifest save (over an old entry too, when that run replaced it)
            unlisted = entry is None or entry.params != job.params or not manifest.entry_ok(root, s.name)
            if unlisted and path.exists() and _adopt(root, manifest, job, s, path, inputs):
                adopted += 1
                continue
            todo.append(s)
        rows = sum(s.samples for s in todo)
        _check_budget(root, stage, manifest, rows, len(todo), job, out_dir)
        # an entry whose sidecar is missing or damaged lists nothing true; one whose sidecar was made with
        # replaced parameters or from replaced inputs stays, true to its sidecar, until its replacement is
        # written: a model that fails to load or a killed run leaves the manifest as it was
        stale_entries = [s.name for s in todo if s.name in manifest.entries and not manifest.entry_ok(root, s.name)]
        for name in stale_entries:
            del manifest.entries[name]
        if adopted:
            manifest.params = job.params
        if adopted or stale_entries:
            manifest.save(root)
        if adopted:
            log(f"{stage}: recorded {adopted} complete sidecar(s) that an interrupted run wrote but did not list")
        atomic_write_bytes(out_dir / "_config.toml", to_toml(cfg).encode())
        log(f"{stage}: {len(shards)} finished shard(s): {done + adopted} done already, {len(todo)} to do ({rows} samples)")
        skipped: dict[str, str] = {}
        tasks = []
        for s in todo:
            reason = job.needs(root, s.name) if job.needs else None
            if reason is None and check_file(root, root.rel(s.tar), s.tar_record, rehash=False):
                reason = f"{s.tar}: {check_file(root, root.rel(s.tar), s.tar_record, rehash=False)} (shards manifest)"
            if reason:
                skipped[s.name] = reason
                log(f"{stage}: shard {s.name} skipped: {reason}")
                continue
            tasks.append(ShardTask(shard=s.name, tar=str(s.tar), tar_record=s.tar_record, inputs=inputs.of(s.name),
                                   out=str(sidecar_path(root, stage, s.name)), root=str(root.root),
                                   expected_samples=s.samples, params=job.params, batch_size=cfg.batch_size))
        progress = Progress(stage, sum(t.expected_samples for t in tasks), "samples", every_s=1.0)
        tally = Tally()
        unrecorded: set[str] = set()
        working: dict[str, int] = {}  # rows done so far of each shard being worked
        finished: set[str] = set()
        lock = threading.Lock()  # on dask, batch counts arrive on the client's event-loop thread

        def show(force: bool = False) -> None:
            progress.update(tally.samples + sum(working.values()), f"{tally.shards}/{len(tasks)} shards", force=force)

        def on_batch(shard: str, rows: int) -> None:
            with lock:
                if shard not in finished:  # a count may arrive after its shard's result
                    working[shard] = max(rows, working.get(shard, 0))
                    show()

        def advance(shard: str, rows: int) -> None:
            with lock:
                finished.add(shard)
                working.pop(shard, None)
                tally.shards += 1
                tally.samples += rows
                show(force=tally.shards == len(tasks))

        def on_result(res: dict) -> None:
            if not res["ok"]:
                skipped[res["shard"]] = res["error"]
                log(f"{stage}: shard {res['shard']} skipped: {res['error']}")
                advance(res["shard"], 0)
                return
            path = sidecar_path(root, stage, res["shard"])
            manifest.params = job.params
            manifest.add(root, res["shard"], [path], res["rows"], params=job.params, model=res["model"],
                         revision=res.get("revision"), failed=res["failed"], timing=res.get("timing"),
                         worker=res.get("worker"), inputs=inputs.of(res["shard"]))
            try:
                manifest.save(root)
                unrecorded.clear()  # a save lists every sidecar added so far
            except DiskError as e:  # the sidecar is whole on disk: the next save, or the rerun, records it
                unrecorded.add(res["shard"])
                log(f"{stage}: shard {res['shard']}: sidecar written but not recorded: {e}")
            tally.failed_samples += sum(res["failed"].values())
            advance(res["shard"], res["rows"])

        if tasks:
            from siclip.captioning import fanout

            if cfg.workers == 0 and not cfg.scheduler:
                fanout.run_in_process(tasks, job.job, job.setup, on_result, on_batch)
            else:
                fanout.run_on_dask(tasks, job.job, job.setup, on_result, on_batch, workers=cfg.workers,
                                   scheduler=cfg.scheduler, log=log)
        progress.close()
        made = len(tasks) - sum(1 for t in tasks if t.shard in skipped)
        if unrecorded:
            log(f"{stage}: {len(unrecorded)} sidecar(s) written but not recorded ({', '.join(sorted(unrecorded))}): "
                f"make room and rerun the same command, which records them without making them again")
        log(f"{stage}: done: {made} sidecar(s) written, {done + adopted} already there, {len(skipped)} shard(s) skipped"
            f"{' (' + ', '.join(sorted(skipped)) + ')' if skipped else ''}, {tally.failed_samples} sample(s) without output; "
            f"{tally.samples / max(progress.elapsed, 1e-9):.1f} samples/s; {stage} total {format_size(manifest.total_bytes)} in {out_dir}")
        return 1 if skipped or unrecorded else 0


def _diff(old: dict, new: dict) -> str:
    keys = [k for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)]
    return ", ".join(f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in keys[:4]) or "unknown"


def _adopt(root: DataRoot, manifest: StageManifest, job: StageJob, shard, path: Path, inputs: Inputs) -> bool:
    """Record a complete sidecar that a run killed between its rename and its manifest save left behind."""
    from siclip.captioning.sidecar import complete_sidecar
    from siclip.manifests.samples import read_sidecar

    rows = complete_sidecar(path, job.params)
    if rows is None or rows != shard.samples:
        return False
    table, info = read_sidecar(path)
    if info.get("inputs") != inputs.of(shard.name):  # made from a shard since redone
        return False
    failed: dict[str, int] = {}
    for s in table.column("status").to_pylist():
        if s != "ok":
            failed[s] = failed.get(s, 0) + 1
    model = info["model"] if job.stage == "captions" else [t["id"] for t in info["teachers"]]
    manifest.add(root, shard.name, [path], rows, params=job.params, model=model, revision=info.get("revision"),
                 failed=failed, inputs=inputs.of(shard.name))
    return True


def _check_budget(root: DataRoot, stage: str, manifest: StageManifest, rows: int, files: int, job: StageJob,
                  out_dir: Path) -> None:
    need = _estimate_bytes(manifest, rows, files, job.bytes_per_row, job.bytes_per_file) if rows else 0
    budget = StorageBudget.load(root)
    if budget.budget_bytes and need > budget.remaining_bytes:
        raise SiclipError(
            f"{stage} sidecars for {rows} samples need about {format_size(need)} but only "
            f"{format_size(max(budget.remaining_bytes, 0))} of the {format_size(budget.budget_bytes)} budget remain "
            f"({root.manifests / 'storage.json'}); raise the budget or free space; nothing was written")
    free = disk_free_bytes(out_dir)
    if need > free:
        raise SiclipError(f"{stage} sidecars need about {format_size(need)} but {out_dir} has {format_size(free)} free")
    if rows:
        log(f"{stage}: estimated {format_size(need)} of sidecars; budget remaining "
            f"{format_size(budget.remaining_bytes) if budget.budget_bytes else 'unlimited (no budget set)'}")
