"""Storage accounting: one budget for everything under a data root, used bytes from the manifests."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

from siclip.manifests.errors import SiclipError
from siclip.manifests.io import atomic_write_json
from siclip.manifests.layout import STAGES, DataRoot
from siclip.manifests.manifest import StageManifest, read_json_or_fail

_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12, "PB": 10**15,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def parse_size(text: str | int | float) -> int:
    """'1TB' -> 10**12, '1.5 GiB' -> bytes, 12345 -> 12345."""
    if isinstance(text, (int, float)):
        return int(text)
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([A-Za-z]*)\s*", str(text))
    if not m or m.group(2).upper() not in _UNITS:
        raise SiclipError(f"cannot read size {text!r}: use a number with a unit such as 500GB, 1TB or 2TiB")
    return int(float(m.group(1)) * _UNITS[m.group(2).upper()])


def format_size(n: float) -> str:
    """Decimal units, three significant figures: 356 GB, 28.7 KB."""
    for unit in ("B", "KB", "MB", "GB", "TB", "PB"):
        if abs(n) < 1000 or unit == "PB":
            return f"{n:.0f} {unit}" if unit == "B" or abs(n) >= 100 else f"{n:.3g} {unit}"
        n /= 1000
    raise AssertionError


def parse_reserve(text: str | int | float, budget: int) -> int:
    """A reserve is a fraction of the budget ('40%') or a size ('400GB')."""
    s = str(text).strip()
    if s.endswith("%"):
        try:
            frac = float(s[:-1]) / 100
        except ValueError:
            raise SiclipError(f"cannot read reserve {text!r}: use a percentage such as 40% or a size") from None
        if not 0 <= frac < 1:
            raise SiclipError(f"reserve {text!r} must be between 0% and 100%")
        return int(budget * frac)
    return parse_size(s)


@dataclass
class StorageBudget:
    """The budget of a data root and what each stage's manifest says it used."""

    budget_bytes: int
    reserve_bytes: int = 0
    used_by_stage: dict[str, int] = field(default_factory=dict)

    @property
    def used_bytes(self) -> int:
        return sum(self.used_by_stage.values())

    @property
    def remaining_bytes(self) -> int:
        return self.budget_bytes - self.used_bytes

    @classmethod
    def load(cls, root: DataRoot) -> "StorageBudget":
        """Budget from storage.json (0 = none set yet), usage from the stage manifests."""
        info = read_storage(root)
        used = {s: StageManifest.load(root, s).total_bytes for s in STAGES}
        return cls(int(info.get("budget_bytes", 0)), int(info.get("reserve_bytes", 0)), used)


def read_storage(root: DataRoot) -> dict:
    path = root.manifests / "storage.json"
    return read_json_or_fail(path) if path.exists() else {}


def write_storage(root: DataRoot, **updates) -> dict:
    """Merge `updates` into storage.json (budget, reserve, plans) atomically."""
    info = read_storage(root)
    info.update(updates)
    atomic_write_json(root.manifests / "storage.json", info)
    return info


def disk_free_bytes(path: Path) -> int:
    import shutil

    p = Path(path).absolute()
    while not p.exists():
        p = p.parent
    return shutil.disk_usage(p).free
