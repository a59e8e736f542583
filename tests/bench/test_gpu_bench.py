"""bench/gpu.py, the GPU figures in one run, taking on a CPU the code paths it takes on a GPU (small): its rows,
FLOP counts, MFU and ratios are its own figures; a part that cannot run says why and the others go on. No test
needs a GPU."""

from __future__ import annotations

import importlib.util
import json

import pytest
import torch

from bench import gpu
from bench.days import _jpegs, flops_per_sample


def run(capsys, *argv) -> dict:
    assert gpu.main(["--device", "cpu", "--quick", *argv]) == 0
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def test_step_loader_and_levers_measure_on_a_cpu_and_every_ratio_is_made_of_the_run_s_own_figures(capsys):
    f = run(capsys, "--parts", "step,loader,levers", "--peak-tflops", "1")
    step, loader, levers, ratios = f["step"], f["loader"], f["levers"], f["ratios"]
    assert f["settings"]["config"] == "tiny" and f["peak_bf16_tflops"] == 1.0
    for row in ("siclip_recipe", "siclip_clip", "siclip_recipe_b16_micro4", "siclip_stage_b16_micro4"):
        assert step[row]["samples_per_s"] > 0 and step[row]["step_ms"] > 0, row
    # FLOPs: the recipe's row counts the web caption and the synthetic ones, as `bench days` counts the config
    assert step["siclip_recipe"]["gflop_per_sample"] == pytest.approx(flops_per_sample("tiny")["gflop_per_sample"],
                                                                       abs=0.006)
    assert step["siclip_clip"]["gflop_per_sample"] < step["siclip_recipe"]["gflop_per_sample"]
    for row in ("siclip_recipe", "siclip_clip"):  # MFU: samples/s x FLOPs per sample over the peak given
        r = step[row]
        assert r["mfu"] == pytest.approx(r["samples_per_s"] * r["gflop_per_sample"] * 1e9 / 1e12, rel=0.01, abs=1e-4)
    assert "mfu" not in step["siclip_recipe_b16_micro4"]  # gradient caching recomputes: not counted
    if importlib.util.find_spec("open_clip") is None:  # the main environment: the rows say why, and no ratio
        assert "open_clip" in step["open_clip"]["error"] and ratios["step_like_for_like"] is None
    # the loader, against the recipe step's consumption in the same run, on the bench's photo-like JPEGs
    w = loader["workers"]["2"]
    assert loader["step_consumption_samples_per_s"] == step["siclip_recipe"]["samples_per_s"]
    assert w["samples_per_s"] > 0 and w["of_step"] == round(w["samples_per_s"] / loader[
        "step_consumption_samples_per_s"], 2) == ratios["loader_of_step"]
    plain = loader["without_teacher_sidecars"]  # the join's cost: the same workers without the teacher sidecars
    assert plain["workers"] == 2 and plain["samples_per_s"] > 0
    assert plain["worker_ms_per_sample"] == round(1000 * 2 / plain["samples_per_s"], 2)
    jpegs = _jpegs(32, 64)
    assert loader["jpeg_kb"] == round(sum(map(len, jpegs)) / len(jpegs) / 1024, 1)
    assert loader["gpu_decode"] == {"skipped": "needs --device cuda"}
    # each lever alone against the baseline measured in the same run
    for name in ("unfused_adamw", "channels_last", "sdpa_math"):
        assert levers[name]["ratio"] == round(levers[name]["samples_per_s"] / levers["baseline"]["samples_per_s"], 3)
    assert "training needs the branches" in levers["reparameterise"]["not_applicable"]
    step_ms = levers["adamw_step_ms"]  # the optimizer step alone, the loop's fused kernel and torch's default
    assert step_ms["fused"] > 0 and step_ms["unfused"] > 0 and step_ms["tensors"] > 50


def test_a_spent_budget_skips_what_is_left_and_says_so(capsys):
    f = run(capsys, "--parts", "step,levers", "--budget-s", "0")
    assert all(r == {"skipped": "not measured: the part's 0 s budget was spent"} for r in f["step"].values())
    assert set(f["levers"]) >= {"baseline", "unfused_adamw"}
    assert f["levers"]["unfused_adamw"]["skipped"].startswith("not measured")
    assert f["ratios"]["step_recipe"] is None


def test_a_failure_is_one_line_under_its_name_and_the_run_goes_on():
    figures = {}
    with gpu.recorded(figures, "lever"):
        raise ValueError("no kernel for this mask\n  a long second line")
    with gpu.recorded(figures, "oom"):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
    assert figures["lever"] == {"error": "ValueError: no kernel for this mask"}
    assert figures["oom"]["out_of_memory"] is True


@pytest.mark.parametrize("name, peak", [("NVIDIA H100 80GB HBM3", 989.0), ("NVIDIA H100 PCIe", 756.0),
                                        ("NVIDIA H200", 989.0), ("NVIDIA GeForce RTX 4090", 165.0),
                                        ("NVIDIA GeForce RTX 3090", 71.0), ("Some Other Card", None)])
def test_the_peak_comes_from_the_card_s_name_or_the_flag(monkeypatch, name, peak):
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: name)
    s = gpu.Settings("cuda", True, "tiny", "x", 8, 4, 2, 1, (2,), None, None)
    got, source = gpu.peak_tflops(s)
    assert got == peak and (("--peak-tflops" in source) if peak is None else "data sheet" in source)
    assert gpu.peak_tflops(gpu.Settings("cuda", True, "tiny", "x", 8, 4, 2, 1, (2,), None, 123.0))[0] == 123.0


def test_a_lever_that_kills_its_process_or_hangs_costs_its_own_figure_only(tmp_path, monkeypatch):
    s = gpu.Settings("cpu", True, "tiny", "x", 8, 4, 1, 1, (2,), None, None)
    fake = tmp_path / "python"
    fake.write_text("#!/bin/sh\nprintf 'Fatal Python error: Segmentation fault\\n\\nThread 0x1 (most recent call "
                    "first):\\n  File \"torch/autograd/graph.py\", line 1072 in _engine_run_backward\\n"
                    "  File \"training/step.py\", line 78 in forward_backward\\n' >&2\nkill -SEGV $$\n")
    fake.chmod(0o755)
    monkeypatch.setattr(gpu.sys, "executable", str(fake))
    assert gpu.lever_in_child(s, "channels_last", timeout=60) == {
        "error": 'its process ended with signal 11 (File "torch/autograd/graph.py", line 1072 in '
                 '_engine_run_backward)'}
    fake.write_text("#!/bin/sh\nsleep 30\n")
    assert gpu.lever_in_child(s, "cuda_graphs", timeout=1) == {"error": "did not finish in 1 s"}


def test_an_unknown_part_is_refused_in_one_line(capsys):
    with pytest.raises(SystemExit):
        gpu.main(["--device", "cpu", "--parts", "step,speed"])
    assert "--parts: unknown speed" in capsys.readouterr().err


@pytest.mark.mobileclip
def test_open_clip_train_s_own_step_is_the_baseline_and_the_ratios_divide_the_two(capsys):
    f = run(capsys, "--parts", "step")
    step, ratios = f["step"], f["ratios"]
    assert f["settings"]["open_clip_model"] == gpu.OPEN_CLIP_CPU_MODEL
    for row in ("open_clip", "open_clip_b4_accum4"):
        assert step[row]["samples_per_s"] > 0 and step[row]["gflop_per_sample"] > 0
    assert ratios["step_like_for_like"] == round(step["siclip_clip"]["samples_per_s"] /
                                                 step["open_clip"]["samples_per_s"], 3)
    assert ratios["step_recipe"] == round(step["siclip_recipe"]["samples_per_s"] /
                                          step["open_clip"]["samples_per_s"], 3)
    assert ratios["step_caching_against_accum"] == round(step["siclip_recipe_b16_micro4"]["samples_per_s"] /
                                                         step["open_clip_b4_accum4"]["samples_per_s"], 3)
