"""`siclip bench blocks`: SAS-P blocks with attention sharing against standard pre-LN blocks.

For a text tower and a ViT image tower of the same width and depth, built both ways in
the same run: parameters, inference throughput and training-step time on this machine's
CPU. Timings interleave the two variants (alternating which goes first) and take the
median of the repeats. The ratios are SAS-P over pre-LN (speedups: pre-LN time over SAS-P time).
`param_ratio` counts the blocks (what SAS-P replaces); `param_ratio_tower` the whole tower.
The text tower's token table is frozen in the training step (identical in both variants).
"""

from __future__ import annotations

import os
import statistics
import sys
import time

import torch

from training.model import ImageTowerConfig, TextTowerConfig, TextTransformer, VisionTransformer, count_parameters

# Shapes: the s0 text tower (6 x 512); a ViT the width of MCi0's last stage at small resolution
# (MCi0 itself needs timm). quick: smaller, for tests.
SHAPES = {
    False: dict(text=dict(width=512, depth=6, heads=8), image=dict(width=384, depth=6, heads=6, image_size=128),
                batch=8, budget_s=20.0),
    True: dict(text=dict(width=256, depth=2, heads=4), image=dict(width=192, depth=2, heads=3, image_size=64),
               batch=4, budget_s=2.5),
}


def _pairs(depth: int) -> list[list[int]]:
    return [[i, i + 1] for i in range(1, depth, 2)]


def _towers(kind: str, shape: dict) -> dict[str, torch.nn.Module]:
    """The same tower twice: standard pre-LN blocks, and SAS-P blocks sharing attention pairwise."""
    towers = {}
    for block in ("preln", "sasp"):
        share = _pairs(shape["depth"]) if block == "sasp" else []
        if kind == "text":
            towers[block] = TextTransformer(TextTowerConfig(**shape, block=block, share_attention=share), 512)
            # The 25M-entry token table is the same in both and would dominate the optimizer step.
            towers[block].token_embed.weight.requires_grad_(False)
        else:
            cfg = ImageTowerConfig(**shape, patch_size=16, block=block, share_attention=share)
            towers[block] = VisionTransformer(cfg, 512)
    return towers


def _inputs(kind: str, shape: dict, batch: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    if kind == "text":
        ids = torch.randint(1, 49406, (batch, 77), generator=g)
        ids[:, 0], ids[:, 20] = 49406, 49407  # typical caption length; causal attention still runs over 77
        return ids
    return torch.randn(batch, 3, shape["image_size"], shape["image_size"], generator=g)


def _measure(towers: dict, x: torch.Tensor, budget_s: float, min_repeats: int = 3,
             max_repeats: int = 50) -> tuple[dict[str, dict[str, float]], int]:
    """(median seconds per inference forward and per training step of each tower, repeats), interleaved.

    Repeats until the time budget is spent (at least min_repeats): a busy machine gets more samples.
    """
    optimizers = {k: torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-4)
                  for k, m in towers.items()}

    def infer(name):
        towers[name].eval()
        with torch.inference_mode():
            towers[name](x)

    def train_step(name):
        towers[name].train()
        loss = towers[name](x).square().mean()
        loss.backward()
        optimizers[name].step()
        optimizers[name].zero_grad(set_to_none=True)

    times = {k: {"infer": [], "train": []} for k in towers}
    for name in towers:  # warm-up: allocator, kernels, optimizer state
        infer(name)
        train_step(name)
    order, deadline, r = list(towers), time.perf_counter() + budget_s, 0
    while r < min_repeats or (time.perf_counter() < deadline and r < max_repeats):
        for name in order if r % 2 == 0 else order[::-1]:
            for what, fn in (("infer", infer), ("train", train_step)):
                start = time.perf_counter()
                fn(name)
                times[name][what].append(time.perf_counter() - start)
        r += 1
    return {k: {what: statistics.median(v) for what, v in t.items()} for k, t in times.items()}, r


def _block_params(tower) -> int:
    return count_parameters(tower.blocks)


def _run(plan: dict) -> tuple[dict, list[str]]:
    """Both towers measured both ways: (results per tower, one table line per tower)."""
    results, lines = {}, []
    for kind in ("text", "image"):
        shape = plan[kind]
        towers = _towers(kind, shape)
        t, repeats = _measure(towers, _inputs(kind, shape, plan["batch"]), plan["budget_s"])
        pre, sas = towers["preln"], towers["sasp"]
        results[kind] = {
            "param_ratio": _block_params(sas) / _block_params(pre),
            "inference_speedup": t["preln"]["infer"] / t["sasp"]["infer"],
            "train_step_speedup": t["preln"]["train"] / t["sasp"]["train"],
            "param_ratio_tower": count_parameters(sas) / count_parameters(pre),
            "params": {"preln": _block_params(pre), "sasp": _block_params(sas)},
            "seconds": t,
            "shape": {**shape, "batch": plan["batch"]},
            "repeats": repeats,
        }
        r = results[kind]
        lines.append(
            f"{kind:5s} {shape['depth']}x{shape['width']:<4d} blocks {r['params']['preln'] / 1e6:6.2f}M -> "
            f"{r['params']['sasp'] / 1e6:6.2f}M (x{r['param_ratio']:.3f}; whole tower x{r['param_ratio_tower']:.3f})"
            f"  inference x{r['inference_speedup']:.3f}  train step x{r['train_step_speedup']:.3f}"
            f"  ({repeats} repeats)")
    return results, lines


def bench_blocks(quick: bool = False, threads: int | None = None) -> dict:
    """Measure, print a short table to stderr and return the ratios.

    Returns {"param_ratio", "inference_speedup", "train_step_speedup"} for the text tower, the
    same keys under "image", plus details (parameter counts, seconds, shapes, repeats, load).

    threads: torch CPU threads for the run (default: torch's choice). On a machine busy with
    other work, 1 thread gives steadier ratios: a parallel kernel waits for its slowest thread.
    """
    plan = SHAPES[quick]
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(threads or previous_threads)
    load_before = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    try:
        results, lines = _run(plan)
    finally:
        used_threads = torch.get_num_threads()
        torch.set_num_threads(previous_threads)
    load = None if load_before is None else round(max(load_before, os.getloadavg()[0]), 2)
    print(f"SAS-P + attention sharing vs pre-LN, same width/depth, CPU ({used_threads} threads), "
          f"batch {plan['batch']}, medians of interleaved repeats; ratios SAS-P/pre-LN, "
          f"speedups pre-LN time/SAS-P time", file=sys.stderr)
    for line in lines:
        print("  " + line, file=sys.stderr)
    if load is not None:
        print(f"  1-minute load average {load} on {os.cpu_count()} CPUs (other work running skews timings)",
              file=sys.stderr)
    return {**results["text"], "image": results["image"], "threads": used_threads, "load_average": load}


if __name__ == "__main__":
    import json

    threads = next((int(a.split("=")[1]) for a in sys.argv if a.startswith("--threads=")), None)
    print(json.dumps(bench_blocks(quick="--quick" in sys.argv, threads=threads), indent=2))
