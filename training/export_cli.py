"""`siclip export`: a trained run as a transformers CLIPModel folder (for `siclip teacher`, `inherit_from`, or anyone)."""

from __future__ import annotations


def add_arguments(parser) -> None:
    parser.description = ("Export a trained pre-LN run (its final model, else its latest checkpoint) as a transformers "
                          "CLIPModel folder with a CLIPTokenizer and a CLIPImageProcessor. Inside a data root the "
                          "folder is recorded in the train manifest and counts against the budget; a rerun skips.")
    parser.add_argument("--run", required=True, metavar="RUN", help="run folder, a checkpoint folder, or a run name "
                                                                    "under DATA/runs/ with --data")
    parser.add_argument("--data", metavar="DATA", help="data root the run lives in (to find --run by name)")
    parser.add_argument("--out", metavar="DIR", help="the CLIPModel folder (default: RUN/clip)")


def run(args) -> int:
    from siclip.training.export import export_run
    from siclip.training.runs import run_folder

    export_run(run_folder(args.run, args.data), args.out, log=lambda msg: print(msg, flush=True))
    return 0
