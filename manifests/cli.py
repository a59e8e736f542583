"""The `siclip` command: a thin layer that hands each subcommand to its stage.

Each stage package has a `cli` module with `add_arguments(parser)` and `run(args) -> int`; those
modules import only light things at the top, so `siclip --help` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import json
import sys

from siclip.manifests.errors import SiclipError

# subcommand -> (module with add_arguments/run, one-line help)
STAGE_COMMANDS = {
    "shards": ("siclip.pipeline.cli", "stage 1: download a URL list into webdataset shards under a storage budget"),
    "captions": ("siclip.captioning.cli", "stage 2: synthetic captions into Arrow sidecars, fanned out on dask"),
    "teacher": ("siclip.captioning.teacher_cli", "stage 2b: CLIP teacher embeddings into Arrow sidecars"),
    "train": ("siclip.training.cli", "stage 3: train a SiCLIP model with Accelerate"),
    "eval": ("siclip.training.eval_cli", "zero-shot classification and retrieval of a trained model"),
    "export": ("siclip.training.export_cli", "a trained pre-LN run as a transformers CLIPModel folder"),
}
BENCHES = {
    "shards": ("siclip.pipeline.bench", "bench_shards", "siclip shards against raw img2dataset.download"),
    "captions": ("siclip.captioning.bench", "bench_captions", "siclip captions against a transformers pipeline"),
    "coca": ("siclip.captioning.bench", "bench_coca", "siclip captions with the seed's CoCa ViT-L/14 (random weights): "
             "images/s for 3 captions (extra siclip[mobileclip])"),
    "blocks": ("siclip.training.bench", "bench_blocks", "SAS-P blocks with sharing against pre-LN blocks"),
    "train": ("siclip.training.bench_train", "bench_train",
              "siclip train against a plain PyTorch loop; the loader; gradient caching's memory; --device cuda: the "
              "paper preset"),
}


def _stage_module(name: str):
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as e:
        if e.name and name.startswith(e.name):
            return None  # the stage is not built yet
        raise


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="siclip", description="Train a small CLIP model on one GPU and one TB of disk.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for cmd, (modname, help_) in STAGE_COMMANDS.items():
        mod = _stage_module(modname)
        p = sub.add_parser(cmd, help=help_ if mod else f"{help_} (not built yet)", description=help_)
        if mod is not None:
            mod.add_arguments(p)
        p.set_defaults(stage_module=modname, stage_built=mod is not None)

    p = sub.add_parser("manifest", help="storage accounting per stage against the budget; --verify re-hashes",
                       description="Print what every stage made and what it cost, against the storage budget.")
    p.add_argument("data", help="data root")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    p.add_argument("--verify", action="store_true", help="re-hash every listed file; exit 1 naming each missing or corrupt one")
    p.add_argument("--repair", action="store_true",
                   help="with --verify: drop each damaged unit from its manifest and delete its files, so that its "
                        "stage's rerun redoes it; exit 0 once what is left is whole")
    p.set_defaults(handler=_run_manifest)

    p = sub.add_parser("bench", help="benchmarks against a named baseline, measured in the same run",
                       description="Benchmarks: " + "; ".join(f"{k}: {v[2]}" for k, v in BENCHES.items()))
    p.add_argument("name", choices=sorted(BENCHES) + ["all"])
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--quick", action="store_true", help="a smaller run (for smoke tests)")
    p.add_argument("--device", default="cpu", help="where benches that can run on a GPU run (cpu or cuda)")
    p.set_defaults(handler=_run_bench)
    return parser


def _run_manifest(args) -> int:
    from siclip.manifests.inspect import damaged, repair, summary, table
    from siclip.manifests.layout import open_data_root

    root = open_data_root(args.data, write=args.repair)
    if args.repair and not args.verify:
        raise SiclipError("--repair drops what --verify finds damaged: pass both")
    info = summary(root)
    if not args.verify:
        print(json.dumps(info) if args.json else table(info))
        return 0
    problems = damaged(root)
    for stage, _, rel, bad in problems:
        print(f"verify: {stage}: {root.root / rel}: {bad}", file=sys.stderr)
    n = sum(s["files"] for s in info["stages"].values())
    print(f"verify: {n - len(problems)}/{n} files ok, {len(problems)} missing or corrupt", file=sys.stderr)
    if not (args.repair and problems):
        print(json.dumps(info) if args.json else table(info))
        return 1 if problems else 0
    dropped = repair(root, problems, log=lambda line: print(line, file=sys.stderr))
    units = sum(len(u) for u in dropped.values())
    print(f"repair: {units} unit(s) dropped ({', '.join(f'{s} {len(u)}' for s, u in dropped.items())}); the data "
          f"root lists only whole files now: rerun the stages in order to redo them", file=sys.stderr)
    print(json.dumps(summary(root)) if args.json else table(summary(root)))  # what is left
    return 0


def _run_bench(args) -> int:
    names = sorted(BENCHES) if args.name == "all" else [args.name]
    results = {}
    for name in names:
        modname, fn, _ = BENCHES[name]
        mod = _stage_module(modname)
        if mod is None:
            raise SiclipError(f"bench {name}: not built yet")
        bench = getattr(mod, fn)
        kwargs = {"device": args.device} if "device" in inspect.signature(bench).parameters else {}
        results[name] = bench(quick=args.quick, **kwargs)
    out = results[names[0]] if len(names) == 1 else results
    print(json.dumps(out) if args.json else json.dumps(out, indent=1))
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if hasattr(args, "handler"):
            return args.handler(args)
        if not args.stage_built:
            print(f"siclip {args.command}: not built yet", file=sys.stderr)
            return 2
        return importlib.import_module(args.stage_module).run(args)
    except SiclipError as e:
        print(f"siclip {args.command}: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # the disk refused a write no stage names itself: still one line, and nothing lost
        from siclip.manifests.io import disk_error

        err = disk_error(e, e.filename or "a file under the data root")
        if err is None:
            raise
        print(f"siclip {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"siclip {args.command}: interrupted; rerun the same command to resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
