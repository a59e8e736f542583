"""`siclip eval`: zero-shot classification on a folder of classes, retrieval on held-out shards."""

from __future__ import annotations

import json
import sys
from pathlib import Path


def add_arguments(parser) -> None:
    parser.description = ("Evaluate a trained run: zero-shot classification on a folder of class sub-folders "
                          "and/or image<->text retrieval on the run's held-out shards.")
    parser.add_argument("--run", required=True, metavar="RUN", help="run folder, or its name under DATA/runs/ with --data")
    parser.add_argument("--data", metavar="DATA", help="data root the run lives in (to find --run by name)")
    parser.add_argument("--checkpoint", type=int, metavar="STEP", help="a checkpoint of the run (default: its final "
                                                                       "model, else its latest checkpoint)")
    parser.add_argument("--imagefolder", type=Path, action="append", metavar="DIR",
                        help="zero-shot: a folder of class sub-folders (its templates.txt, if any, gives its prompts); "
                             "repeatable, one result per folder")
    parser.add_argument("--retrieval", nargs="?", const="", metavar="DATA",
                        help="retrieval on held-out shards of DATA (default: the run's data root and val_shards); "
                             "the default when --imagefolder is not given")
    parser.add_argument("--templates", type=Path, metavar="FILE",
                        help="prompt templates, one per line with {}, for every folder (default: each folder's "
                             "templates.txt, else photo prompts)")
    parser.add_argument("--json", action="store_true", help="print one JSON object")


def run(args) -> int:
    import torch

    from siclip.manifests.errors import SiclipError
    from siclip.manifests.layout import DataRoot
    from siclip.training.data import all_shards
    from siclip.training.evaluate import load, read_templates, retrieval, zeroshot
    from siclip.training.runs import checkpoint_name, run_folder

    run_dir = run_folder(args.run, args.data)
    target = run_dir
    if args.checkpoint is not None:
        target = run_dir / "checkpoints" / checkpoint_name(args.checkpoint)
        if not (target / "state.json").is_file():
            have = sorted(p.name for p in (run_dir / "checkpoints").glob("step-*")) if (run_dir / "checkpoints").is_dir() else []
            raise SiclipError(f"--checkpoint {args.checkpoint}: {target} is not a checkpoint of the run (it has: "
                              f"{', '.join(have) or 'none'})")
    templates = [read_templates(args.templates, folder) for folder in args.imagefolder or []]  # before the model
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model, tokenizer, preprocess = load(target, device)
    result = {}
    if args.imagefolder:
        names = folder_names(args.imagefolder)
        per_folder = {name: zeroshot(model, tokenizer, preprocess, folder, prompts, device)
                      for name, folder, prompts in zip(names, args.imagefolder, templates)}
        # one folder keeps the documented shape {"zeroshot": {metrics}}; several are keyed by folder name
        result["zeroshot"] = per_folder[names[0]] if len(names) == 1 else per_folder
    if args.retrieval is not None or not args.imagefolder:
        info = json.loads((run_dir / "data.json").read_text()) if (run_dir / "data.json").is_file() else {}
        data = Path(args.retrieval) if args.retrieval else Path(info.get("data_root") or args.data or run_dir.parents[1])
        root = DataRoot(data)
        shards = all_shards(root)
        held = set(info.get("val_shards", [])) if not args.retrieval else set()
        chosen = [s for s in shards if s.name in held]
        if not chosen:
            print(f"eval: warning: {'the run held out no shards' if not args.retrieval else 'another data root'}; "
                  f"retrieval over all {len(shards)} shards of {root.root}"
                  + (", which the run trained on" if not args.retrieval else ""), file=sys.stderr)
            chosen = shards
        result["retrieval"] = retrieval(model, root, chosen, preprocess, model.config.text.context_length, device,
                                        where=f"eval of {target}", progress=True)
    if args.json:
        print(json.dumps(result))
    else:
        print(f"eval of {target}:\n{table(result, folder_names(args.imagefolder or []))}")
    return 0


def folder_names(folders: list[Path]) -> list[str]:
    """Each folder's name, or its whole path where two share a name."""
    names = [Path(f).name for f in folders]
    return [n if names.count(n) == 1 else str(f) for n, f in zip(names, folders)]


def table(result: dict, names: list[str]) -> str:
    """The eval as a small table: one row per zero-shot folder, then retrieval beside chance."""
    lines = []
    if "zeroshot" in result:
        per_folder = {names[0]: result["zeroshot"]} if len(names) == 1 else result["zeroshot"]
        lines.append(f"  {'zero-shot':<22}{'classes':>8}{'images':>8}{'top-1':>8}{'top-5':>8}{'recall':>8}{'chance':>8}")
        for name, m in per_folder.items():
            lines.append(f"  {name:<22}{m['classes']:>8}{m['images']:>8}{m['top1']:>8.3f}{m['top5']:>8.3f}"
                         f"{m['mean_per_class_recall']:>8.3f}{m['chance_top1']:>8.3f}"
                         + (f"  ({m['unreadable']} unreadable, skipped)" if m.get("unreadable") else ""))
    if "retrieval" in result:
        r = result["retrieval"]
        lines.append(f"  {'retrieval':<22}{'pairs':>8}{'R@1':>8}{'R@5':>8}{'R@10':>8}{'':>8}{'chance':>8}")
        for way in ("i2t", "t2i"):
            label = "image -> text" if way == "i2t" else "text -> image"
            lines.append(f"  {label:<22}{r['samples']:>8}{r[f'{way}_r1']:>8.3f}{r[f'{way}_r5']:>8.3f}"
                         f"{r[f'{way}_r10']:>8.3f}{'':>8}{r['chance_r1']:>8.3f}")
        if r.get("unreadable"):
            lines.append(f"  ({r['unreadable']} held-out sample{'s' * (r['unreadable'] > 1)} with an unreadable image, "
                         f"skipped)")
    return "\n".join(lines)
