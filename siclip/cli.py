"""The `siclip` command, on top of every stage (docs/design.md, layer 4): it hands each subcommand to its stage.

Each stage has a command module with `add_arguments(parser)` and `run(args) -> int` that imports only its config
at the top, so building the parser stays light; the work (torch, img2dataset, dask) is imported by `run`.
"""

from __future__ import annotations

import argparse
import inspect
import json
import sys
from pathlib import Path

from siclip.manifests.errors import SiclipError


def stage_commands() -> list:
    """(subcommand, its stage's command module, one-line help), in the order `siclip --help` lists them."""
    from siclip.captioning import cli as captions
    from siclip.captioning import teacher_cli as teacher
    from siclip.pipeline import cli as shards
    from siclip.training import cli as train
    from siclip.training import eval_cli, export_cli

    return [
        ("shards", shards, "stage 1: download a URL list into webdataset shards under a storage budget (or "
                   "--adopt shards made elsewhere)"),
        ("captions", captions, "stage 2: synthetic captions into Arrow sidecars, fanned out on dask"),
        ("teacher", teacher, "stage 2b: CLIP teacher embeddings into Arrow sidecars"),
        ("train", train, "stage 3: train a SiCLIP model with Accelerate"),
        ("eval", eval_cli, "zero-shot classification and retrieval of a trained model or a baseline"),
        ("export", export_cli, "a trained run as a Hugging Face folder that loads without siclip"),
    ]


BENCHES = {  # name -> one-line help; `bench_function` imports each
    "shards": "siclip shards against raw img2dataset.download",
    "captions": "siclip captions against a transformers pipeline",
    "coca": "siclip captions with the seed's CoCa ViT-L/14 (random weights): images/s for 3 captions (extra "
            "siclip[mobileclip])",
    "blocks": "SAS-P blocks with sharing against pre-LN blocks",
    "train": "siclip train against a plain PyTorch loop; the loader; gradient caching's memory; --device cuda: the "
             "paper preset",
}


def bench_function(name: str):
    """The function that runs bench `name` (imported only when that bench runs)."""
    if name == "shards":
        from siclip.pipeline.bench import bench_shards as bench
    elif name == "captions":
        from siclip.captioning.bench import bench_captions as bench
    elif name == "coca":
        from siclip.captioning.bench import bench_coca as bench
    elif name == "blocks":
        from siclip.training.bench import bench_blocks as bench
    elif name == "train":
        from siclip.training.bench_train import bench_train as bench
    else:
        raise SiclipError(f"bench {name!r}: no such bench (one of {', '.join(BENCHES)})")
    return bench


def version(checkout: Path = Path(__file__).resolve().parents[1]) -> str:
    """The version of the code that runs: a source checkout's pyproject.toml, else the installed package's."""
    pyproject = checkout / "pyproject.toml"
    if pyproject.is_file() and (checkout / "siclip" / "cli.py").is_file():
        try:
            import tomllib
        except ModuleNotFoundError:  # Python 3.10
            import tomli as tomllib
        project = tomllib.loads(pyproject.read_text()).get("project", {})
        if project.get("name") == "siclip" and "version" in project:
            return str(project["version"])
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as installed

    try:
        return installed("siclip")
    except PackageNotFoundError:
        return "unknown (neither installed nor a source checkout)"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="siclip", description="Train a small CLIP model on one GPU and one TB of disk.")
    parser.add_argument("--version", action="version", version=f"siclip {version()}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for cmd, module, help_ in stage_commands():
        p = sub.add_parser(cmd, help=help_, description=help_)
        module.add_arguments(p)
        p.set_defaults(handler=module.run)

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
                       description="Benchmarks: " + "; ".join(f"{k}: {v}" for k, v in BENCHES.items()))
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
        bench = bench_function(name)
        kwargs = {"device": args.device} if "device" in inspect.signature(bench).parameters else {}
        results[name] = bench(quick=args.quick, **kwargs)
    out = results[names[0]] if len(names) == 1 else results
    print(json.dumps(out) if args.json else json.dumps(out, indent=1))
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.handler(args)
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
