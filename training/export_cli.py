"""`siclip export`: a trained run as a Hugging Face folder that loads without siclip (a CLIPModel where one can)."""

from __future__ import annotations


def add_arguments(parser) -> None:
    parser.description = ("Export a trained run (its final model, else its latest checkpoint) as a Hugging Face folder "
                          "that loads without siclip. A pre-LN run becomes a transformers CLIPModel with a "
                          "CLIPTokenizer and a CLIPImageProcessor; any other (SAS-P blocks, shared attention, a "
                          "bidirectional text tower, the MCi0 tower) a remote-code folder: modeling_siclip.py, the "
                          "CLIP tokenizer and siclip's own image preprocessing, for AutoModel and AutoProcessor "
                          ".from_pretrained(DIR, trust_remote_code=True). Inside a data root the folder is recorded "
                          "in the train manifest and counts against the budget; a rerun skips.")
    parser.add_argument("--run", required=True, metavar="RUN", help="run folder, a checkpoint folder, or a run name "
                                                                    "under DATA/runs/ with --data")
    parser.add_argument("--data", metavar="DATA", help="data root the run lives in (to find --run by name)")
    parser.add_argument("--out", metavar="DIR", help="the exported folder (default: RUN/clip)")
    parser.add_argument("--remote-code", action="store_true",
                        help="the remote-code folder even for a pre-LN run that a plain CLIPModel holds")


def run(args) -> int:
    from siclip.training.export import export_run
    from siclip.training.runs import run_folder

    export_run(run_folder(args.run, args.data), args.out, log=lambda msg: print(msg, flush=True),
               remote_code=args.remote_code)
    return 0
