"""`siclip eval`: zero-shot classification on folders of classes, retrieval on held-out shards or on COCO/Flickr30k
in Karpathy's split files, of a trained run or of a baseline (open_clip, transformers) through the same code."""

from __future__ import annotations

import json
import sys
from pathlib import Path

BASELINE_PREFIXES = ("open_clip:", "hf:")


def add_arguments(parser) -> None:
    parser.description = ("Evaluate a trained run, or a baseline the same way: zero-shot classification on folders "
                          "of class sub-folders, image<->text retrieval on the run's held-out shards, and retrieval "
                          "on COCO or Flickr30k in Karpathy's split files (5 captions per image). The JSON carries "
                          "CLIP_benchmark's keys too (acc1, acc5, mean_per_class_recall, image_retrieval_recall@K, "
                          "text_retrieval_recall@K).")
    which = parser.add_mutually_exclusive_group(required=True)
    which.add_argument("--run", metavar="RUN", help="run folder, or its name under DATA/runs/ with --data")
    which.add_argument("--model", metavar="NAME",
                       help="a run (as --run), or a baseline: open_clip:ARCH/PRETRAINED or open_clip:FOLDER (extra "
                            "siclip[mobileclip]), hf:FOLDER or hf:ORG/NAME (a transformers CLIP model)")
    parser.add_argument("--data", metavar="DATA", help="data root the run lives in (to find --run by name)")
    parser.add_argument("--checkpoint", type=int, metavar="STEP", help="a checkpoint of the run (default: its final "
                                                                       "model, else its latest checkpoint)")
    parser.add_argument("--imagefolder", type=Path, action="append", metavar="DIR",
                        help="zero-shot: a folder of class sub-folders (its templates.txt, if any, gives its prompts); "
                             "repeatable, one result per folder")
    parser.add_argument("--classnames", metavar="FILE",
                        help="zero-shot class names for every folder: 'imagenet' (shipped: ImageNet-1k's, for folders "
                             "named by WordNet id such as n01440764), or a file: one name per line in the sorted "
                             "order of the class folders, FOLDER<TAB>NAME lines, 'n01440764 NAME' lines, or JSON "
                             "(default: the folder names, _ read as a space)")
    parser.add_argument("--templates", metavar="FILE",
                        help="prompt templates for every folder: 'openai' (shipped: OpenAI's 80 ImageNet templates), "
                             "'simple' (their 7-template subset), or a file, one per line with {} (default: each "
                             "folder's templates.txt, else photo prompts)")
    parser.add_argument("--retrieval", nargs="?", const="", metavar="DATA",
                        help="retrieval on held-out shards of DATA (default: the run's data root and val_shards; "
                             "a baseline: every shard of DATA); the default when neither --imagefolder nor "
                             "--retrieval-json is given")
    parser.add_argument("--retrieval-json", type=Path, metavar="FILE",
                        help="retrieval on COCO or Flickr30k in Karpathy's split form (dataset_coco.json, "
                             "dataset_flickr30k.json), images under --images")
    parser.add_argument("--images", type=Path, metavar="DIR",
                        help="the images of --retrieval-json (at DIR/FILEPATH/FILENAME, else DIR/FILENAME)")
    parser.add_argument("--split", default="test", help="the split of --retrieval-json (default: test)")
    parser.add_argument("--captions-per-image", type=int, default=5, metavar="N",
                        help="captions per image of --retrieval-json, the first N (default: 5; 0: all)")
    parser.add_argument("--batch-size", type=int, default=64, metavar="N", help="images or texts per batch (default 64)")
    parser.add_argument("--json", action="store_true", help="print one JSON object")


def run(args) -> int:
    import torch

    from siclip.manifests.errors import SiclipError
    from siclip.training.evaluate import karpathy_retrieval, karpathy_set, zeroshot_results, zeroshot_set

    if (args.retrieval_json is None) != (args.images is None):
        raise SiclipError("--retrieval-json and --images go together: the split file and the folder of its images")
    if args.batch_size < 1 or args.captions_per_image < 0:
        raise SiclipError("--batch-size must be at least 1 and --captions-per-image 0 or more")
    run_dir, target = model_folder(args)
    # every input is read before the model loads, so a mistake costs no model load
    sets = [zeroshot_set(folder, args.classnames, args.templates) for folder in args.imagefolder or []]
    captions = karpathy_set(args.retrieval_json, args.images, args.split, args.captions_per_image) \
        if args.retrieval_json else None
    shards = args.retrieval is not None or not (sets or captions)
    if run_dir is None and shards and not (args.retrieval or args.data):
        raise SiclipError(f"--model {args.model}: a baseline has no held-out shards; give --imagefolder, "
                          f"--retrieval-json or --retrieval DATA")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model, encoder = load_encoder(args.model, target, device)
    result = {}
    if sets:
        result["zeroshot"] = zeroshot_results(encoder, sets)
    if shards:
        result["retrieval"] = shard_result(args, run_dir, model, encoder, target, device)
    if captions:
        result["retrieval_json"] = karpathy_retrieval(encoder, captions, args.batch_size)
    if args.json:
        print(json.dumps(result))
    else:
        print(f"eval of {target or encoder.name}:\n{table(result, [s.folder for s in sets])}")
    return 0


def model_folder(args) -> tuple[Path | None, Path | None]:
    """(run folder, the model folder to load) of --run, or of --model when it names a run; (None, None) for a
    baseline."""
    from siclip.manifests.errors import SiclipError
    from siclip.teachers import find_checkpoint
    from siclip.training.runs import checkpoint_name, run_folder

    name = args.run
    if name is None and not args.model.startswith(BASELINE_PREFIXES):
        places = ([Path(args.data) / "runs" / args.model] if args.data else []) + [Path(args.model).expanduser()]
        name = next((str(p) for p in places if find_checkpoint(p) is not None), None)
    if name is None:
        if args.checkpoint is not None:
            raise SiclipError(f"--checkpoint {args.checkpoint}: --model {args.model} is not a siclip run")
        return None, None
    run_dir = run_folder(name, args.data)
    target = run_dir
    if args.checkpoint is not None:
        target = run_dir / "checkpoints" / checkpoint_name(args.checkpoint)
        if not (target / "state.json").is_file():
            have = sorted(p.name for p in (run_dir / "checkpoints").glob("step-*")) if (run_dir / "checkpoints").is_dir() else []
            raise SiclipError(f"--checkpoint {args.checkpoint}: {target} is not a checkpoint of the run (it has: "
                              f"{', '.join(have) or 'none'})")
    return run_dir, target


def load_encoder(spec: str | None, target: Path | None, device: str):
    """(the siclip model or None, the encoder the evaluations use) of a run's model folder, or of a baseline."""
    from siclip.manifests.errors import SiclipError
    from siclip.teachers import load_teacher, parse_teacher
    from siclip.training.evaluate import ModelEncoder, TeacherEncoder, load

    if target is not None:
        model, tokenizer, preprocess = load(target, device)
        return model, ModelEncoder(model, tokenizer, preprocess, device, f"siclip {target}")
    named = parse_teacher(spec, what="--model")
    if named.kind not in ("transformers", "open_clip", "siclip"):
        raise SiclipError(f"--model {spec!r} is not a model to evaluate: give a run, open_clip:ARCH/PRETRAINED or "
                          f"hf:FOLDER")
    return None, TeacherEncoder(load_teacher(named, what="--model").to(device))


def shard_result(args, run_dir, model, encoder, target, device) -> dict:
    """Retrieval on shards: a run's held-out shards (or all of --retrieval DATA); a baseline on all of DATA."""
    from siclip.manifests.layout import DataRoot
    from siclip.training.data import all_shards
    from siclip.training.evaluate import retrieval, shard_retrieval

    info = json.loads((run_dir / "data.json").read_text()) if run_dir and (run_dir / "data.json").is_file() else {}
    data = Path(args.retrieval) if args.retrieval else Path(info.get("data_root") or args.data or run_dir.parents[1])
    root = DataRoot(data)
    shards = all_shards(root)
    if model is None:  # a baseline trained on none of them
        return shard_retrieval(encoder, shards, args.batch_size, where=f"eval of {encoder.name}", progress=True)
    held = set(info.get("val_shards", [])) if not args.retrieval else set()
    chosen = [s for s in shards if s.name in held]
    if not chosen:
        print(f"eval: warning: {'the run held out no shards' if not args.retrieval else 'another data root'}; "
              f"retrieval over all {len(shards)} shards of {root.root}"
              + (", which the run trained on" if not args.retrieval else ""), file=sys.stderr)
        chosen = shards
    return retrieval(model, root, chosen, encoder.preprocess, model.config.text.context_length, device,
                     batch_size=args.batch_size, where=f"eval of {target}", progress=True)


def table(result: dict, folders: list) -> str:
    """The eval as a small table: one row per zero-shot folder, then retrieval beside chance."""
    from siclip.training.evaluate import folder_names

    names = folder_names(folders)
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
        lines += retrieval_rows("retrieval", "pairs", r)
        if r.get("unreadable"):
            lines.append(f"  ({r['unreadable']} held-out sample{'s' * (r['unreadable'] > 1)} with an unreadable image, "
                         f"skipped)")
    if "retrieval_json" in result:
        r = result["retrieval_json"]
        lines += retrieval_rows(f"{r['dataset']} {r['split']}", "images", r)
        lines.append(f"  ({r['captions']:,} captions" + (f"; {r['unreadable']} unreadable images skipped with theirs)"
                                                        if r.get("unreadable") else ")"))
    return "\n".join(lines)


def retrieval_rows(title: str, count: str, r: dict) -> list[str]:
    rows = [f"  {title:<22}{count:>8}{'R@1':>8}{'R@5':>8}{'R@10':>8}{'':>8}{'chance':>8}"]
    for way in ("i2t", "t2i"):
        label = "image -> text" if way == "i2t" else "text -> image"
        rows.append(f"  {label:<22}{r['samples']:>8}{r[f'{way}_r1']:>8.3f}{r[f'{way}_r5']:>8.3f}"
                    f"{r[f'{way}_r10']:>8.3f}{'':>8}{r['chance_r1']:>8.3f}")
    return rows
