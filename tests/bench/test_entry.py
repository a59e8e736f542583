"""`python -m bench NAME`: one entry for every benchmark, each ending with one record of one shape; the installed
`siclip bench` says in one line where they are."""

from __future__ import annotations

import importlib.util
import io
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from bench.__main__ import BENCHES, _JsonLines, record
from siclip.cli import main as siclip_main

REPO = Path(__file__).resolve().parents[2]


def test_a_bench_ends_with_its_name_baseline_ratio_and_figures_on_one_line():
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    res = subprocess.run([sys.executable, "-m", "bench", "blocks", "--quick", "--cases", "tiny_text", "--threads", "1",
                          "--json"], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-2000:]
    line, = res.stdout.strip().splitlines()
    out = json.loads(line)
    assert set(out) == {"bench", "baseline", "ratio", "figures"}
    assert out["bench"] == "blocks" and out["baseline"] == BENCHES["blocks"].baseline
    case = out["figures"]["cases"]["tiny_text"]
    assert out["ratio"] == {"tiny_text": case["train_step_speedup"]} and case["param_ratio"] < 1
    assert "tiny_text" in res.stderr  # its table, as before


def test_a_script_bench_keeps_its_lines_and_its_json_line_becomes_the_figures():
    out = io.StringIO()
    held = _JsonLines(out)
    held.write("| row | top-1 |\n| a | 1.0 |\n{\"ratios\": {\"emoji\": {\"samples_per_s\": 1.1}}")
    held.write(", \"runs\": []}\n[1, 2]\nno newline at the end")
    held.close_partial()
    assert out.getvalue() == "| row | top-1 |\n| a | 1.0 |\n[1, 2]\nno newline at the end\n"
    assert held.objects == [{"ratios": {"emoji": {"samples_per_s": 1.1}}, "runs": []}]
    assert record("peer", held.objects[0])["ratio"] == {"emoji": {"samples_per_s": 1.1}}


@pytest.mark.parametrize("name, figures, ratio", [
    ("shards", {"ratio": 1.02, "images": 300}, 1.02),
    ("coca", {"skipped": "open_clip does not import (ImportError)"}, None),
    ("fit", {"models": {"tiny": {"loss100": 2.1}}}, None),  # no open_clip in the run: nothing to divide by
    ("fit", {"models": {"tiny": {"loss100_ratio_to_open_clip": 0.9}, "open_clip": {"loss100_ratio_to_open_clip": 1}}},
     {"tiny": 0.9, "open_clip": 1}),
])
def test_each_bench_names_its_ratio(name, figures, ratio):
    assert record(name, figures) == {"bench": name, "baseline": BENCHES[name].baseline, "ratio": ratio,
                                     "figures": figures}


def test_siclip_bench_says_in_one_line_where_the_benchmarks_are(capsys):
    assert siclip_main(["bench", "shards", "--quick"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "python -m bench NAME" in err and err.startswith("siclip bench: error: ")


@pytest.mark.skipif(shutil.which("make") is None, reason="needs GNU make")
def test_the_make_targets_run_the_entries_from_the_checkout():
    targets = ["demo", "bench", "bench-real", "bench-peer", "bench-fit", "bench-gpu", "ablations"]
    out = subprocess.run(["make", "-n", "-s", "-C", str(REPO), "-o", "install", "-o", "install-mobileclip", *targets],
                         capture_output=True, text=True, check=True).stdout
    modules = set(re.findall(r"python -m ([\w.]+)", out))
    assert modules == {"demo", "demo.fit", "bench"}
    assert all(importlib.util.find_spec(m).origin.startswith(str(REPO)) for m in modules)
    names = re.findall(r"python -m bench (\w+)", out)
    assert names == ["all", "real", "peer", "fit", "gpu", "ablations"] and set(names) <= {*BENCHES, "all"}
