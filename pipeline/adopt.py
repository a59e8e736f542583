"""`siclip shards --adopt SOURCE`: webdataset tars made elsewhere (an img2dataset output folder, or brace
notation), each checked, hard-linked (or copied) into `shards/` and recorded as stage 1 records its own.

A tar is adopted when its entry is in the manifest, saved after each one: a killed run leaves at most
one unlisted file in `shards/`, which the rerun removes before it goes on. Only hard links and copies:
every stage refuses a link that leads out of the data root (docs/design.md), so no symbolic link is made.
"""

from __future__ import annotations

import errno
import os
import shutil
from pathlib import Path

from siclip.images import IMAGE_EXTS, image_member
from siclip.config import to_toml
from siclip.manifests.errors import SiclipError
from siclip.manifests.io import atomic_write_bytes, failpoint, fsync_dir, remove_stale_temps, writing
from siclip.manifests.layout import DataRoot, shard_name
from siclip.manifests.manifest import AdoptRecord, StageManifest
from siclip.manifests.messages import log
from siclip.manifests.progress import Progress
from siclip.manifests.samples import CorruptShardError, iter_shard
from siclip.manifests.storage import StorageBudget, disk_free_bytes, format_size, parse_reserve, parse_size, write_storage
from siclip.pipeline.download import SHARD_FILE
from siclip.pipeline.plan import load_stats, stats_reasons

END_OF_ARCHIVE = bytes(1024)  # two zero blocks: the last thing a whole tar holds (POSIX), padding aside


def source_tars(source: str) -> list[Path]:
    """The tars SOURCE names, in order: a folder's `*.tar` by name, or brace notation expanded."""
    folder = Path(source)
    if folder.is_dir():
        tars = sorted(p for p in folder.iterdir() if p.suffix == ".tar" and p.is_file())
        if not tars:
            raise SiclipError(f"--adopt {source}: the folder holds no .tar file (img2dataset writes 00000.tar, "
                              f"00001.tar, ... into its output folder)")
        return [p.resolve() for p in tars]
    from braceexpand import braceexpand

    paths = [Path(p) for p in braceexpand(source)]
    missing = [p for p in paths if not p.is_file()]
    if len(missing) == len(paths):
        raise SiclipError(f"--adopt {source}: matches no tar (neither a folder nor existing files; brace notation "
                          f"such as '/d/{{00000..00099}}.tar' names each tar)")
    if missing:
        raise SiclipError(f"--adopt {source}: {missing[0]} does not exist ({len(missing)} of the {len(paths)} tars "
                          f"named are missing)")
    foreign = next((p for p in paths if p.suffix != ".tar"), None)
    if foreign:
        raise SiclipError(f"--adopt {source}: {foreign} is not a .tar file; siclip adopts webdataset tars")
    return [p.resolve() for p in paths]


def stats_of(tar: Path) -> dict | None:
    """img2dataset's `_stats.json` beside the tar, or None when it has none."""
    path = tar.with_name(f"{tar.stem}_stats.json")
    return load_stats(path) if path.is_file() else None


def count_samples(tar: Path, stats: dict | None) -> int:
    """The samples of a tar, read to its end; a one-line SiclipError naming it when stages 2 and 3 could not
    read it: truncated or corrupt, a key twice, a sample without an image, or other counts than its stats."""
    size = tar.stat().st_size
    with open(tar, "rb") as f:
        f.seek(max(0, size - len(END_OF_ARCHIVE)))
        whole = size % 512 == 0 and f.read() == END_OF_ARCHIVE
    truncated = (f"{tar}: truncated, or not a tar: it does not end with the end-of-archive blocks a whole tar ends "
                 f"with; write or download it again")
    samples, images, imageless = 0, 0, None
    try:
        for sample in iter_shard(tar):
            samples += 1
            if image_member(sample) is not None:
                images += 1
            elif imageless is None:
                imageless = sample["__key__"]
    except CorruptShardError as e:
        raise SiclipError(str(e) if whole else f"{truncated} ({str(e).split(': ', 1)[1]})") from None
    if not whole:
        raise SiclipError(truncated)
    if stats is not None and int(stats.get("successes", -1)) != samples:
        raise SiclipError(f"{tar}: {samples} samples, but its {tar.stem}_stats.json says img2dataset wrote "
                          f"{stats.get('successes')}; the tar is not the one img2dataset finished")
    if samples and not images:
        raise SiclipError(f"{tar}: no image member in any of its {samples} samples ({', '.join(IMAGE_EXTS)}): not "
                          f"a webdataset of images")
    if imageless is not None:
        raise SiclipError(f"{tar}: sample {imageless} has no image member ({', '.join(IMAGE_EXTS)}); siclip trains "
                          f"on one image per sample")
    if not samples and stats is None:
        raise SiclipError(f"{tar}: no samples, so no image members (and no {tar.stem}_stats.json saying that every "
                          f"download of the shard failed)")
    return samples


def _place(src: Path, dst: Path, copy: bool, root: DataRoot) -> None:
    """Hard-link (or copy) `src` to `dst`, whole or not at all."""
    tmp = dst.with_name(f".{dst.name}.tmp-{os.getpid()}")  # the name remove_stale_temps cleans
    try:
        with writing(dst):
            if copy:
                shutil.copyfile(src, tmp)
                with open(tmp, "rb+") as f:
                    os.fsync(f.fileno())
            else:
                try:
                    os.link(src, tmp)
                except OSError as e:
                    if e.errno not in (errno.EXDEV, errno.EPERM, errno.EMLINK):
                        raise
                    why = ("is on another file system than" if e.errno == errno.EXDEV
                           else f"cannot be hard-linked ({os.strerror(e.errno)}) into")
                    raise SiclipError(f"{src} {why} the data root {root.root}: pass --copy to copy the tars, or "
                                      f"put --data on the same file system (siclip makes no symbolic links: every "
                                      f"stage refuses a link that leads out of its data root)") from None
            os.replace(tmp, dst)
    finally:
        if os.path.lexists(tmp):
            tmp.unlink()
    fsync_dir(dst.parent)


def _clean(root: DataRoot, manifest: StageManifest) -> bool:
    """Bring shards/ and the manifest into agreement after a killed run: drop entries whose tar is gone or
    changed size (the rerun adopts their source again), remove unlisted shard files and partial copies."""
    changed = False
    for unit in list(manifest.entries):
        if not manifest.entry_ok(root, unit):
            log(f"shards: {unit} is listed but its tar is missing or changed; it will be adopted again")
            del manifest.entries[unit]
            changed = True
    listed = {Path(rel).name for rel, _ in manifest.files()}
    remove_stale_temps(root.shards)
    for p in root.shards.iterdir():
        if SHARD_FILE.match(p.name) and p.name not in listed:
            log(f"shards: removing {p.name}, left unlisted by an interrupted run")
            p.unlink()
    return changed


def adopt_locked(root: DataRoot, cfg) -> int:
    """Adopt the tars of `cfg.adopt` into `root` (the shards lock held); returns the exit status."""
    manifest = StageManifest.load(root, "shards")
    if manifest.info.plan:
        raise SiclipError(f"the shards under {root.root} were downloaded from a URL list by 'siclip shards --urls'; "
                          f"adopt into another --data (one data root holds downloaded or adopted shards)")
    tars = source_tars(cfg.adopt)
    mine = next((t for t in tars if root.shards.resolve() in t.parents), None)
    if mine:  # what a rerun cleans there is the data root's own
        raise SiclipError(f"--adopt {cfg.adopt}: {mine} lies in the data root's own shards folder; adopt from a "
                          f"folder outside {root.shards}")
    root.inside(root.shards).mkdir(parents=True, exist_ok=True)
    if _clean(root, manifest):
        manifest.save(root)

    # a tar counts as adopted by its path, so a rerun (or the same tars named another way) adds nothing
    info = manifest.info.adopt = manifest.info.adopt or AdoptRecord(sources=[], same_as={})
    adopted = {e.source for e in manifest.entries.values()} | set(info.same_as)
    todo = [t for t in tars if str(t) not in adopted]
    new_bytes = sum(t.stat().st_size for t in todo)
    budget = parse_size(cfg.budget)
    reserve = parse_reserve(cfg.reserve, budget)
    used = StorageBudget.load(root).used_bytes
    if used + new_bytes > budget - reserve:
        raise SiclipError(f"the {len(todo)} tar(s) to adopt take {format_size(new_bytes)}, but the budget "
                          f"{format_size(budget)} less the reserve {format_size(reserve)} leaves "
                          f"{format_size(max(0, budget - reserve - used))} (used: {format_size(used)}); raise --budget "
                          f"or lower --reserve")
    free = disk_free_bytes(root.root)
    if cfg.copy and new_bytes > free:
        raise SiclipError(f"copying the {len(todo)} tar(s) takes {format_size(new_bytes)} but the disk holding "
                          f"{root.root} has {format_size(free)} free; free space, or adopt without --copy (hard links)")
    write_storage(root, budget_bytes=budget, reserve_bytes=reserve)
    atomic_write_bytes(root.shards / "_config.toml", to_toml(cfg).encode())
    if cfg.adopt not in info.sources:
        info.sources.append(cfg.adopt)
    log(f"shards: --adopt {cfg.adopt}: {len(tars)} tar(s), {len(tars) - len(todo)} adopted already, {len(todo)} to "
        f"{'copy' if cfg.copy else 'hard-link'} ({format_size(new_bytes)})")

    prog = Progress("shards: adopt", len(todo), "tars", every_s=cfg.progress_every_s)
    by_sha = {rec.sha256: unit for unit, e in manifest.entries.items() for rec in e.files.values()}
    next_id = 0
    for done, src in enumerate(todo):
        stats = stats_of(src)
        samples = count_samples(src, stats)
        while shard_name(next_id) in manifest.entries:
            next_id += 1
        unit = shard_name(next_id)
        dst = root.shards / f"{unit}.tar"
        _place(src, dst, cfg.copy, root)
        failpoint(f"adopt-placed:{unit}")
        rows, failures = (int(stats.get("count", samples)), stats_reasons(stats)) if stats else (samples, {})
        entry = manifest.add(root, unit, [dst], samples=samples, rows=rows, failures=failures, source=str(src))
        sha = entry.files[root.rel(dst)].sha256
        if sha in by_sha:  # the same bytes under another path: each sample once
            del manifest.entries[unit]
            info.same_as[str(src)] = by_sha[sha]
            log(f"shards: {src} is the same tar as shard {by_sha[sha]} (sha256); not adopted twice")
        else:
            by_sha[sha] = unit
        manifest.save(root)
        if unit not in manifest.entries:
            dst.unlink()  # after the save: the rerun would remove it, unlisted, if this process died first
        prog.update(done + 1, f"{format_size(manifest.total_bytes)} recorded")
    if todo:
        prog.update(len(todo), force=True)
        prog.close()
    storage = StorageBudget.load(root)
    log(f"shards: done: {len(manifest.entries)} shards, {manifest.total_samples:,} samples, "
        f"{format_size(manifest.total_bytes)}; "
        f"budget {format_size(storage.used_bytes)} of {format_size(storage.budget_bytes)} used")
    if not manifest.total_samples:
        log("shards: the adopted tars hold no samples for the later stages")
        return 1
    return 0
