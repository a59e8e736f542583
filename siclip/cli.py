"""The `siclip` command, on top of every stage (docs/design.md, layer 4): it hands each subcommand to its stage.

Each stage has a command module with `add_arguments(parser)` and `run(args) -> int` that imports only its config
at the top, so building the parser stays light; the work (torch, img2dataset, dask) is imported by `run`.
"""

from __future__ import annotations

import argparse
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


# The benchmarks live in the checkout's bench/, which nothing installed imports (docs/design.md)
MOVED_BENCH = "benchmarks run from a source checkout: python -m bench NAME (python -m bench --help lists them)"


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

    p = sub.add_parser("bench", help=MOVED_BENCH, description=MOVED_BENCH, add_help=False)
    p.add_argument("rest", nargs=argparse.REMAINDER)
    p.set_defaults(handler=_moved_bench)
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


def _moved_bench(args) -> int:
    raise SiclipError(MOVED_BENCH)


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
