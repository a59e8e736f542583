"""`make mutation`: mutmut over the modules whose tests are fast, and the hand-written breaks of the
integration-heavy ones, both listed in mutation.toml beside this file. Everything runs in a copy of the
repository (the working tree is never changed); what survived is printed, and the exit status is 1
when anything did.

    python tests/mutation/run.py                        # all of it
    python tests/mutation/run.py --only pipeline/urls.py --only "no budget admission for the pilot"
    python tests/mutation/run.py --breaks               # the hand-written breaks only
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import tomllib
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
CONFIG = Path(__file__).with_name("mutation.toml")
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "NO_ALBUMENTATIONS_UPDATE": "1", "WANDB_MODE": "disabled",
       "COLUMNS": "300"}  # pytest's summary lines keep the assertion that failed
STAGES = ["manifests", "pipeline", "captioning", "training"]  # installed as siclip.<name> (docs/design.md)
SKIP = shutil.ignore_patterns(".venv*", ".git", "data", "mutants", "__pycache__", "*.egg-info", ".pytest_cache")


def copy_repo(dst: Path, installed_layout: bool = False) -> Path:
    """A copy of the repository; `installed_layout`: with the four stage folders moved inside siclip/, as an install
    places them, so that a module's path is its import name (mutmut names mutants by path: siclip/pipeline/urls.py
    is siclip.pipeline.urls, which the tests import)."""
    shutil.copytree(REPO, dst, ignore=SKIP)
    if installed_layout:
        for name in STAGES:
            shutil.move(dst / name, dst / "siclip" / name)
    return dst


def toml_list(items) -> str:
    return "[" + ", ".join(json.dumps(str(x)) for x in items) + "]"


def run_mutmut(modules: list[str], tests: list[str], work: Path, children: int) -> list[str]:
    """mutmut 3 in `work`, configured in its copy of pyproject.toml; returns one block per survivor."""
    if not modules:
        return []
    with open(work / "pyproject.toml", "a") as f:
        f.write("\n[tool.mutmut]\n"
                'source_paths = ["siclip"]\n'  # all of siclip: the tests import across it
                'also_copy = ["demo", "bench"]\n'  # not siclip, but the tests import them (pyproject: pythonpath)
                f"only_mutate = {toml_list(m if m.startswith('siclip/') else 'siclip/' + m for m in modules)}\n"
                f"pytest_add_cli_args_test_selection = {toml_list(tests)}\n"
                'pytest_add_cli_args = ["-p", "no:cacheprovider", "-q"]\n')
    mutmut = [sys.executable, "-m", "mutmut"]
    print(f"mutation: mutmut over {len(modules)} module(s): {', '.join(modules)}", flush=True)
    subprocess.run([*mutmut, "run", "--max-children", str(children)], cwd=work, env=ENV, check=False)
    out = subprocess.run([*mutmut, "results"], cwd=work, env=ENV, capture_output=True, text=True).stdout
    survivors = []
    for line in out.splitlines():
        name, _, status = line.strip().rpartition(": ")
        if status == "survived":
            diff = subprocess.run([*mutmut, "show", name], cwd=work, env=ENV, capture_output=True, text=True).stdout
            survivors.append(f"{name}\n{diff.strip()}")
    return survivors


def pytest(tests: list[str], work: Path, timeout_s: float) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", "-rf", *tests],
                          cwd=work, env=ENV, capture_output=True, text=True, timeout=timeout_s)


def first_failure(res: subprocess.CompletedProcess) -> str:
    return next((line for line in res.stdout.splitlines() if line.startswith("FAILED ")), "")[:300]


def run_break(b: dict, work: Path) -> str:
    """'killed (the test that failed)', 'survived', or why the break could not be judged."""
    path = work / b["file"]
    text = path.read_text()
    if text.count(b["original"]) != 1:
        return f"stale: its original occurs {text.count(b['original'])} times in {b['file']}"
    path.write_text(text.replace(b["original"], b["replacement"]))
    try:
        res = pytest(b["tests"], work, b.get("timeout_s", 1800))
    except subprocess.TimeoutExpired:
        return "killed (the tests did not finish)"
    finally:
        path.write_text(text)
    if res.returncode == 1:
        return f"killed ({first_failure(res)})"
    if res.returncode == 0:
        return "survived"
    return f"error: pytest exited {res.returncode}: {res.stdout.strip().splitlines()[-1:] or res.stderr[-300:]}"


def baseline(breaks: list[dict], work: Path) -> str | None:
    """The breaks' tests must pass unbroken, or a failure under a break means nothing: why not, or None."""
    tests = sorted({t for b in breaks for t in b["tests"]})
    res = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rf", *tests], cwd=work,
                         env=ENV, capture_output=True, text=True)
    if res.returncode == 0:
        return None
    return f"the breaks' tests fail without any break: {first_failure(res)}\n{res.stdout[-6000:]}"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", action="append", default=[], help="a module or a break's name; repeatable")
    parser.add_argument("--breaks", action="store_true", help="the hand-written breaks only")
    parser.add_argument("--mutmut", action="store_true", help="mutmut only")
    parser.add_argument("--no-baseline", action="store_true",
                        help="skip the run of the breaks' tests without a break (they are known to pass)")
    parser.add_argument("--children", type=int, default=max(1, (os.cpu_count() or 2) // 2),
                        help="mutants tested at once")
    args = parser.parse_args(argv)
    cfg = tomllib.loads(CONFIG.read_text())
    modules = [m for m in cfg["mutmut"]["modules"] if not args.only or m in args.only]
    breaks = [b for b in cfg["break"] if not args.only or b["name"] in args.only]
    if args.breaks:
        modules = []
    if args.mutmut:
        breaks = []
    t0 = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="siclip-mutation-") as tmp:
        survivors = run_mutmut(modules, cfg["mutmut"]["tests"], copy_repo(Path(tmp) / "mutmut", installed_layout=True), args.children)
        work = copy_repo(Path(tmp) / "breaks")
        outcomes = []
        broken = baseline(breaks, work) if breaks and not args.no_baseline else None
        if broken:
            print(f"mutation: {broken}", flush=True)
            return 2
        for b in breaks:
            t = time.monotonic()
            outcome = run_break(b, work)
            outcomes.append((b["name"], outcome))
            print(f"mutation: break {b['name']!r}: {outcome} ({time.monotonic() - t:.0f} s)", flush=True)
    for block in survivors:
        print(f"\nmutation: survived (mutmut): {block}")
    left = [n for n, o in outcomes if not o.startswith("killed")]
    print(f"\nmutation: mutmut: {len(survivors)} mutant(s) survived in {len(modules)} module(s); hand-written breaks: "
          f"{len(outcomes) - len(left)}/{len(outcomes)} caught" + (f"; not caught: {'; '.join(left)}" if left else "")
          + f"; {time.monotonic() - t0:.0f} s")
    return 1 if survivors or left else 0


if __name__ == "__main__":
    sys.exit(main())
