"""A training run's plots, RUN/plots/*.png, drawn from its metrics.jsonl.

- loss.png: each loss term as it enters the total (times its stage's weight) and the total, on a log scale
  when they span more than a decade;
- lr.png: the learning rate and exp(logit_scale);
- eval.png: held-out recall@K, image->text solid and text->image dashed in one colour per K, and a zero-shot
  panel when the eval records hold zero-shot figures.

On every step axis, a dotted vertical line where a stage begins, and the stage names. Each plot is a function
from the metrics records and the run's stages (`Run.stages()`: name, start, end, loss weights) to a matplotlib
Figure, so what is drawn can be read back.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from matplotlib.figure import Figure

RECALL = re.compile(r"(i2t|t2i)_r(\d+)$")


def step_axis(ax, stages: list[dict], steps: list[int]) -> None:
    """The x axis in whole steps from 0 (so a few evaluations late in a run sit where they happened), a dotted
    line where each stage after the first begins, and each stage's name at the top where it begins (stages the
    run has not reached are left out)."""
    ax.set_xlabel("step")
    ax.xaxis.get_major_locator().set_params(integer=True)
    if steps:
        ax.set_xlim(0, max(steps) * 1.03 + 1)
    for s in [s for s in stages if steps and s["start"] < max(steps)]:
        if s["start"] > 0:
            ax.axvline(s["start"], color="grey", linestyle=":", linewidth=1)
        ax.text(s["start"], 0.99, f" {s['name']}", transform=ax.get_xaxis_transform(), va="top",
                fontsize=8, color="dimgrey")


def loss_figure(records: list[dict], stages: list[dict], title: str = "") -> Figure:
    """The total loss and each term times its stage's weight; log y when they span more than a decade."""
    steps = [r for r in records if "loss" in r]
    weights = {s["name"]: s["loss"] for s in stages}
    fig = Figure(figsize=(7, 4), layout="tight")
    ax = fig.add_subplot()
    dot = "o" if len(steps) == 1 else None  # one logged step is a point, not a line
    ax.plot([r["step"] for r in steps], [r["loss"] for r in steps], color="black", linewidth=1.5, marker=dot,
            label="total")
    for term in sorted({k for r in steps for k in r.get("terms", {})}):
        used = [r for r in steps if term in r.get("terms", {})]
        lam = [weights.get(r.get("stage"), {}).get(term, 1.0) for r in used]
        ax.plot([r["step"] for r in used], [w * r["terms"][term] for w, r in zip(lam, used)], linewidth=1,
                marker=dot, label=f"{'/'.join(f'{w:g}' for w in dict.fromkeys(lam))} × {term}")
    values = [y for line in ax.get_lines() for y in line.get_ydata() if y > 0]
    if values and max(values) > 10 * min(values):
        ax.set_yscale("log")
    step_axis(ax, stages, [r["step"] for r in steps])
    ax.set(ylabel="loss", title=f"{title}: loss terms, weighted as they enter the total")
    ax.legend(fontsize=8)
    return fig


def lr_figure(records: list[dict], stages: list[dict], title: str = "") -> Figure:
    """The learning rate (left axis) and exp(logit_scale) (right axis) by step."""
    steps = [r for r in records if "loss" in r]
    x = [r["step"] for r in steps]
    fig = Figure(figsize=(7, 3.5), layout="tight")
    ax = fig.add_subplot()
    ax.plot(x, [r["lr"] for r in steps], color="tab:blue")
    ax.set_title(f"{title}: learning rate and logit scale")
    ax.set_ylabel("learning rate", color="tab:blue")
    step_axis(ax, stages, x)
    ax2 = ax.twinx()
    ax2.plot(x, [r["temperature"] for r in steps], color="tab:red")
    ax2.set_ylabel("exp(logit_scale)", color="tab:red")
    return fig


def eval_figure(records: list[dict], stages: list[dict], title: str = "") -> Figure:
    """Held-out recall@K by step, i2t and t2i paired; a zero-shot panel (top-1 solid, top-5 dashed) if any."""
    evals = [(r["step"], r["eval"]) for r in records if "eval" in r]
    ks = sorted({int(m.group(2)) for _, ev in evals for key in ev if (m := RECALL.match(key))})
    recall = [(f"{way} R@{k}", f"C{i}", style, [(step, ev[f"{way}_r{k}"]) for step, ev in evals if f"{way}_r{k}" in ev])
              for i, k in enumerate(ks) for way, style in (("i2t", "-"), ("t2i", "--"))]
    # `siclip eval`'s shape: one folder gives {"top1": ...}; several, {folder: {"top1": ...}}
    zeroshot = [(step, {"zero-shot": zs} if "top1" in zs else zs) for step, ev in evals if (zs := ev.get("zeroshot"))]
    names = list(dict.fromkeys(name for _, per in zeroshot for name in per))
    accuracy = [(f"{name} top-{k}", f"C{i}", style, [(step, per[name][f"top{k}"]) for step, per in zeroshot
                                                      if f"top{k}" in per.get(name, {})])
                for i, name in enumerate(names) for k, style in ((1, "-"), (5, "--"))]
    fig = Figure(figsize=(12 if zeroshot else 7, 4), layout="tight")
    axes = fig.subplots(1, 2 if zeroshot else 1, squeeze=False)[0]
    _panel(axes[0], recall, "recall", f"{title}: held-out retrieval", stages)
    if zeroshot:
        _panel(axes[1], accuracy, "accuracy", f"{title}: zero-shot", stages)
    return fig


def _panel(ax, series: list[tuple], ylabel: str, title: str, stages: list[dict]) -> None:
    """(label, colour, line style, points) as lines with a marker at each evaluation (so one evaluation shows),
    y from 0 to a little above the highest figure."""
    for label, colour, style, pts in series:
        if pts:
            ax.plot(*zip(*pts), style, color=colour, marker="o", label=label)
    top = max((y for *_, pts in series for _, y in pts), default=0)
    ax.set_ylim(0, min(1.05, 1.15 * top) or 1)
    step_axis(ax, stages, [x for *_, pts in series for x, _ in pts])
    ax.set(ylabel=ylabel, title=title)
    ax.legend(fontsize=8)


def save_plots(folder: Path, records: list[dict], stages: list[dict], title: str = "") -> list[Path]:
    """Write loss.png and lr.png (once steps are logged) and eval.png (once evaluated) into `folder`."""
    figures = {}
    if any("loss" in r for r in records):
        figures["loss.png"] = loss_figure(records, stages, title)
        figures["lr.png"] = lr_figure(records, stages, title)
    if any("eval" in r for r in records):
        figures["eval.png"] = eval_figure(records, stages, title)
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for name, fig in figures.items():
        path = folder / name
        fig.savefig(path.with_suffix(".tmp.png"), dpi=90)
        os.replace(path.with_suffix(".tmp.png"), path)
        written.append(path)
    return written
