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
    parser.add_argument("--imagefolder", type=Path, metavar="DIR", help="zero-shot: a folder of class sub-folders")
    parser.add_argument("--retrieval", nargs="?", const="", metavar="DATA",
                        help="retrieval on held-out shards of DATA (default: the run's data root and val_shards); "
                             "the default when --imagefolder is not given")
    parser.add_argument("--templates", type=Path, metavar="FILE", help="prompt templates, one per line with {}")
    parser.add_argument("--json", action="store_true", help="print one JSON object")


def _run_folder(args) -> Path:
    from manifests.errors import SiclipError

    run = Path(args.run)
    if not run.is_dir() and args.data:
        run = Path(args.data) / "runs" / args.run
    if not run.is_dir():
        raise SiclipError(f"--run {args.run}: no such run folder" + ("" if args.data else " (pass --data DATA to find it by name)"))
    return run


def run(args) -> int:
    import torch

    from manifests.errors import SiclipError
    from manifests.layout import DataRoot
    from training.data import all_shards
    from training.evaluate import load, read_templates, retrieval, zeroshot
    from training.runs import checkpoint_name

    run_dir = _run_folder(args)
    target = run_dir
    if args.checkpoint is not None:
        target = run_dir / "checkpoints" / checkpoint_name(args.checkpoint)
        if not (target / "state.json").is_file():
            have = sorted(p.name for p in (run_dir / "checkpoints").glob("step-*")) if (run_dir / "checkpoints").is_dir() else []
            raise SiclipError(f"--checkpoint {args.checkpoint}: {target} is not a checkpoint of the run (it has: "
                              f"{', '.join(have) or 'none'})")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model, tokenizer, preprocess = load(target, device)
    result = {}
    if args.imagefolder:
        result["zeroshot"] = zeroshot(model, tokenizer, preprocess, args.imagefolder, read_templates(args.templates),
                                      device)
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
        result["retrieval"] = retrieval(model, root, chosen, preprocess, model.config.text.context_length, device)
    if args.json:
        print(json.dumps(result))
    else:
        print(f"eval of {target}:")
        for part, metrics in result.items():
            print(f"  {part}: " + ", ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}"
                                             for k, v in metrics.items()))
    return 0
