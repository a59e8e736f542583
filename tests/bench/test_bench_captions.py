"""`python -m bench captions --quick`: its figures are those of the sidecars and timings it produced."""

from __future__ import annotations

import pytest

from bench.captions import GEN, bench_captions
from siclip.manifests.layout import DataRoot
from siclip.manifests.manifest import StageManifest
from siclip.manifests.samples import read_sidecar


def test_quick_bench_figures_are_those_of_the_sidecars_it_wrote(tmp_path):
    res = bench_captions(quick=True, work_dir=tmp_path)
    tiny = res["tiny"]
    assert res["model"] == "tiny" and res["images_per_s"] == tiny["images_per_s"]

    # bytes per caption: the files on disk over the captions they hold, counted by reading them
    root = DataRoot(tmp_path / "tiny" / "data")
    sidecars = sorted(root.captions.glob("*.arrow"))
    rows = [(r["captions"], r["status"]) for p in sidecars for r in read_sidecar(p)[0].to_pylist()]
    assert len(rows) == tiny["images"] and all(status == "ok" for _, status in rows)
    n_captions = sum(len(caps) for caps, _ in rows)
    assert n_captions == tiny["images"] * GEN["num_captions"]
    on_disk = sum(p.stat().st_size for p in sidecars)
    assert tiny["sidecar_bytes"] == on_disk
    assert res["bytes_per_caption"] == pytest.approx(on_disk / n_captions)

    # the steady rate spans the shard tasks, so it cannot beat the images over the longest single task
    timings = [e.timing for e in StageManifest.load(root, "captions").entries.values()]
    assert len(timings) == len(sidecars) >= 2
    longest = max(t.seconds for t in timings)
    assert tiny["images_per_s"] <= tiny["images"] / (longest - 0.002)
    # start-up (cluster, model loading) is outside the steady rate and inside the end-to-end one
    assert tiny["end_to_end_images_per_s"] < tiny["images_per_s"]
    # the ratio is siclip's rate over the baseline's, not the other way round
    assert tiny["pipeline_images_per_s"] > 0 and tiny["pipeline_threads"] >= 1
    assert res["ratio"] == pytest.approx(tiny["images_per_s"] / tiny["pipeline_images_per_s"])
