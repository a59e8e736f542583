"""SAS-P against pre-LN training steps on a CPU, timed and profiled in one process (issue 19):

    python -m bench sasp [--trials 40] [--threads 1] [--cases ...] [--profile 5]

Cases (each one A = pre-LN against B = SAS-P, built from the same seed):
- `tiny_text`, `tiny_image`, `s0_text`, `s0_image`: the towers of `python -m bench blocks` at its CPU batch
  (8), its step (squared-output loss, backward, AdamW; token tables frozen), as bench/blocks.py builds them;
- `tiny_model`, `tiny_model_b128`: the whole `tiny` model against `tiny_preln` as `siclip train` steps them with
  training/configs/tiny.toml's objective (CLIP on web and one synthetic caption, PM with k = 8), AdamW over every
  parameter and gradient clipping, at batch 64 (tiny.toml's) and 128 (bench-peer's);
  images and token ids are random, 20 tokens a caption.

Per case: the median step time of each model over `--trials` interleaved repeats (the order alternates every
repeat), the speed-up pre-LN time / SAS-P time with the 25th-75th percentile of the per-repeat ratios (each
repeat pairs two neighbouring steps, so a load swing hits both), and with `--profile N` the operators whose
self CPU time differs most between the two over N steps each (torch.profiler). One JSON line at the end.
On one thread the clock is the process's CPU time: what the step computed, not the time it waited for a core.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch

from bench import blocks as blocks_bench
from siclip.training.step import assemble
from siclip.training.model import build_model, load_config
from siclip.training.objective import Objective

MODEL_CASES = {"tiny_model": 64, "tiny_model_b128": 128}
CASES = ("tiny_text", "tiny_image", "s0_text", "s0_image", *MODEL_CASES)


def tower_steps(case: str) -> dict:
    """{"preln": step, "sasp": step}: the `python -m bench blocks` training step of one tower case."""
    towers = blocks_bench.build_towers(case)
    x = blocks_bench._inputs(case, blocks_bench.BATCH["cpu"], "cpu")
    steps = {}
    for name, tower in towers.items():
        optimizer = torch.optim.AdamW([p for p in tower.parameters() if p.requires_grad], lr=1e-4)

        def step(tower=tower, optimizer=optimizer):
            tower.train()
            tower(x).square().mean().backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        steps[name] = step
    return steps


def model_steps(batch: int) -> dict:
    """{"preln": step, "sasp": step}: a whole-model step of tiny_preln and tiny, as siclip train runs it."""
    from siclip.training.config import load_train_config

    cfg = load_train_config("tiny", [])
    g = torch.Generator().manual_seed(0)
    pixels = torch.randn(batch, 3, 64, 64, generator=g)
    texts = torch.randint(1, 49406, (2 * batch, 77), generator=g)
    texts[:, 0], texts[:, 20], texts[:, 21:] = 49406, 49407, 0
    valid = torch.ones(batch, 1, dtype=torch.bool)
    steps = {}
    for name, preset in (("preln", "tiny_preln"), ("sasp", "tiny")):
        torch.manual_seed(0)
        model = build_model(load_config(preset))
        objective = Objective(cfg.stages[0].loss, model.config.embed_dim, None, cfg.pm_k)
        params = list(model.parameters()) + list(objective.parameters())
        optimizer = torch.optim.AdamW(params, lr=1e-4, weight_decay=cfg.weight_decay)

        def step(model=model, objective=objective, params=params, optimizer=optimizer):
            model.train()
            terms = objective(assemble(model.encode_image(pixels), model.encode_text(texts), valid, None),
                              model.scale())
            terms["loss"].backward()
            torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            model.clamp_logit_scale_()

        steps[name] = step
    return steps


def time_case(steps: dict, trials: int, clock) -> dict:
    """Median seconds per step of each, and the spread of the paired per-repeat speed-ups."""
    for fn in steps.values():  # warm-up: allocator, optimizer state
        fn()
        fn()
    times = {k: [] for k in steps}
    order = list(steps)
    for r in range(trials):
        for name in order if r % 2 == 0 else order[::-1]:
            start = clock()
            steps[name]()
            times[name].append(clock() - start)
    ratios = sorted(a / b for a, b in zip(times["preln"], times["sasp"]))
    q = statistics.quantiles(ratios, n=4) if len(ratios) > 1 else [ratios[0]] * 3
    med = {k: statistics.median(v) for k, v in times.items()}
    return {"ms": {k: round(1000 * v, 3) for k, v in med.items()}, "speedup": round(med["preln"] / med["sasp"], 3),
            "paired_ratio_median": round(q[1], 3), "paired_ratio_iqr": [round(q[0], 3), round(q[2], 3)],
            "trials": trials}


def profile_case(steps: dict, n: int, top: int = 12) -> list[dict]:
    """The operators whose self CPU time over n steps differs most between pre-LN and SAS-P (ms per step)."""
    from torch.profiler import ProfilerActivity, profile

    per_op = {}
    for name, fn in steps.items():
        fn()
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(n):
                fn()
        per_op[name] = {e.key: (e.self_cpu_time_total / 1000 / n, e.count / n) for e in prof.key_averages()}
    keys = set(per_op["preln"]) | set(per_op["sasp"])
    rows = [{"op": k, "preln_ms": round(per_op["preln"].get(k, (0, 0))[0], 3),
             "sasp_ms": round(per_op["sasp"].get(k, (0, 0))[0], 3),
             "preln_calls": per_op["preln"].get(k, (0, 0))[1], "sasp_calls": per_op["sasp"].get(k, (0, 0))[1]}
            for k in keys]
    rows.sort(key=lambda r: -abs(r["sasp_ms"] - r["preln_ms"]))
    total = {k: round(sum(t for t, _ in ops.values()), 2) for k, ops in per_op.items()}
    return [{"op": "(all operators)", "preln_ms": total["preln"], "sasp_ms": total["sasp"]}] + rows[:top]


def run(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=40, help="interleaved repeats per case")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: steadier on a busy machine)")
    parser.add_argument("--cases", default="tiny_text,tiny_image,tiny_model", help=f"comma-separated, of {CASES}")
    parser.add_argument("--profile", type=int, default=0, help="also profile N steps of each model per case")
    args = parser.parse_args(argv)
    cases = args.cases.split(",")
    unknown = [c for c in cases if c not in CASES]
    if unknown:
        parser.error(f"unknown case(s) {unknown}; cases: {', '.join(CASES)}")
    if "s0_image" in cases and not blocks_bench.has_timm():
        print("s0_image skipped: timm is not installed", file=sys.stderr)
        cases.remove("s0_image")
    torch.set_num_threads(args.threads)
    clock = time.process_time if args.threads == 1 else time.perf_counter
    load = [os.getloadavg()[0]]
    out = {"threads": args.threads, "clock": clock.__name__, "cases": {}}
    for case in cases:
        steps = model_steps(MODEL_CASES[case]) if case in MODEL_CASES else tower_steps(case)
        result = time_case(steps, args.trials, clock)
        load.append(os.getloadavg()[0])
        print(f"{case:16s} pre-LN {result['ms']['preln']:8.2f} ms  SAS-P {result['ms']['sasp']:8.2f} ms  "
              f"speed-up x{result['speedup']:.3f} (paired ratios: median x{result['paired_ratio_median']:.3f}, "
              f"IQR {result['paired_ratio_iqr'][0]:.3f}-{result['paired_ratio_iqr'][1]:.3f}, "
              f"{args.trials} trials)", file=sys.stderr)
        if args.profile:
            result["profile"] = profile_case(steps, args.profile)
            for row in result["profile"]:
                print(f"    {row['op']:45s} pre-LN {row['preln_ms']:8.3f}  SAS-P {row['sasp_ms']:8.3f} ms/step"
                      + (f"  calls {row['preln_calls']:g} / {row['sasp_calls']:g}" if "preln_calls" in row else ""),
                      file=sys.stderr)
        out["cases"][case] = result
    out["load_average"] = [round(min(load), 2), round(max(load), 2)]
    print(f"1-minute load average {out['load_average'][0]}-{out['load_average'][1]} on {os.cpu_count()} CPUs",
          file=sys.stderr)
    print(json.dumps(out))
    return out


def main(argv=None) -> int:  # python -m bench NAME
    run(argv)
    return 0
