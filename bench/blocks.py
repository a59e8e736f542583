"""`python -m bench blocks`: the presets' own towers with SAS-P blocks against the same towers of standard blocks.

Each case is a tower built from its preset (training/presets/*.toml), measured against its baseline in the
same run: the same config with every layer a standard pre-LN block and no attention sharing (for MCi0,
timm's own attention blocks: plain fastvit_mci0).

- s0_text: 6 × 512, bidirectional, layers 1-4 SAS-P sharing 1↔2 and 3↔4, layers 5-6 pre-LN, attending to
  the padding as s0 does (mask_padding = false, C·x a mean over all positions);
- s0_text_masked: the same with mask_padding = true (the padding mask in the attention and in C·x);
- s0_image (timm installed): MCi0 at 256 px, its last stage's two attention blocks as SAS-P blocks sharing one
  attention (layer 1's value projection included), against timm's MCi0;
- tiny_text (causal) and tiny_image (a 64 px ViT): the CPU preset.

`param_ratio` counts the blocks SAS-P replaces (the tower's blocks; MCi0's last-stage attention blocks),
`param_ratio_tower` the whole tower. Speed-ups are the baseline's median time over SAS-P's, timings
interleaved (alternating which goes first) until a time budget is spent. The text towers' token tables
are frozen in the training step (identical in both variants, and they would dominate the optimizer step).
"""

from __future__ import annotations

import dataclasses
import os
import statistics
import sys
import time

import torch

from siclip.training.model import MCi0Tower, TextTransformer, VisionTransformer, count_parameters, load_config

# name -> (preset, tower, overrides of the tower config)
CASES = {
    "s0_text": ("s0", "text", {}),
    "s0_text_masked": ("s0", "text", {"mask_padding": True}),
    "s0_image": ("s0", "image", {}),
    "tiny_text": ("tiny", "text", {}),
    "tiny_image": ("tiny", "image", {}),
}
QUICK = ("tiny_text", "tiny_image")  # for tests: seconds
BATCH = {"cpu": 8, "cuda": 128}
BUDGET_S = {False: 20.0, True: 2.5}


def has_timm() -> bool:
    try:
        import timm  # noqa: F401
    except Exception:  # ImportError, or a torchvision that does not match torch
        return False
    return True


def build_towers(case: str) -> dict[str, torch.nn.Module]:
    """{"preln": the baseline, "sasp": the preset's tower} of one case, both from the same seed."""
    preset, kind, overrides = CASES[case]
    config = load_config(preset)
    tower = dataclasses.replace(getattr(config, kind), **overrides)
    baseline = dataclasses.replace(tower, block="preln", share_attention=[])
    build = TextTransformer if kind == "text" else {"vit": VisionTransformer, "mci0": MCi0Tower}[tower.kind]
    towers = {}
    for name, cfg in (("preln", baseline), ("sasp", tower)):
        torch.manual_seed(0)
        towers[name] = build(cfg, config.embed_dim)
        if kind == "text":
            towers[name].token_embed.weight.requires_grad_(False)
    return towers


def replaced_blocks(tower: torch.nn.Module) -> torch.nn.Module:
    """The blocks SAS-P replaces: a transformer tower's blocks, or MCi0's last-stage attention blocks."""
    return tower.trunk.stages[-1].blocks if isinstance(tower, MCi0Tower) else tower.blocks


def _inputs(case: str, batch: int, device) -> torch.Tensor:
    preset, kind, _ = CASES[case]
    g = torch.Generator().manual_seed(0)
    if kind == "text":
        ids = torch.randint(1, 49406, (batch, load_config(preset).text.context_length), generator=g)
        ids[:, 0], ids[:, 20] = 49406, 49407  # a typical caption length; the padding follows
        return ids.to(device)
    size = load_config(preset).image.image_size
    return torch.randn(batch, 3, size, size, generator=g).to(device)


def clock_for(device: str, threads: int):
    """(clock, its name): on one CPU thread, the process's CPU time, which counts what the bench computed and not
    the time it waited for a core while other jobs ran (it still feels their cache traffic); else wall time."""
    if device == "cpu" and threads == 1:
        return time.process_time, "process CPU time"
    return time.perf_counter, "wall time"


def _measure(towers: dict, x: torch.Tensor, budget_s: float, clock=time.perf_counter, min_repeats: int = 3,
             max_repeats: int = 50) -> tuple[dict[str, dict[str, float]], int]:
    """(median seconds per inference forward and per training step of each tower, repeats), interleaved."""
    optimizers = {k: torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-4)
                  for k, m in towers.items()}
    sync = torch.cuda.synchronize if x.is_cuda else (lambda: None)

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
                sync()
                start = clock()
                fn(name)
                sync()
                times[name][what].append(clock() - start)
        r += 1
    return {k: {what: statistics.median(v) for what, v in t.items()} for k, t in times.items()}, r


def measure_case(case: str, batch: int, budget_s: float, device: str = "cpu", clock=time.perf_counter) -> dict:
    """One case's parameter counts and speed-ups, SAS-P against its baseline."""
    towers = {k: m.to(device) for k, m in build_towers(case).items()}
    t, repeats = _measure(towers, _inputs(case, batch, device), budget_s, clock)
    blocks = {k: count_parameters(replaced_blocks(m)) for k, m in towers.items()}
    whole = {k: count_parameters(m) for k, m in towers.items()}
    return {
        "param_ratio": blocks["sasp"] / blocks["preln"],
        "param_ratio_tower": whole["sasp"] / whole["preln"],
        "inference_speedup": t["preln"]["infer"] / t["sasp"]["infer"],
        "train_step_speedup": t["preln"]["train"] / t["sasp"]["train"],
        "params": blocks, "params_tower": whole, "seconds": t, "batch": batch, "repeats": repeats,
        "preset": CASES[case][0], "tower": CASES[case][1], "overrides": CASES[case][2],
    }


def _line(case: str, r: dict) -> str:
    return (f"{case:15s} blocks {r['params']['preln'] / 1e6:6.2f}M -> {r['params']['sasp'] / 1e6:6.2f}M "
            f"(x{r['param_ratio']:.3f}); tower {r['params_tower']['preln'] / 1e6:6.2f}M -> "
            f"{r['params_tower']['sasp'] / 1e6:6.2f}M (x{r['param_ratio_tower']:.3f})  "
            f"inference x{r['inference_speedup']:.3f}  train step x{r['train_step_speedup']:.3f}  "
            f"(batch {r['batch']}, {r['repeats']} repeats)")


def bench_blocks(quick: bool = False, threads: int | None = None, device: str = "cpu", batch: int | None = None,
                 cases: tuple[str, ...] | None = None) -> dict:
    """Measure every case (QUICK ones with quick=True; s0_image only where timm imports), print a table to
    stderr and return {"cases": {case: ratios and details}, "threads", "load_average", "device", "skipped"}.

    threads: torch CPU threads for the run (default: 1 on a CPU, timed on process CPU time; torch's choice on a
    GPU). On a machine busy with other work, several threads on wall time give ratios anywhere from x0.6 to x2.5
    between runs: a parallel kernel waits for its slowest thread, and a few repeats fit the time budget.
    """
    names = list(cases or (QUICK if quick else CASES))
    skipped = {}
    if "s0_image" in names and not has_timm():
        names.remove("s0_image")
        skipped["s0_image"] = "timm is not installed (extra siclip[mobileclip])"
    if device.startswith("cuda") and not torch.cuda.is_available():
        from siclip.manifests.errors import SiclipError

        raise SiclipError(f"bench blocks --device {device}: torch sees no CUDA device")
    batch = batch or BATCH["cuda" if device.startswith("cuda") else "cpu"]
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(threads or (1 if device == "cpu" else previous_threads))
    load_before = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    clock, clock_name = clock_for(device, torch.get_num_threads())
    try:
        results = {case: measure_case(case, batch, BUDGET_S[quick], device, clock) for case in names}
    finally:
        used_threads = torch.get_num_threads()
        torch.set_num_threads(previous_threads)
    load = None if load_before is None else round(max(load_before, os.getloadavg()[0]), 2)
    where = torch.cuda.get_device_name(device) if device.startswith("cuda") else f"CPU, {used_threads} thread(s)"
    print(f"the presets' towers, SAS-P + attention sharing vs pre-LN (MCi0: timm's attention blocks), {where}; "
          f"medians of interleaved repeats ({clock_name}); ratios SAS-P/pre-LN, speed-ups pre-LN time/SAS-P time",
          file=sys.stderr)
    for case, r in results.items():
        print("  " + _line(case, r), file=sys.stderr)
    for case, why in skipped.items():
        print(f"  {case:15s} skipped: {why}", file=sys.stderr)
    if load is not None:
        print(f"  1-minute load average {load} on {os.cpu_count()} CPUs (other work running skews timings)",
              file=sys.stderr)
    return {"cases": results, "threads": used_threads, "load_average": load, "device": where, "clock": clock_name,
            "skipped": skipped}

