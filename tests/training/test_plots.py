"""A run's plots show what it did, read back through their data: loss.png the terms as they enter the loss (a
2000-weighted fd is not a flat line at 0), on a log scale, with the stages marked and named; eval.png recall
only (not `samples` or chance), i2t and t2i paired, one evaluation visible, a zero-shot panel when there is one;
and the PNGs on disk decode to pictures, not blanks. A real two-stage `siclip train` run, and hand-written
records for the edge cases."""

from __future__ import annotations

import json

import numpy as np
import pytest

from siclip.manifests.layout import DataRoot
from siclip.training.plots import eval_figure, loss_figure
from siclip.training.runs import Run
from siclip_testing import siclip
from train_helpers import make_root

SMALL_MODEL = ['image.image_size=16', 'image.patch_size=8', 'image.width=32', 'image.depth=2', 'image.heads=2',
               'image.share_attention=[[1, 2]]', 'text.width=32', 'text.depth=2', 'text.heads=2',
               'text.share_attention=[[1, 2]]', 'text.context_length=16', 'embed_dim=16']
TWO_STAGES = f"""model_set = {json.dumps(SMALL_MODEL)}
batch_size = 8
workers = 0
synthetic_captions = 0
val_shards = 1
eval_every = 2
[[stages]]
name = "clip"
steps = 3
[stages.loss]
clip_web = 1.0
clip_synthetic = 0.0
pm = 0.1
[[stages]]
name = "distil"
steps = 3
teacher = "sidecar"
[stages.loss]
clip_web = 1.0
clip_synthetic = 0.0
fd = 2000.0
"""


@pytest.fixture(scope="module")
def two_stage_run(tmp_path_factory) -> Run:
    """A real run: 3 steps of CLIP + PM, then 3 distilling a teacher sidecar with fd weighted 2000, eval every 2."""
    folder = tmp_path_factory.mktemp("plots")
    root = make_root(folder / "data", [16, 16, 8], teacher_views=0)
    (folder / "c.toml").write_text(TWO_STAGES)
    siclip("train", "--data", root.root, "--config", folder / "c.toml", "--out", "two")
    return Run.at(DataRoot(root.root), "two")


def lines(ax) -> dict:
    return {line.get_label(): line for line in ax.get_lines() if not line.get_label().startswith("_")}


def vertical_lines(ax) -> list[float]:
    """x of the lines that span the axes' height (axvline)."""
    return [line.get_xdata()[0] for line in ax.get_lines() if list(line.get_ydata()) == [0, 1]]


def texts(ax) -> list[str]:
    return [t.get_text().strip() for t in ax.texts]


def step(n: int, stage: str, **terms) -> dict:
    return {"step": n, "stage": stage, "loss": sum(terms.values()), "terms": terms, "lr": 1e-3, "temperature": 10.0}


def recall(n: int, r1: float, samples: int = 200) -> dict:
    ev = {"i2t_r1": r1, "i2t_r5": 2 * r1, "i2t_r10": 3 * r1, "t2i_r1": r1, "t2i_r5": 2 * r1, "t2i_r10": 3 * r1}
    return {"step": n, "eval": ev | {"samples": samples, "chance_r1": 1 / samples}}


def test_the_loss_plot_of_a_real_run_shows_each_term_as_it_enters_the_loss_with_its_stages(two_stage_run):
    records, stages = two_stage_run.read_metrics(), two_stage_run.stages()
    assert [(s["name"], s["start"], s["end"], s["loss"]["fd"]) for s in stages] == [("clip", 0, 3, 0.0),
                                                                                    ("distil", 3, 6, 2000.0)]
    ax = loss_figure(records, stages, "two").axes[0]
    drawn = lines(ax)
    assert set(drawn) == {"total", "1 × clip_web", "0.1 × pm", "2000 × fd"}
    logged = [r for r in records if "loss" in r]
    fd = [r["terms"]["fd"] for r in logged if "fd" in r.get("terms", {})]
    assert list(drawn["2000 × fd"].get_xdata()) == [4, 5, 6]
    assert list(drawn["2000 × fd"].get_ydata()) == pytest.approx([2000 * v for v in fd])
    assert list(drawn["0.1 × pm"].get_ydata()) == pytest.approx([0.1 * r["terms"]["pm"] for r in logged[:3]])
    # the weighted terms add up to the total the loop logged
    for r in logged:
        weights = stages[0]["loss"] if r["stage"] == "clip" else stages[1]["loss"]
        assert sum(weights[k] * v for k, v in r["terms"].items()) == pytest.approx(r["loss"], rel=1e-5)
    assert ax.get_yscale() == "log"
    assert vertical_lines(ax) == [3]
    assert texts(ax) == ["clip", "distil"]


def test_the_eval_plot_of_a_real_run_draws_paired_recall_curves_only(two_stage_run):
    records = two_stage_run.read_metrics()
    fig = eval_figure(records, two_stage_run.stages(), "two")
    assert len(fig.axes) == 1  # no zero-shot figures in a training run's metrics
    ax = fig.axes[0]
    drawn = lines(ax)
    assert set(drawn) == {f"{way} R@{k}" for way in ("i2t", "t2i") for k in (1, 5, 10)}
    evals = [r for r in records if "eval" in r]
    assert [r["step"] for r in evals] == [2, 4, 6]
    assert list(drawn["t2i R@5"].get_ydata()) == pytest.approx([r["eval"]["t2i_r5"] for r in evals])
    for k in (1, 5, 10):
        i2t, t2i = drawn[f"i2t R@{k}"], drawn[f"t2i R@{k}"]
        assert i2t.get_color() == t2i.get_color()
        assert (i2t.get_linestyle(), t2i.get_linestyle()) == ("-", "--")
    assert len({drawn[f"i2t R@{k}"].get_color() for k in (1, 5, 10)}) == 3
    low, high = ax.get_ylim()
    assert low == 0 and max(r["eval"]["i2t_r10"] for r in evals) <= high <= 1.05  # recall's range, not samples'
    assert vertical_lines(ax) == [3] and texts(ax) == ["clip", "distil"]


def test_the_run_writes_pngs_that_decode_to_pictures(two_stage_run):
    from PIL import Image

    folder = two_stage_run.path / "plots"
    assert {p.name for p in folder.iterdir()} == {"loss.png", "lr.png", "eval.png"}
    for name in ("loss.png", "lr.png", "eval.png"):
        with Image.open(folder / name) as im:
            pixels = np.asarray(im.convert("RGB"))
        assert pixels.shape[0] >= 300 and pixels.shape[1] >= 600, name
        # mostly white background, with dark text and coloured lines on it
        colours = {tuple(p) for p in pixels.reshape(-1, 3)[::7]}
        assert len(colours) > 50, name
        assert 0.5 < (pixels.min(axis=2) > 240).mean() < 0.99, name


def test_one_evaluation_is_a_visible_point_on_the_recall_scale():
    ax = eval_figure([recall(10, 0.05, samples=150)], [{"name": "only", "start": 0, "end": 10, "loss": {}}]).axes[0]
    for line in lines(ax).values():
        assert line.get_marker() == "o" and len(line.get_xdata()) == 1
    low, high = ax.get_ylim()
    assert low == 0 and 0.15 <= high <= 0.2  # R@10 = 0.15 fills the panel; samples (150) and chance are not drawn
    assert "samples" not in str(list(lines(ax))) and "chance" not in str(list(lines(ax)))
    x_low, x_high = ax.get_xlim()
    assert x_low == 0 and 10 < x_high < 12  # the step axis starts at 0, so one late evaluation sits where it was


@pytest.mark.parametrize("zeroshot, panels", [
    (None, {}),
    (lambda d: {"top1": 0.6 + d, "top5": 0.9 + d / 2, "classes": 8},  # `siclip eval` with one folder
     {"zero-shot top-1": [0.6, 0.7], "zero-shot top-5": [0.9, 0.95]}),
    (lambda d: {"colour": {"top1": 0.6 + d, "top5": 0.9 + d / 2}, "shape": {"top1": 0.3 + d, "top5": 0.8 + d / 2}},
     {"colour top-1": [0.6, 0.7], "colour top-5": [0.9, 0.95], "shape top-1": [0.3, 0.4], "shape top-5": [0.8, 0.85]}),
])
def test_a_zero_shot_panel_appears_exactly_when_the_metrics_hold_zero_shot_figures(zeroshot, panels):
    records = [recall(5, 0.1), recall(10, 0.2)]
    if zeroshot:
        for r, d in zip(records, (0.0, 0.1)):
            r["eval"]["zeroshot"] = zeroshot(d)
    fig = eval_figure(records, [])
    assert len(fig.axes) == (2 if zeroshot else 1)
    assert set(lines(fig.axes[0])) == {f"{way} R@{k}" for way in ("i2t", "t2i") for k in (1, 5, 10)}
    if zeroshot:
        assert {k: [round(y, 6) for y in v.get_ydata()] for k, v in lines(fig.axes[1]).items()} == panels
        assert fig.axes[1].get_ylim()[0] == 0


def test_fd_weighted_2000_is_drawn_at_its_weight_on_a_log_scale_and_each_stage_is_named():
    stages = [{"name": "warm", "start": 0, "end": 2, "loss": {"clip_web": 1.0}},
              {"name": "distil", "start": 2, "end": 4, "loss": {"clip_web": 0.5, "fd": 2000.0}}]
    records = [step(1, "warm", clip_web=2.1), step(2, "warm", clip_web=2.0),
               step(3, "distil", clip_web=1.9, fd=0.05), step(4, "distil", clip_web=1.8, fd=0.04)]
    ax = loss_figure(records, stages).axes[0]
    drawn = lines(ax)
    assert list(drawn["2000 × fd"].get_ydata()) == pytest.approx([100.0, 80.0])
    assert list(drawn["1/0.5 × clip_web"].get_ydata()) == pytest.approx([2.1, 2.0, 0.95, 0.9])
    assert ax.get_yscale() == "log"
    assert vertical_lines(ax) == [2] and texts(ax) == ["warm", "distil"]
    # terms within a decade of each other stay on a linear scale
    same = [step(1, "warm", clip_web=2.0), step(2, "warm", clip_web=1.5)]
    assert loss_figure(same, stages[:1]).axes[0].get_yscale() == "linear"


def test_a_stage_the_run_has_not_reached_is_not_marked():
    stages = [{"name": "a", "start": 0, "end": 5, "loss": {}}, {"name": "b", "start": 5, "end": 9, "loss": {}}]
    ax = loss_figure([step(1, "a", clip_web=1.0), step(3, "a", clip_web=0.9)], stages).axes[0]
    assert vertical_lines(ax) == [] and texts(ax) == ["a"]
