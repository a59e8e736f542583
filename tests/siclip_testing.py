"""Helpers the suites share: writing a URL list and running the real `siclip` CLI in a subprocess."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def write_list(path: Path, rows) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"url": pa.array([r[0] for r in rows], pa.string()),
                             "caption": pa.array([r[1] for r in rows], pa.string())}), path)
    return path


def siclip(*args, check=True, timeout=300, env=None, **popen) -> subprocess.CompletedProcess:
    """Run the real `siclip` CLI in a subprocess, as a user would (`env`: the environment, default os.environ)."""
    env = {**(env or os.environ), "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""),
           "PYTHONUNBUFFERED": "1"}
    res = subprocess.run([sys.executable, "-m", "manifests.cli", *map(str, args)], capture_output=True, text=True,
                         timeout=timeout, env=env, cwd=REPO, **popen)
    if check and res.returncode != 0:
        raise AssertionError(f"siclip {' '.join(map(str, args))} exited {res.returncode}:\n{res.stderr[-3000:]}")
    return res


SMALL = ["--image-size", "64", "--samples-per-shard", "8", "--processes", "2", "--threads", "8",
         "--budget", "1GB", "--reserve", "0%", "--set", "timeout=2"]
