"""Where `python -m bench train`'s ratio (siclip train over a plain PyTorch loop) loses its last percents (issue 19):
the loader's decoding on the training cores, or the loop's own per-step work. Same data, config and figures as
`python -m bench train`, each pair repeated with the order alternating:

    python -m bench overhead [--repeats 3] [--steps 30]

Per repeat:
- `plain` and `siclip`: samples/s as bench train measures them (the plain loop on one batch in memory; siclip
  train's wall clock between its logged steps), and the CPU seconds each spent per step: the training
  process's own, and (siclip) its loader workers', read from getrusage once train() has joined them;
- `siclip_step_only`: samples/s over the time of the step alone (its metrics' samples_per_s: inputs, forward,
  backward, clipping, AdamW), without the wait for the next batch;
- `decode_cpu_per_step`: CPU seconds the loader's workers spend making one batch (decode, crop, tokenise,
  collate), measured on the loader alone.
Then `ceiling`: the ratio siclip could reach if the loop cost nothing beyond the plain loop's step, with the
decoding sharing the cores (all work on the machine's cores): plain CPU / (plain CPU + decode CPU) per step.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import resource
import statistics
import sys
import tempfile
from pathlib import Path

import torch

from bench.roots import make_bench_root
from bench.train import _loader_rate, _plain_loop


def cpu(who) -> float:
    r = resource.getrusage(who)
    return r.ru_utime + r.ru_stime


def decode_cpu_per_batch(cfg, root, batches: int) -> tuple[float, dict]:
    """(CPU seconds the loader's worker processes spend per batch, one batch): bench train's loader run for two
    lengths, its workers' CPU read once they have exited, so that start-up and the first shuffle-buffer fill
    cancel out."""
    used, batch = [], None
    for n in (2, 2 + batches):
        before = cpu(resource.RUSAGE_CHILDREN)
        _, batch = _loader_rate(cfg, root, n)
        gc.collect()  # the loader's iterator, and with it its workers, is gone: getrusage counts them
        used.append(cpu(resource.RUSAGE_CHILDREN) - before)
    return (used[1] - used[0]) / batches, batch


def plain(cfg, batch, steps: int, warmup: int) -> dict:
    """bench train's plain loop; CPU per step from two lengths, so that building the model cancels out."""
    before = cpu(resource.RUSAGE_SELF)
    _plain_loop(cfg, batch, 1, warmup)
    short = cpu(resource.RUSAGE_SELF) - before
    before = cpu(resource.RUSAGE_SELF)
    rate = _plain_loop(cfg, batch, steps, warmup)
    return {"samples_per_s": rate, "cpu_per_step": (cpu(resource.RUSAGE_SELF) - before - short) / (steps - 1)}


def siclip(cfg, root, out: str, steps: int, warmup: int) -> dict:
    """siclip train as bench train runs it; CPU per step (its own, its workers') from two lengths, so that
    start-up, the workers' first shuffle-buffer fill and the final checkpoint cancel out."""
    from siclip.training.loop import train

    used = []
    for n, name in ((warmup, f"{out}-short"), (warmup + steps, out)):
        own, children = cpu(resource.RUSAGE_SELF), cpu(resource.RUSAGE_CHILDREN)
        train(cfg, root.root, name, max_steps=n)
        used.append((cpu(resource.RUSAGE_SELF) - own, cpu(resource.RUSAGE_CHILDREN) - children))
    records = [json.loads(x) for x in (root.runs / out / "metrics.jsonl").read_text().splitlines()]
    times = {r["step"]: r["seconds"] for r in records if "seconds" in r}
    step_only = [r["samples_per_s"] for r in records if "samples_per_s" in r and r["step"] > warmup]
    return {"samples_per_s": steps * cfg.batch_size / (times[warmup + steps] - times[warmup]),
            "step_only_samples_per_s": statistics.median(step_only),
            "cpu_per_step": (used[1][0] - used[0][0]) / steps, "workers_cpu_per_step": (used[1][1] - used[0][1]) / steps}


def run(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--threads", type=int, default=0, help="torch threads of both loops (0: torch's default)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    from siclip.training.config import load_train_config

    steps, warmup = args.steps, 5
    load = [os.getloadavg()[0]]
    rows = []
    with tempfile.TemporaryDirectory(prefix="siclip-train-overhead-") as tmp:
        shards = 4
        root = make_bench_root(Path(tmp) / "data", shards, max(64, (steps + warmup + 2) * 64 // shards + 64))
        cfg = load_train_config("tiny", ["val_samples=0", "eval_every=0", f"checkpoint_every={10**6}",
                                         "stages.0.epochs=1", "log_every=1", f"threads={args.threads}"])
        decode, batch = decode_cpu_per_batch(cfg, root, 8)
        _plain_loop(cfg, batch, 1, 0)  # one-off costs (first calls, lazy imports) land here, not in a difference
        from siclip.training.loop import train

        train(cfg, root.root, "overhead-warm-up", max_steps=1)
        for r in range(args.repeats):
            row = {}
            for what in (("plain", "siclip") if r % 2 == 0 else ("siclip", "plain")):
                row[what] = plain(cfg, batch, steps, warmup) if what == "plain" else \
                    siclip(cfg, root, f"overhead-{r}", steps, warmup)
            p, s = row["plain"], row["siclip"]
            row["ratio"] = s["samples_per_s"] / p["samples_per_s"]
            row["step_only_ratio"] = s["step_only_samples_per_s"] / p["samples_per_s"]
            row["ceiling"] = p["cpu_per_step"] / (p["cpu_per_step"] + decode)
            # on cores that the two processes keep busy: the plain step's CPU over all of siclip's
            row["cpu_ratio"] = p["cpu_per_step"] / (s["cpu_per_step"] + s["workers_cpu_per_step"])
            row["loop_cpu_ratio"] = p["cpu_per_step"] / s["cpu_per_step"]
            rows.append(row)
            load.append(os.getloadavg()[0])
            print(f"repeat {r}: ratio {row['ratio']:.3f} (siclip {s['samples_per_s']:.1f}, plain "
                  f"{p['samples_per_s']:.1f} samples/s); step alone {row['step_only_ratio']:.3f}; CPU s/step: plain "
                  f"{p['cpu_per_step']:.3f}, siclip {s['cpu_per_step']:.3f} + workers {s['workers_cpu_per_step']:.3f}"
                  f"; decode alone {decode:.3f}; ceiling {row['ceiling']:.3f}; CPU ratios: all {row['cpu_ratio']:.3f}, "
                  f"training process {row['loop_cpu_ratio']:.3f}", file=sys.stderr)
    med = {k: round(statistics.median(r[k] for r in rows), 3) for k in ("ratio", "step_only_ratio", "ceiling",
                                                                    "cpu_ratio", "loop_cpu_ratio")}
    out = {"median": med, "decode_cpu_per_step": round(decode, 4), "repeats": rows, "threads": torch.get_num_threads(),
           "load_average": [round(min(load), 2), round(max(load), 2)]}
    print(f"median of {args.repeats}: ratio {med['ratio']}, step alone {med['step_only_ratio']}, ceiling with the "
          f"decoding on the same cores {med['ceiling']}; CPU ratios: all {med['cpu_ratio']}, training process "
          f"{med['loop_cpu_ratio']}; 1-minute load {out['load_average'][0]}-"
          f"{out['load_average'][1]} on {os.cpu_count()} CPUs", file=sys.stderr)
    print(json.dumps(out))
    return out


def main(argv=None) -> int:  # python -m bench NAME
    run(argv)
    return 0
