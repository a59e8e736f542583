"""A training run's folder under the data root, its checkpoints, metrics and plots.

```
DATA/runs/<name>/
  config.toml, config.json       the resolved training config (TOML to read, JSON to compare on resume); written
                                 once every check has passed, and replaced when the run never logged a step
  data.json                      training and held-out shards, the epoch plan
  inherit_report.json            what inherit_weights copied, sliced or left fresh
  metrics.jsonl                  one line per logged step (loss terms, lr, temperature, samples/s, memory) and per eval
  tracking/                      with report_to: TensorBoard's event files, the run's wandb id (training/tracking.py)
  plots/*.png                    weighted loss terms, learning rate and temperature, recall (training/plots.py)
  checkpoints/step-000100/       model (config.json, model.safetensors), preprocess.json, accelerate/ (save_state:
                                 optimizer, RNG, scaler, the loss terms' parameters), state.json (written last)
  final/                         the model at the end of the schedule
```
A checkpoint is written into `.tmp-step-N/` and renamed when whole; it is recorded in the
`train` manifest (bytes, sha256) and counts against the storage budget, which it never passes.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from siclip.manifests.errors import SiclipError
from siclip.manifests.io import atomic_write_bytes, failpoint, fsync_dir
from siclip.manifests.layout import DataRoot
from siclip.manifests.manifest import StageManifest
from siclip.manifests.storage import StorageBudget, format_size
from siclip.teachers import CHECKPOINT, FINAL, STATE  # the run layout



def checkpoint_name(step: int) -> str:
    return f"step-{step:06d}"


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def fsync_tree(folder: Path) -> None:
    """Flush every file and folder under `folder`, so a rename that follows publishes whole files."""
    for p in sorted(folder.rglob("*"), reverse=True):
        if p.is_file():
            with open(p, "rb") as f:
                os.fsync(f.fileno())
        else:
            fsync_dir(p)
    fsync_dir(folder)


def run_folder(run: str, data: str | None = None) -> Path:
    """The folder `--run` names: a run name under DATA/runs/ when --data is given and it has one, else a path.
    The data root's run wins, so that `--run demo` from a checkout is not its `demo/` code folder."""
    named = Path(data) / "runs" / run if data else None
    path = named if named is not None and named.is_dir() else Path(run)
    if not path.is_dir():
        raise SiclipError(f"--run {run}: no such run folder" + ("" if data else " (pass --data DATA to find it by name)"))
    return path


@dataclass
class Run:
    """The folder of one run, inside the data root so its checkpoints count against the budget."""

    root: DataRoot
    path: Path
    on_record: Callable[[dict], None] | None = None  # also called with each record metrics.jsonl gets (the trackers)

    @classmethod
    def at(cls, root: DataRoot, out: str | Path) -> "Run":
        """`out` is a name (DATA/runs/NAME) or a path inside the data root."""
        out = Path(out)
        path = out.absolute() if (out.is_absolute() or len(out.parts) > 1) else root.runs / out
        try:
            root.inside(path)
        except SiclipError:
            raise SiclipError(f"--out {out}: a run lives inside its data root ({root.runs}/NAME), so its "
                              f"checkpoints count against the storage budget") from None
        return cls(root, path)

    @property
    def name(self) -> str:
        return self.root.rel(self.path)

    @property
    def checkpoints_dir(self) -> Path:
        return self.path / "checkpoints"

    @property
    def metrics_path(self) -> Path:
        return self.path / "metrics.jsonl"

    def started(self) -> bool:
        """Whether the run trained at all: a whole checkpoint, a final model, or a line of metrics."""
        return bool(self.checkpoints()) or (self.path / FINAL / STATE).is_file() or (
            self.metrics_path.is_file() and self.metrics_path.stat().st_size > 0)

    def clear_failed_start(self) -> None:
        """Remove what a start that failed before its first step left (config, data plan, inheritance report,
        empty logs), so that a corrected config starts afresh."""
        for name in ("config.toml", "config.json", "data.json", "inherit_report.json", "metrics.jsonl"):
            (self.path / name).unlink(missing_ok=True)
        for path in self.path.glob("keys-rank*.jsonl"):
            path.unlink()

    def checkpoints(self) -> list[tuple[int, Path]]:
        """Whole checkpoints (state.json written), by step."""
        if not self.checkpoints_dir.is_dir():
            return []
        found = [(int(m.group(1)), p) for p in self.checkpoints_dir.iterdir()
                 if (m := CHECKPOINT.match(p.name)) and (p / STATE).is_file()]
        return sorted(found)

    def latest(self) -> tuple[int, Path] | None:
        found = self.checkpoints()
        return found[-1] if found else None

    def unit(self, folder: Path) -> str:
        return self.root.rel(folder)

    # -- bringing the folder and the manifest into agreement after a crash

    def reconcile(self, log=print) -> None:
        """Drop half-written checkpoints, record whole ones a kill left unrecorded, forget removed ones."""
        manifest = StageManifest.load(self.root, "train")
        changed = False
        if self.checkpoints_dir.is_dir():
            for p in sorted(self.checkpoints_dir.iterdir()):
                if p.name.startswith(".tmp-") or (CHECKPOINT.match(p.name) and not (p / STATE).is_file()):
                    shutil.rmtree(self.root.inside(p))
                    log(f"train: removed {p.name}, a checkpoint an interrupted run did not finish")
        for folder in [p for _, p in self.checkpoints()] + ([self.path / FINAL] if (self.path / FINAL / STATE).is_file() else []):
            unit = self.unit(self.root.inside(folder))  # a link out is neither hashed nor recorded
            if unit not in manifest.entries or not manifest.entry_ok(self.root, unit):
                manifest.add(self.root, unit, sorted(p for p in folder.rglob("*") if p.is_file()), samples=0,
                             kind="checkpoint" if folder.name != FINAL else "final")
                log(f"train: recorded {unit} in {self.root.manifest_path('train')}")
                changed = True
        prefix = self.name + "/"
        for unit in [u for u in manifest.entries if u.startswith(prefix)]:
            if not (self.root.abs(unit) / STATE).is_file():
                del manifest.entries[unit]
                changed = True
        if changed:
            manifest.save(self.root)

    # -- checkpoints

    def _to_drop(self, keep: int) -> list[tuple[int, Path]]:
        """The oldest checkpoints to remove so that one more leaves `keep`; never the newest."""
        found = self.checkpoints()
        return found[:max(0, min(len(found) + 1 - keep, len(found) - 1))]

    def room_for(self, step: int, estimate: int, keep: int) -> str | None:
        """None when a checkpoint of about `estimate` bytes fits the budget (after dropping what `keep`
        lets go), else the message that refuses it."""
        budget = StorageBudget.load(self.root)
        if not budget.budget_bytes:
            return None
        freed = sum(folder_bytes(p) for _, p in self._to_drop(keep))
        left = budget.remaining_bytes + freed
        if estimate <= left:
            return None
        latest = self.latest()
        resume = f"the run can resume from {latest[1].name}" if latest else "no checkpoint was kept: rerun"
        return (f"stopped at the budget: checkpoint {checkpoint_name(step)} needs about {format_size(estimate)} "
                f"but only {format_size(left)} of the {format_size(budget.budget_bytes)} budget is left; {resume} "
                f"once space is freed or the budget raised ('siclip manifest {self.root.root}' shows what is used)")

    def drop_old(self, keep: int, after_write: bool = False) -> None:
        """Before a write: remove the oldest checkpoints so that one more leaves `keep` (never the newest).
        After it: remove all but the newest `keep`."""
        found = self.checkpoints()
        extra = found[:max(0, len(found) - keep)] if after_write else self._to_drop(keep)
        if not extra:
            return
        folders = [self.root.inside(folder) for _, folder in extra]  # all checked before any is forgotten
        manifest = StageManifest.load(self.root, "train")
        for folder in folders:
            manifest.entries.pop(self.unit(folder), None)
        manifest.save(self.root)  # forget first: a file listed but gone would read as damage
        for folder in folders:
            shutil.rmtree(folder)

    def publish(self, tmp: Path, final: Path, state: dict, kind: str | None = None) -> Path:
        """Write state.json last, flush, rename `tmp` to `final` and record it in the train manifest
        (as `kind`: checkpoint, final, or export)."""
        failpoint(f"before-state:{final.name}")
        atomic_write_bytes(tmp / STATE, (json.dumps(state, indent=1) + "\n").encode())
        fsync_tree(tmp)
        if final.exists():
            shutil.rmtree(self.root.inside(final))
        os.replace(tmp, final)
        fsync_dir(final.parent)
        failpoint(f"renamed:{final.name}")
        manifest = StageManifest.load(self.root, "train")
        manifest.add(self.root, self.unit(final), sorted(p for p in final.rglob("*") if p.is_file()), samples=0,
                     step=state["step"], kind=kind or ("final" if final.name == FINAL else "checkpoint"))
        manifest.save(self.root)
        return final

    # -- metrics

    def append_metrics(self, record: dict) -> None:
        with open(self.metrics_path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self.on_record is not None:
            self.on_record(record)
        failpoint(f"logged:{checkpoint_name(record['step'])}")  # a kill past the last checkpoint

    def read_metrics(self) -> list[dict]:
        if not self.metrics_path.is_file():
            return []
        out = []
        for line in self.metrics_path.read_text().splitlines():
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:  # a line a kill cut short
                pass
        return out

    def stages(self) -> list[dict]:
        """Each stage's name, steps [start, end) and loss weights, from data.json and config.json ([] before both)."""
        data, config = self.path / "data.json", self.path / "config.json"
        if not (data.is_file() and config.is_file()):
            return []
        weights = {s["name"]: s["loss"] for s in json.loads(config.read_text())["stages"]}
        return [s | {"loss": weights.get(s["name"], {})} for s in json.loads(data.read_text())["stages"]]

    def truncate_metrics(self, step: int, path: Path | None = None) -> None:
        """Keep the lines up to `step` (a resumed run writes the later ones again)."""
        path = path or self.metrics_path
        if not path.is_file():
            return
        kept = []
        for line in path.read_text().splitlines():
            try:
                if json.loads(line).get("step", 0) <= step:
                    kept.append(line)
            except json.JSONDecodeError:
                pass
        atomic_write_bytes(path, ("\n".join(kept) + "\n" if kept else "").encode())


def write_plots(run: Run) -> list[Path]:
    """RUN/plots/*.png from the run's metrics and stages (drawn by training/plots.py; matplotlib loads only here)."""
    from siclip.training.plots import save_plots

    return save_plots(run.path / "plots", run.read_metrics(), run.stages(), run.name)
