"""Watching a running `siclip shards` job from outside, as an operator would: its download
processes (from /proc), the shard tars they hold open, and whether the job exits by itself."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from siclip_testing import REPO


def start_job(args, log: Path) -> subprocess.Popen:
    """Start the real CLI in its own session (so a test can always clean up the whole group),
    stderr to `log` (a pipe nobody reads could fill up and stall the job)."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "PYTHONUNBUFFERED": "1"}
    with open(log, "wb") as f:
        return subprocess.Popen([sys.executable, "-m", "siclip.cli", *map(str, args)], cwd=REPO, env=env,
                                stdout=subprocess.DEVNULL, stderr=f, start_new_session=True)


def tail(log: Path, n: int = 15) -> str:
    return "\n".join(Path(log).read_text(errors="replace").splitlines()[-n:])


def kill_group(job: subprocess.Popen) -> None:
    """SIGKILL whatever is left of a job this test started (its session), then reap it."""
    try:
        os.killpg(job.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    job.wait()


def wait_exit(job: subprocess.Popen, log: Path, deadline_s: float) -> int:
    """The job's exit status; fails (after killing it) when it has not exited by itself in time."""
    try:
        return job.wait(timeout=deadline_s)
    except subprocess.TimeoutExpired:
        kill_group(job)
        raise AssertionError(f"the job did not exit by itself within {deadline_s:.0f} s; last lines:\n{tail(log)}") from None


def wait_for(cond, job: subprocess.Popen, log: Path, what: str, timeout: float = 90):
    """Poll `cond()` until it returns something truthy; fail at once when the job exits first."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        got = cond()
        if got:
            return got
        if job.poll() is not None:
            raise AssertionError(f"the job exited ({job.returncode}) before {what}; last lines:\n{tail(log)}")
        time.sleep(0.1)
    kill_group(job)
    raise AssertionError(f"{what} did not happen within {timeout:.0f} s; last lines:\n{tail(log)}")


def _children(pid: int) -> list[int]:
    out = []
    try:
        for task in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{task}/children") as f:
                out += [int(c) for c in f.read().split()]
    except OSError:
        pass
    return out


def worker_pids(job_pid: int) -> list[int]:
    """The job's download processes: its children started by multiprocessing's spawn."""
    out = []
    for pid in _children(job_pid):
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            continue
        if b"spawn_main" in cmd:
            out.append(pid)
    return out


def descendants(pid: int) -> list[int]:
    """Every process below `pid`: its children, theirs, and so on."""
    out = []
    for child in _children(pid):
        out += [child] + descendants(child)
    return out


def open_files(pid: int) -> list[Path]:
    """The files process `pid` holds open (none once it is gone)."""
    out = []
    try:
        fds = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return out
    for fd in fds:
        try:
            out.append(Path(os.readlink(f"/proc/{pid}/fd/{fd}")))
        except OSError:
            continue
    return out


def open_tars(pid: int, folder: Path) -> list[str]:
    """Names of the shards (e.g. '00003') whose tar in `folder` process `pid` has open for writing."""
    return [p.stem for p in open_files(pid) if p.parent == folder and p.suffix == ".tar"]


def workers_writing(job_pid: int, folder: Path) -> dict[int, str]:
    """{pid: shard} of the job's download processes that are writing a shard's tar in `folder`."""
    return {pid: tars[0] for pid in worker_pids(job_pid) if (tars := open_tars(pid, folder))}


def alive(pid: int) -> bool:
    """Running (a zombie, dead and waiting to be reaped, is not)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] not in ("Z", "X")


def folder_state(folder: Path) -> dict[str, int]:
    """{file name: size} of a folder (empty when it does not exist)."""
    out = {}
    if folder.is_dir():
        for p in folder.iterdir():
            try:
                out[p.name] = p.stat().st_size
            except FileNotFoundError:
                pass
    return out
