"""`python -m bench NAME [--json] [ARGS]`: every benchmark of siclip, run from a source checkout's root.

Each benchmark prints what it measures as it goes (stderr, and the tables of the long ones), then one record:
{"bench": NAME, "baseline": what it is measured against (null: none), "ratio": siclip over the baseline (a
number, one per case or set, or null), "figures": everything it measured}. --json prints the record on one
line; without it, indented. ARGS after NAME go to the benchmark (`python -m bench peer --quick`).

    python -m bench all            the five quick ones (shards captions coca blocks train): `make bench`
    python -m bench real           the whole pipeline on real images: `make bench-real`
    python -m bench ablations      the ablation table on bench-real's data: `make ablations`
    python -m bench peer           siclip against open_clip_train: `make bench-peer`
    python -m bench fit            how fast each model shape fits, beside open_clip: `make bench-fit`
    python -m bench sasp           SAS-P against pre-LN steps on a CPU, with a profile
    python -m bench overhead       bench train's ratio: decoding on the same cores against the loop's overhead
    python -m bench days           FLOPs and loader CPU per training sample, for the days-to-train table
    python -m bench gpu            the GPU figures: step against open_clip_train, loader, levers, captions
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import io
import json
import sys
from dataclasses import dataclass
from typing import Callable


def _headline(figures: dict):
    return figures.get("ratio")


def _per_case(figures: dict) -> dict:
    return {case: r["train_step_speedup"] for case, r in figures["cases"].items()}


def _per_model(figures: dict) -> dict | None:
    ratios = {m: s.get("loss100_ratio_to_open_clip") for m, s in figures["models"].items()}
    return ratios if any(r is not None for r in ratios.values()) else None


def _none(figures) -> None:
    return None


@dataclass(frozen=True)
class Bench:
    module: str  # bench.<module>
    function: str  # in-process: function(quick=, ...) -> figures; "main": a script that prints its own JSON line
    baseline: str | None
    help: str
    ratio: Callable = _headline
    argv: tuple = ()  # put before the user's ARGS (a script's mode)


BENCHES = {
    "shards": Bench("shards", "bench_shards", "img2dataset.download, same list and settings",
                    "siclip shards against raw img2dataset.download"),
    "captions": Bench("captions", "bench_captions", "transformers' image-to-text pipeline, one image at a time",
                      "siclip captions against a transformers pipeline"),
    "coca": Bench("coca", "bench_coca", None, "siclip captions with the seed's CoCa ViT-L/14 (random weights): "
                  "images/s for 3 captions (extra siclip[mobileclip])", _none),
    "blocks": Bench("blocks", "bench_blocks", "the same towers of pre-LN blocks without attention sharing",
                    "SAS-P blocks with sharing against pre-LN blocks (ratio: train-step speed-up per case)",
                    _per_case),
    "train": Bench("train", "bench_train", "a plain PyTorch loop on the same model, batch and objective",
                   "siclip train against a plain PyTorch loop; the loader; gradient caching's memory; --device "
                   "cuda: the paper preset"),
    "real": Bench("real", "main", None, "the whole pipeline on real images (make bench-real)", _none),
    "ablations": Bench("real", "main", None, "the ablation table on bench-real's data (make ablations)", _none,
                       ("--ablations",)),
    "peer": Bench("peer", "main", "open_clip_train, same shards, shape, batch and schedule",
                  "siclip against open_clip_train (make bench-peer; ratio: siclip/open_clip per set)",
                  lambda figures: figures["ratios"]),
    "fit": Bench("fit", "main", "open_clip.CLIP of tiny_preln's shape",
                 "how fast each model shape fits the same pairs (make bench-fit; ratio: final loss over "
                 "open_clip's, per model)", _per_model),
    "precision": Bench("precision", "main", None, "siclip train in fp16, bf16 and fp32 on one device", _none),
    "sasp": Bench("sasp_profile", "main", "the pre-LN twin of each SAS-P tower or model, same seed",
                  "SAS-P against pre-LN training steps, one thread, interleaved, with a profile (--profile N)",
                  lambda figures: {c: r["speedup"] for c, r in figures["cases"].items()}),
    "overhead": Bench("train_overhead", "main", "a plain PyTorch loop on the same model, batch and objective",
                      "bench train's ratio split into the loader's decoding and the loop's own overhead",
                      lambda figures: figures["median"]["ratio"]),
    "days": Bench("days", "bench_days", None, "training FLOPs per sample (tiny, paper) and the loader's CPU ms "
                  "per sample: the counts README's days-to-train table is built from", _none),
    "gpu": Bench("gpu", "main", "open_clip_train's step; the step's consumption; the step without the lever; "
                 "transformers' pipeline", "the GPU figures in one run (make bench-gpu; bench/gpu.sh): siclip's "
                 "step against open_clip_train's with MFU, the loader, the levers, captions", lambda f: f["ratios"]),
}
QUICK = ("shards", "captions", "coca", "blocks", "train")  # `all`, as `make bench` runs it


def record(name: str, figures) -> dict:
    """The one JSON shape every benchmark ends with."""
    b = BENCHES[name]
    skipped = isinstance(figures, dict) and isinstance(figures.get("skipped"), str)  # coca without open_clip
    ratio = b.ratio(figures) if isinstance(figures, dict) and not skipped else None
    return {"bench": name, "baseline": b.baseline, "ratio": ratio, "figures": figures}


class _JsonLines(io.TextIOBase):
    """stdout for a script benchmark: its lines go through, except JSON objects, which are kept as its figures."""

    def __init__(self, out):
        self.out, self.partial, self.objects = out, "", []

    def write(self, s: str) -> int:
        self.partial += s
        *lines, self.partial = self.partial.split("\n")
        for line in lines:
            self._line(line)
        return len(s)

    def _line(self, line: str) -> None:
        try:
            obj = json.loads(line)
        except ValueError:
            obj = None
        if isinstance(obj, dict):
            self.objects.append(obj)
        else:
            self.out.write(line + "\n")
            self.out.flush()

    def close_partial(self) -> None:
        if self.partial:
            self._line(self.partial)
            self.partial = ""


def run_script(name: str, argv: list[str]):
    """(exit status, figures) of a script benchmark's main(argv): its one JSON line, or a list of several."""
    b = BENCHES[name]
    main = importlib.import_module(f"bench.{b.module}").main
    held, real_stdout, real_argv = _JsonLines(sys.stdout), sys.stdout, sys.argv
    sys.stdout, sys.argv = held, [f"python -m bench {name}", *argv]  # argv[0]: the name its --help shows
    try:
        rc = main([*b.argv, *argv])
    finally:
        sys.stdout, sys.argv = real_stdout, real_argv
        held.close_partial()
    figures = held.objects[0] if len(held.objects) == 1 else (held.objects or None)
    return rc or 0, figures


def run_function(b: Bench, args) -> dict:
    function = getattr(importlib.import_module(f"bench.{b.module}"), b.function)
    given = {"quick": args.quick, "device": args.device, "threads": args.threads, "batch": args.batch,
             "cases": tuple(args.cases.split(",")) if args.cases else None}
    takes = inspect.signature(function).parameters
    return function(**{k: v for k, v in given.items() if k in takes and (k == "quick" or v is not None)})


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench", formatter_class=argparse.RawDescriptionHelpFormatter,
                                description=__doc__.split("\n\n")[0],
                                epilog="\n".join(f"  {k:10s} {b.help}" for k, b in BENCHES.items()))
    p.add_argument("name", choices=[*BENCHES, "all"], metavar="NAME", help="a benchmark below, or all")
    p.add_argument("--json", action="store_true", help="print each record on one line")
    p.add_argument("--quick", action="store_true", help="a smaller run (for smoke tests)")
    p.add_argument("--device", help="where benchmarks that can run on a GPU run (cpu or cuda; default cpu)")
    p.add_argument("--threads", type=int, help="blocks: torch CPU threads (1 gives steadier ratios on a busy machine)")
    p.add_argument("--batch", type=int, help="blocks: the batch")
    p.add_argument("--cases", help="blocks: comma-separated cases")
    return p


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    name = next((a for a in argv if not a.startswith("-")), None)
    if name in BENCHES and BENCHES[name].function == "main":  # a script takes its own flags
        rest = [a for a in argv if a != name]
        as_json = "--json" in rest
        rc, figures = run_script(name, [a for a in rest if a != "--json"])
        if figures is not None:
            print(json.dumps(record(name, figures), indent=None if as_json else 1), flush=True)
        return rc
    args = parser().parse_args(argv)
    for name in QUICK if args.name == "all" else [args.name]:
        if BENCHES[name].function == "main":
            parser().error(f"{name} takes its own flags: python -m bench {name} --help")
        figures = run_function(BENCHES[name], args)
        print(json.dumps(record(name, figures), indent=None if args.json else 1), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
