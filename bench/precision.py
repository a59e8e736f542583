"""`siclip train` end to end in each precision on one device: fp16 (Accelerate's loss scaler), bf16 and fp32,
on generated shards, the tiny preset with gradient caching (batch 64 in micro-batches of 16). For a GPU, where
fp16 is the path of cards without bf16; prints one JSON line per precision and a summary:

    python -m bench precision [--steps 60] [--precisions fp16,bf16,no]

Per precision: the mean loss of the first and last 5 steps, the steps whose gradient norm was not finite (the
scaler skips those: a few at its first calibration is expected, more is a fault), samples/s and peak memory.
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from siclip.manifests.layout import DataRoot
from bench.roots import make_bench_root
from siclip.training.config import load_train_config
from siclip.training.loop import train

REPO = Path(__file__).resolve().parents[1]  # `-m bench.precision` runs from the checkout's root


def run(root: DataRoot, precision: str, steps: int) -> dict:
    cfg = load_train_config("tiny", ["val_samples=0", "eval_every=0", f"checkpoint_every={10**6}", "log_every=1",
                                     "micro_batch=16", f"precision={precision}", "stages.0.warmup_steps=5"])
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    train(cfg, root.root, f"p-{precision}", max_steps=steps)
    rows = [json.loads(x) for x in (root.runs / f"p-{precision}" / "metrics.jsonl").read_text().splitlines()]
    rows = [r for r in rows if "loss" in r]
    losses = [r["loss"] for r in rows]
    rates = [r["samples_per_s"] for r in rows[5:]]
    return {"precision": precision, "steps": len(rows),
            "loss_first5": round(sum(losses[:5]) / 5, 4), "loss_last5": round(sum(losses[-5:]) / 5, 4),
            "nonfinite_loss": sum(not math.isfinite(v) for v in losses),
            "nonfinite_grad_norm": sum(not math.isfinite(r["grad_norm"]) for r in rows),
            "samples_per_s": round(sorted(rates)[len(rates) // 2], 1) if rates else None,
            "peak_memory_mb": round(torch.cuda.max_memory_allocated() / 2**20, 1) if torch.cuda.is_available() else None}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--precisions", default="fp16,bf16,no")
    ap.add_argument("--one", nargs=2, metavar=("PRECISION", "DATA"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.one:  # one precision per process: Accelerate's state is fixed once a process has made it
        print(json.dumps(run(DataRoot(args.one[1]), args.one[0], args.steps)), flush=True)
        return 0
    results = []
    with tempfile.TemporaryDirectory(prefix="siclip-precision-") as tmp:
        root = make_bench_root(Path(tmp) / "data", shards=4, per_shard=(args.steps + 8) * 64 // 4)
        for precision in args.precisions.split(","):
            res = subprocess.run([sys.executable, "-m", "bench.precision", "--steps", str(args.steps), "--one",
                                  precision, str(root.root)], stdout=subprocess.PIPE, text=True, check=True, cwd=REPO)
            results.append(json.loads(res.stdout.strip().splitlines()[-1]))
            print(json.dumps(results[-1]), flush=True)
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    for r in results:
        print(f"precision {r['precision']} on {device}: loss {r['loss_first5']} -> {r['loss_last5']} over {r['steps']} "
              f"steps, {r['nonfinite_grad_norm']} step(s) skipped, {r['samples_per_s']} samples/s, "
              f"peak {r['peak_memory_mb']} MB", file=sys.stderr)
    return 0 if all(r["nonfinite_loss"] == 0 and r["loss_last5"] < r["loss_first5"] for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
