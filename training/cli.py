"""`siclip train`: arguments; the loop is in training.loop."""

from __future__ import annotations

import json


def add_arguments(parser) -> None:
    parser.description = ("Train a SiCLIP model on a data root's shards (with their caption and teacher sidecars), "
                          "in the stages of a training config. Checkpoints count against the storage budget; "
                          "--resume continues a run at the exact next sample.")
    parser.add_argument("--data", required=True, metavar="DATA", help="data root (holds shards/ and manifests/)")
    parser.add_argument("--config", default="tiny", metavar="FILE|NAME",
                        help="training config: a TOML file or a name in training/configs/ (default: tiny)")
    parser.add_argument("--out", metavar="RUN", help="run folder: a name under DATA/runs/ or a path inside DATA "
                                                     "(default: the config's name)")
    parser.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config key (stages.0.lr=5e-4, stages.1.loss.fd=2000); repeatable")
    parser.add_argument("--max-steps", type=int, metavar="N", help="stop after step N (a checkpoint is written); "
                                                                    "--resume goes on later")
    parser.add_argument("--resume", action="store_true", help="continue the run from its latest checkpoint "
                                                              "(start it when it has none)")
    parser.add_argument("--json", action="store_true", help="at the end, one line of JSON on stdout: steps, samples/s, "
                                                            "the last logged losses, the last eval, the run's paths")


def run(args) -> int:
    from siclip.manifests.errors import SiclipError
    from siclip.manifests.layout import open_data_root
    from siclip.training.config import find_config, load_train_config
    from siclip.training.loop import train

    if args.max_steps is not None and args.max_steps < 1:
        raise SiclipError(f"--max-steps must be at least 1, got {args.max_steps}")
    open_data_root(args.data)  # a folder it can write its run into, or one line saying why not
    cfg = load_train_config(args.config, args.sets)
    result = train(cfg, args.data, args.out, max_steps=args.max_steps, resume=args.resume,
                   config_name=find_config(args.config).stem)
    if args.json and result.summary:  # the main process's: one line, whatever the number of processes
        print(json.dumps(result.summary), flush=True)
    return result.status
