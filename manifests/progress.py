"""Progress lines for long jobs: count, rate, ETA, plus whatever the stage adds (budget, MB/s)."""

from __future__ import annotations

import os
import sys
import time

from siclip.manifests.errors import SiclipError

# Seconds between progress lines, on a terminal and in a log alike: overrides each job's own interval
# (a long job logged to a file may want fewer lines; a test wants them at once).
EVERY_ENV = "SICLIP_PROGRESS_S"


def format_duration(seconds: float) -> str:
    s = int(max(0, seconds))
    if s >= 3600:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    if s >= 60:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s}s"


def every_s_from_env() -> float | None:
    """The interval $SICLIP_PROGRESS_S sets, or None when it is unset."""
    value = os.environ.get(EVERY_ENV, "").strip()
    if not value:
        return None
    try:
        seconds = float(value)
    except ValueError:
        seconds = float("nan")
    if not seconds >= 0:
        raise SiclipError(f"{EVERY_ENV}={value!r} is not a number of seconds (0 or more)")
    return seconds


class Progress:
    """Prints `label done/total (pct) | rate | ETA | extra` at most every `every_s` seconds (5 at least in a
    log; $SICLIP_PROGRESS_S overrides both), on one rewritten line on a terminal and as plain lines otherwise."""

    def __init__(self, label: str, total: int, unit: str = "samples", every_s: float = 2.0, stream=None):
        self.label, self.total, self.unit = label, total, unit
        self.stream = stream or sys.stderr
        self.start = self.last = time.monotonic()
        self.tty = getattr(self.stream, "isatty", lambda: False)()
        override = every_s_from_env()
        if override is not None:
            self.every_s = override
        else:  # a log keeps every line, a terminal rewrites one
            self.every_s = every_s if self.tty else max(every_s, 5.0)
        self.done = 0

    def due(self) -> bool:
        """Whether the next update would print (lets a caller skip computing its extra text)."""
        return time.monotonic() - self.last >= self.every_s

    def update(self, done: float, extra: str = "", force: bool = False) -> None:
        self.done = done
        if not force and not self.due():
            return
        self.last = time.monotonic()
        print(("\r" if self.tty else "") + self.line(extra), end="" if self.tty else "\n", file=self.stream, flush=True)

    def line(self, extra: str = "") -> str:
        elapsed = max(time.monotonic() - self.start, 1e-9)
        rate = self.done / elapsed
        eta = (self.total - self.done) / rate if rate > 0 and self.total else float("nan")
        pct = f" ({100 * self.done / self.total:.0f}%)" if self.total else ""
        parts = [f"{self.label}: {int(self.done):,}/{self.total:,} {self.unit}{pct}", f"{rate:,.1f} {self.unit}/s",
                 f"ETA {format_duration(eta) if eta == eta else '?'}"]
        return " | ".join(parts + ([extra] if extra else []))

    def close(self) -> None:
        if self.tty:
            print(file=self.stream)

    @property
    def elapsed(self) -> float:
        return time.monotonic() - self.start
