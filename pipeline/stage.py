"""`siclip shards`: validate the list, plan the budget on a pilot shard, download the rest, resume."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from dataclasses import replace
from pathlib import Path

import pyarrow as pa

from siclip.config import print_config, to_toml
from siclip.manifests.errors import SiclipError
from siclip.manifests.io import atomic_write_bytes
from siclip.manifests.layout import DataRoot, open_data_root, shard_name
from siclip.manifests.manifest import Fitted, PlanRecord, RetryRecord, StageManifest, stage_lock
from siclip.manifests.progress import Progress
from siclip.manifests.storage import StorageBudget, disk_free_bytes, format_size, parse_reserve, parse_size, write_storage
from siclip.pipeline.download import ShardRunner, budget_stop_message, params_of, reconcile, shard_files
from siclip.pipeline.config import ALLOW_PRIVATE_FLAG
from siclip.pipeline.plan import Plan, check_fits, reencoded_bytes, rows_that_fit, shard_bound
from siclip.pipeline.reasons import RETRYABLE, classify
from siclip.pipeline.urls import read_url_list
from siclip.manifests.messages import log


def table_sha256(table: pa.Table) -> str:
    h = hashlib.sha256()
    for col in ("url", "caption"):
        for chunk in table.column(col).chunks:
            for buf in chunk.buffers():
                if buf is not None:
                    h.update(buf)
    for col in table.column_names[2:]:  # the kept extra columns, by value: buffers may hold junk under nulls
        h.update(json.dumps([col, table.column(col).to_pylist()], default=str).encode())
    return h.hexdigest()


def run_shards(cfg) -> int:
    """Run stage 1 with a resolved ShardsConfig; returns the exit status."""
    new = _new_paths(Path(cfg.data).absolute())
    root = open_data_root(cfg.data, create=True)
    print_config(cfg, "siclip shards")
    with stage_lock(root, "shards"):
        try:
            if cfg.adopt:
                from siclip.pipeline.adopt import adopt_locked

                return adopt_locked(root, cfg)
            return _run_locked(root, cfg)
        except BaseException:
            if new and not _finished_any(root):
                _remove(new)
            raise


def _finished_any(root: DataRoot) -> bool:
    try:
        return bool(StageManifest.load(root, "shards").entries)
    except SiclipError:  # an unreadable manifest: leave everything as it is
        return True


def _new_paths(data: Path) -> list[Path]:
    """What a first run makes, of what is not there yet: a run that fails before it finishes its first
    shard (a list without URLs, a pilot over the budget, ...) removes them again, and leaves the
    data root as it found it."""
    made = [data, data / "manifests", data / "manifests" / ".shards.lock", data / "manifests" / "storage.json",
            data / "shards", data / "shards" / "_config.toml", data / "work", data / "work" / "shards"]
    return [p for p in made if not os.path.lexists(p)]


def _remove(paths: list[Path]) -> None:
    """Remove what `_new_paths` listed, with whatever a failed pilot left in its folders: this run made all of it."""
    for p in reversed(paths):  # the deepest first
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)
        elif os.path.lexists(p):
            p.unlink()


def _run_locked(root: DataRoot, cfg) -> int:
    t0 = time.monotonic()
    urls = read_url_list(cfg.urls, cfg.url_col, cfg.caption_col, cfg.allow_non_http, cfg.max_samples,
                         cfg.drop_duplicate_urls, cfg.input_format, cfg.save_additional_columns)
    refused = ", ".join(f"{k} {v}" for k, v in sorted(urls.refused.items())) or "none"
    files = f"{urls.files} files, " if urls.files > 1 else ""
    log(f"shards: {cfg.urls}: {files}{urls.source_rows:,} rows, {urls.table.num_rows:,} to download; refused: {refused}")
    if urls.duplicates and not cfg.drop_duplicate_urls:
        log(f"shards: warning: {urls.duplicates:,} row(s) repeat the URL of an earlier row and will be downloaded "
            f"again, as identical samples; --drop-duplicate-urls keeps the first row of each URL")
    if urls.table.num_rows == 0:
        raise SiclipError(f"{cfg.urls}: no downloadable http(s) URL in column {cfg.url_col!r}")

    budget = parse_size(cfg.budget)
    reserve = parse_reserve(cfg.reserve, budget)
    free = disk_free_bytes(root.root)
    if budget > free + StorageBudget.load(root).used_bytes:
        log(f"shards: warning: the budget {format_size(budget)} is larger than the free disk {format_size(free)}")

    manifest = StageManifest.load(root, "shards")
    if manifest.info.adopt:  # its shards have no URL list, and names a download would take
        raise SiclipError(f"the shards under {root.root} were adopted by 'siclip shards --adopt'; download a URL list "
                          f"into another --data (one data root holds downloaded or adopted shards)")
    reconcile(root, manifest, cfg.encode_format, log=log)
    list_id = table_sha256(urls.table)
    plan_info = manifest.info.plan
    if plan_info and cfg.fit and plan_info.fitted.dump():
        cfg = replace(cfg, **plan_info.fitted.dump())  # the settings an earlier --fit chose for this same command
    if plan_info:
        _check_same_job(root, manifest, cfg, list_id)
    else:
        manifest.params = params_of(cfg)
    write_storage(root, budget_bytes=budget, reserve_bytes=reserve)
    atomic_write_bytes(root.shards / "_config.toml", to_toml(cfg).encode())

    runner = ShardRunner(root, cfg, manifest, budget)
    if not plan_info:
        plan_info, cfg = _pilot_and_plan(root, cfg, urls.table, manifest, runner, budget, reserve, free, list_id)

    rows, sps = plan_info.rows, cfg.samples_per_shard
    table = urls.table.slice(0, rows)
    jobs = []
    for sid in range(plan_info.shards):
        if shard_name(sid) not in manifest.entries:
            part = table.slice(sid * sps, sps)
            jobs.append((sid, part, shard_bound(part, cfg)))
    jobs += _retry_jobs(root, cfg, manifest) if cfg.retry_failed else _pending_retry_jobs(root, cfg, manifest)
    if jobs:
        _run_with_progress(root, cfg, manifest, runner, jobs, plan_info)
    else:
        log("shards: every planned shard is already finished")
    return _finish(root, cfg, manifest, runner, t0)


def _check_same_job(root: DataRoot, manifest: StageManifest, cfg, list_id: str) -> None:
    """A rerun must ask for the same shards as the run that made the existing ones."""
    made, now = manifest.params, params_of(cfg)
    if set(made) != set(now):
        raise SiclipError(f"{root.manifest_path('shards')}: params {', '.join(sorted(set(made) ^ set(now)))} unknown "
                          f"or missing; this siclip neither writes nor reads that: rerun into a new data root")
    diff = [f"{k}={made[k]!r} (now {now[k]!r})" for k in now if made[k] != now[k]]
    if manifest.info.plan.list_sha256 != list_id:
        diff.insert(0, "a different URL list")
    if diff:
        raise SiclipError(f"the shards under this data root were made with {', '.join(diff)}; "
                          "rerun with the same settings to resume, or use another --data")


def _pilot_and_plan(root, cfg, table, manifest, runner, budget, reserve, free, list_id):
    """Download shard 0 in this process, measure bytes per row, print the plan; fit or refuse."""
    sps, asked = cfg.samples_per_shard, cfg
    while True:
        pilot = table.slice(0, sps)
        bound = shard_bound(pilot, cfg)
        if bound > free:
            raise SiclipError(f"the pilot shard could need {format_size(bound)} but the disk has {format_size(free)} free "
                              f"(budget {format_size(budget)}); free space or lower --samples-per-shard")
        log(f"shards: pilot shard {shard_name(0)}: {pilot.num_rows:,} rows in this process")
        t = time.monotonic()
        if not runner.run_in_process(0, pilot, bound):
            raise SiclipError(f"the budget {format_size(budget)} cannot hold even the pilot shard (up to {format_size(bound)}); "
                              f"raise --budget or lower --samples-per-shard "
                              "(a shard starts only when its worst case fits)")
        if shard_name(0) not in manifest.entries:
            raise SiclipError("the pilot shard failed in img2dataset; see the messages above")
        entry = manifest.entries[shard_name(0)]
        pilot_bytes = sum(f.bytes for f in entry.files.values())
        log(f"shards: pilot: {entry.samples:,}/{entry.rows:,} images in {time.monotonic() - t:.1f} s, "
            f"{format_size(pilot_bytes)}")
        others = StorageBudget.load(root).used_bytes - manifest.total_bytes
        plan = Plan(pilot_bytes / max(1, entry.rows), table.num_rows, pilot_bytes, budget, reserve, others)
        log(f"shards: {plan.describe()}")
        check_fits(plan, free, plan.planned_bytes - pilot_bytes)
        if plan.planned_bytes <= plan.limit_bytes:
            break
        keep = rows_that_fit(plan)
        if not cfg.fit:
            raise SiclipError(f"the plan {format_size(plan.planned_bytes)} exceeds the budget less the reserve "
                              f"({format_size(plan.limit_bytes)}): rerun with --fit to keep {keep:,} of {plan.rows:,} rows, "
                              f"or raise --budget, or lower --reserve, --image-size or --quality")
        if cfg.fit_by == "samples" or keep >= table.num_rows:
            if keep < entry.rows:
                raise SiclipError(f"--fit: even the pilot shard ({format_size(pilot_bytes)}) exceeds the budget less the "
                                  f"reserve ({format_size(plan.limit_bytes)}); lower --samples-per-shard")
            log(f"shards: --fit: keeping {keep:,} of {table.num_rows:,} rows "
                f"(about {format_size(plan.bytes_per_row * keep)})")
            table = table.slice(0, keep)
            break
        cfg = runner.cfg = _fit_encoding(root, cfg, plan, manifest)  # lowers quality or size; the pilot is redone
    manifest.params = params_of(cfg)
    shards = -(-table.num_rows // sps)
    manifest.info.plan = PlanRecord(rows=table.num_rows, shards=shards, bytes_per_row=plan.bytes_per_row,
                                    planned_bytes=int(plan.bytes_per_row * table.num_rows), list_sha256=list_id,
                                    budget_bytes=budget, reserve_bytes=reserve,
                                    fitted=Fitted(**{k: getattr(cfg, k) for k in ("quality", "image_size")
                                                     if getattr(cfg, k) != getattr(asked, k)}))
    manifest.save(root)
    write_storage(root, plan_shards_bytes=int(plan.bytes_per_row * table.num_rows))
    return manifest.info.plan, cfg


def _fit_encoding(root, cfg, plan: Plan, manifest: StageManifest):
    """Pick the highest quality (or largest image size) whose re-encoded pilot images fit, then drop the pilot."""
    tar = shard_files(root.shards, 0)[0]
    options = ([replace(cfg, quality=q) for q in range(cfg.quality - 5, 29, -5)] if cfg.fit_by == "quality"
               else [replace(cfg, image_size=s) for s in range(cfg.image_size - 32, 63, -32)])
    entry_bytes = plan.done_bytes
    for cand in options:
        now, new = reencoded_bytes(tar, cand.image_size, cand.quality, cfg.encode_format, cfg.resize_mode)
        est = (entry_bytes - now + new) / max(1, manifest.entries[shard_name(0)].rows) * plan.rows
        if est <= plan.limit_bytes:
            log(f"shards: --fit: {cfg.fit_by} {getattr(cand, cfg.fit_by)} is estimated at {format_size(est)}; "
                f"the pilot shard is downloaded again with it")
            break
    else:
        cand = options[-1] if options else cfg
        log(f"shards: --fit: even {cfg.fit_by} {getattr(cand, cfg.fit_by)} does not fit; the row count is lowered too")
    for p in shard_files(root.shards, 0):
        p.unlink(missing_ok=True)
    del manifest.entries[shard_name(0)]
    manifest.params = params_of(cand)
    manifest.save(root)
    return replace(cand, fit_by="samples")


def retry_reasons(cfg) -> set[str]:
    """The failure reasons --retry-failed fetches again: the transient ones, and `private_address` once the
    settings allow such addresses (the rows a run without --allow-private-addresses refused)."""
    return RETRYABLE | ({"private_address"} if cfg.allow_private_addresses else set())


def _retry_jobs(root, cfg, manifest: StageManifest) -> list:
    """New shards of the rows that failed for a retryable reason in shards not harvested yet."""
    import pyarrow.parquet as pq

    info = manifest.info.retry = manifest.info.retry or RetryRecord(harvested=[], reasons={}, shards={})
    reasons = retry_reasons(cfg)
    columns = ["url", "caption", *cfg.save_additional_columns]
    parts = []
    for unit in sorted(manifest.entries):
        if unit in info.harvested:
            continue
        t = pq.read_table(shard_files(root.shards, int(unit))[1], columns=[*columns, "status", "error_message"])
        again = [st != "success" and classify(err) in reasons
                 for st, err in zip(t.column("status").to_pylist(), t.column("error_message").to_pylist())]
        parts.append(t.select(columns).filter(pa.array(again, pa.bool_())))
        info.harvested.append(unit)
        info.reasons[unit] = sorted(reasons)  # which of its failures were tried again
    planned = manifest.info.plan.shards
    next_id = max([planned - 1] + [int(k) for k in info.shards] + [int(u) for u in manifest.entries]) + 1
    sps = cfg.samples_per_shard
    if parts:
        table = pa.concat_tables(parts).combine_chunks()
        table = table.set_column(1, "caption", table.column("caption").fill_null(""))
    else:
        table = pa.table({"url": pa.array([], pa.string()), "caption": pa.array([], pa.string())})
    retry_dir = root.work / "shards" / "retry"
    retry_dir.mkdir(parents=True, exist_ok=True)
    for i in range(0, table.num_rows, sps):
        sid = next_id + i // sps
        pq.write_table(table.slice(i, sps), retry_dir / f"{shard_name(sid)}.parquet")
        info.shards[shard_name(sid)] = min(sps, table.num_rows - i)
    manifest.save(root)
    log(f"shards: --retry-failed: {table.num_rows:,} rows failed for a retryable reason "
        f"({', '.join(sorted(reasons))}); {-(-table.num_rows // sps)} new shard(s)")
    return _pending_retry_jobs(root, cfg, manifest)


def _pending_retry_jobs(root, cfg, manifest: StageManifest) -> list:
    import pyarrow.parquet as pq

    jobs = []
    for name in sorted(manifest.info.retry.shards if manifest.info.retry else ()):
        if name not in manifest.entries:
            part = pq.read_table(root.inside(root.work / "shards" / "retry" / f"{name}.parquet"))
            jobs.append((int(name), part, shard_bound(part, cfg)))
    return jobs


def _run_with_progress(root, cfg, manifest, runner: ShardRunner, jobs, plan_info) -> None:
    rows_total = sum(len(t) for _, t, _ in jobs)
    done_before = manifest.total_bytes
    bpr = plan_info.bytes_per_row
    budget = runner.budget_bytes
    prog = Progress("shards", rows_total, "samples", every_s=cfg.progress_every_s)
    units_before = set(manifest.entries)
    log(f"shards: downloading {len(jobs)} shard(s), {rows_total:,} rows, {cfg.process_count} process(es) × {cfg.threads} threads")

    def tick(staged_bytes: int, force: bool = False) -> None:
        if not (force or prog.due()):
            return
        new = [e for u, e in manifest.entries.items() if u not in units_before]
        rows = sum(e.rows for e in new) + staged_bytes / max(bpr, 1)
        ok = sum(e.samples for e in new)
        made = manifest.total_bytes - done_before + staged_bytes
        rate = made / max(prog.elapsed, 1e-9) / 1e6
        used = StorageBudget.load(root).used_bytes + staged_bytes
        succ = f"success {100 * ok / max(1, sum(e.rows for e in new)):.0f}%" if new else "success ?"
        prog.update(min(rows, rows_total), f"{succ} | {rate:.1f} MB/s | budget {format_size(used)}/{format_size(budget)}",
                    force=force)

    runner.progress = tick
    runner.run(jobs)
    tick(0, force=True)
    prog.close()


def net_outcome(manifest: StageManifest) -> tuple[int, int, dict[str, int], int]:
    """(rows of the list, samples, failures by reason, rows still waiting in a retry shard), each row
    counted once: a row that --retry-failed downloaded again counts by its last try."""
    retry = manifest.info.retry or RetryRecord(harvested=[], reasons={}, shards={})
    retry_shards, harvested = retry.shards, set(retry.harvested)
    rows = samples = 0
    failures: dict[str, int] = {}
    for unit, e in manifest.entries.items():
        rows += 0 if unit in retry_shards else e.rows
        samples += e.samples
        for r, n in e.failures.items():
            if not (unit in harvested and r in retry.reasons[unit]):  # tried again in a retry shard
                failures[r] = failures.get(r, 0) + n
    waiting = sum(n for name, n in retry_shards.items() if name not in manifest.entries)
    return rows, samples, failures, waiting


def _finish(root, cfg, manifest: StageManifest, runner: ShardRunner, t0: float) -> int:
    storage = StorageBudget.load(root)
    rows, ok, failures, waiting = net_outcome(manifest)
    retried = sum(n for name, n in (manifest.info.retry.shards if manifest.info.retry else {}).items()
                  if name in manifest.entries)
    fail_txt = ", ".join(f"{r} {n}" for r, n in sorted(failures.items(), key=lambda x: -x[1])) or "none"
    secs = time.monotonic() - t0
    if failures.get("private_address"):
        log(f"shards: {failures['private_address']:,} row(s) point at loopback, private, link-local or other non-public "
            f"addresses and were not fetched; if the images are served on your own network, rerun with "
            f"{ALLOW_PRIVATE_FLAG} --retry-failed to fetch them")
    log(f"shards: done: {len(manifest.entries)} shards, {ok:,}/{rows:,} images ({100 * ok / max(1, rows):.1f}%)"
        f"{f', net of {retried:,} row(s) downloaded again by --retry-failed' if retried else ''}, "
        f"{format_size(manifest.total_bytes)} in {secs:.1f} s; failures: {fail_txt}"
        f"{f' ({waiting:,} waiting for a retry shard)' if waiting else ''}; "
        f"budget {format_size(storage.used_bytes)} of {format_size(storage.budget_bytes)} used")
    status = 0
    low = _below_pilot(manifest, cfg.min_success_ratio, rows, ok)
    if rows and not ok:  # nothing for the later stages to read: a failure, whatever the reasons
        log(f"shards: no image was downloaded of {rows:,} row(s) (failures: {fail_txt}); the data root holds no "
            f"samples for the later stages")
        status = 1
    elif low:
        log(f"shards: {low}")
        status = 1
    if runner.stopped_by_budget:
        log(f"shards: {budget_stop_message(runner.stopped_by_budget, storage.remaining_bytes)}")
        status = 3
    if runner.stopped_by_disk:
        log(f"shards: stopped at the free disk: {runner.stopped_by_disk}; make room and rerun the same command "
            f"(the {len(manifest.entries)} finished shard(s) are kept)")
        status = 3
    if runner.failed:
        log(f"shards: {len(runner.failed)} shard(s) failed ({', '.join(shard_name(s) for s in runner.failed)}); "
            f"rerun the same command to retry them")
        status = 1
    return status


def _below_pilot(manifest: StageManifest, ratio: float, rows: int, ok: int) -> str | None:
    """Why the run counts as failed though every shard finished: its net success rate fell below
    `ratio` times the pilot's (a server or the network that failed mid-run), or None."""
    pilot = manifest.entries.get(shard_name(0))
    if not ratio or pilot is None or rows <= pilot.rows or not pilot.samples:
        return None
    pilot_rate, rate = pilot.samples / pilot.rows, ok / rows
    if rate >= ratio * pilot_rate:
        return None
    return (f"the run succeeded for {100 * rate:.1f}% of its rows, below {ratio:g} × the pilot's {100 * pilot_rate:.1f}% "
            f"(min_success_ratio): did a server or the network fail mid-run? The failures by reason are above; "
            f"--retry-failed downloads the timeouts, 5xx and connection errors again")
