"""`siclip manifest DATA`: storage accounting per stage against the budget, and `--verify`."""

from __future__ import annotations

from siclip.manifests.layout import STAGES, DataRoot
from siclip.manifests.manifest import StageManifest, check_file
from siclip.manifests.storage import StorageBudget, format_size


def summary(root: DataRoot) -> dict:
    """One JSON-able object: budget, used, remaining, and per stage files/samples/bytes."""
    budget = StorageBudget.load(root)
    stages = {}
    for s in STAGES:
        m = StageManifest.load(root, s)
        stages[s] = {"files": m.total_files, "samples": m.total_samples, "bytes": m.total_bytes}
    return {"data": str(root.root), "budget_bytes": budget.budget_bytes, "reserve_bytes": budget.reserve_bytes,
            "used_bytes": budget.used_bytes, "remaining_bytes": budget.remaining_bytes if budget.budget_bytes else None,
            "stages": stages}


def table(info: dict) -> str:
    b = info["budget_bytes"]
    pct = (lambda n: f"{100 * n / b:.1f}%") if b else (lambda n: "-")
    rows = [("stage", "files", "samples", "bytes", "% budget")]
    for s, st in info["stages"].items():
        rows.append((s, str(st["files"]), str(st["samples"]), format_size(st["bytes"]), pct(st["bytes"])))
    rows.append(("total", str(sum(st["files"] for st in info["stages"].values())),
                 "", format_size(info["used_bytes"]), pct(info["used_bytes"])))
    widths = [max(len(r[i]) for r in rows) for i in range(5)]
    lines = [f"data root: {info['data']}"]
    lines += ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))) for r in rows]
    if b:
        lines.append(f"budget {format_size(b)}, used {format_size(info['used_bytes'])}, "
                     f"remaining {format_size(info['remaining_bytes'])}")
    else:
        lines.append("no budget set yet (siclip shards sets it)")
    return "\n".join(lines)


def damaged(root: DataRoot, progress=None) -> list[tuple[str, str, str, str]]:
    """Re-hash every file every manifest lists: (stage, unit, relative path, what is wrong) per
    missing or corrupt file."""
    out = []
    for s in STAGES:
        m = StageManifest.load(root, s)
        for unit, entry in m.entries.items():
            for rel, rec in entry.files.items():
                bad = check_file(root, rel, rec, rehash=True)
                if progress:
                    progress(rel)
                if bad:
                    out.append((s, unit, rel, bad))
    return out


def verify(root: DataRoot, progress=None) -> list[str]:
    """One line per missing or corrupt file (see `damaged`)."""
    return [f"{s}: {root.root / rel}: {bad}" for s, _, rel, bad in damaged(root, progress)]


# what redoes a dropped unit of each stage, and what else that redoes (a sidecar records the sha256
# of the files it was made from, so a shard downloaded again, or recaptioned, has it redone)
REDO = {"shards": "siclip shards (the same command) downloads it again, then siclip captions and siclip teacher "
                  "redo its sidecars",
        "captions": "siclip captions makes it again, then siclip teacher redoes the shard's teacher sidecar",
        "teacher": "siclip teacher makes it again",
        "train": "siclip train --resume goes on from the newest whole checkpoint (from the start when none is left)"}


def repair(root: DataRoot, damage: list[tuple[str, str, str, str]], log=print) -> dict[str, list[str]]:
    """Drop every unit with a damaged file from its manifest and delete all of its files, so that the
    stage's rerun redoes it (a rerun would otherwise adopt what it finds on disk). Each stage's
    lock is held while it changes, so no job of that stage runs meanwhile. Returns {stage: units}."""
    import shutil

    from siclip.manifests.manifest import stage_lock

    by_stage: dict[str, dict[str, list[str]]] = {}
    for stage, unit, rel, bad in damage:
        by_stage.setdefault(stage, {}).setdefault(unit, []).append(f"{rel}: {bad}")
    for stage, units in by_stage.items():
        with stage_lock(root, stage):
            m = StageManifest.load(root, stage)
            for unit, why in sorted(units.items()):
                entry = m.entries.pop(unit)
                if stage == "train":  # a checkpoint is its folder: a whole one found there is recorded again
                    folder = root.abs(unit)
                    if folder.is_dir():
                        shutil.rmtree(folder)
                    gone = [unit + "/"]
                else:
                    gone = []
                    for rel in entry.files:
                        p = root.abs(rel)
                        if p.exists():
                            p.unlink()
                            gone.append(rel)
                log(f"repair: {stage} {unit}: dropped ({'; '.join(why)}); deleted {', '.join(gone) or 'nothing'}; "
                    f"{REDO[stage]}")
            m.save(root)
    return {stage: sorted(units) for stage, units in by_stage.items()}
