"""`siclip manifest DATA`: storage accounting per stage against the budget, and `--verify`."""

from __future__ import annotations

from manifests.layout import STAGES, DataRoot
from manifests.manifest import StageManifest, check_file
from manifests.storage import StorageBudget, format_size


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


def verify(root: DataRoot, progress=None) -> list[str]:
    """Re-hash every file every manifest lists; return one line per missing or corrupt file."""
    problems = []
    for s in STAGES:
        m = StageManifest.load(root, s)
        for rel, rec in m.files():
            bad = check_file(root, rel, rec, rehash=True)
            if progress:
                progress(rel)
            if bad:
                problems.append(f"{s}: {root.root / rel}: {bad}")
    return problems
