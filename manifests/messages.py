"""How every stage talks to the user: one log line on stderr, an exception as one line. The bottom layer holds
them because the data root's contract reports through them too."""

from __future__ import annotations

import sys


def log(msg: str) -> None:
    """One line of progress or summary on stderr, flushed at once (stdout is kept for results)."""
    print(msg, file=sys.stderr, flush=True)


def first_line(e: BaseException) -> str:
    """The first line of an exception's message, or its type's name when it has none."""
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def one_line(e: BaseException) -> str:
    """An exception as 'Type: first line of its message' (the type alone when it has no message)."""
    text = str(e).strip()
    return f"{type(e).__name__}: {text.splitlines()[0]}" if text else type(e).__name__
