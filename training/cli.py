"""`siclip train`: arguments; the loop is in training.loop."""

from __future__ import annotations

import argparse
import dataclasses
import json
import textwrap

# the multi-GPU command: Accelerate's launcher starts one `python -m siclip` process per GPU
LAUNCH = "accelerate launch --multi_gpu --num_processes 2 -m siclip train --data DATA --config paper --out RUN"


def config_keys() -> list[str]:
    """Every key `--set` reaches, as it spells them, from the config classes (so --help cannot drift from them)."""
    from siclip.training.config import LossWeights, StageConfig, TrainConfig

    def names(cls, prefix: str, nested: tuple[str, ...]) -> list[str]:
        return [prefix + f.name for f in dataclasses.fields(cls) if f.name not in nested]

    return (names(TrainConfig, "", ("stages",)) + names(StageConfig, "stages.N.", ("loss",))
            + names(LossWeights, "stages.N.loss.", ()))


def epilog(width: int = 100) -> str:
    def para(text: str) -> str:
        return textwrap.fill(" ".join(text.split()), width)

    return "\n\n".join([
        para("several GPUs: Accelerate's launcher starts one process per GPU; batch_size stays the global batch, "
             "and every contrastive term sees all of it:"),
        "  " + LAUNCH,
        para("precision = \"auto\" (the default) takes Accelerate's choice when it has one (accelerate launch "
             "--mixed_precision bf16, or the file `accelerate config` writes; accelerate launch without either "
             "chooses 'no'), else bf16 on a GPU that has it, fp16 on one without, fp32 on a CPU; the start line "
             "and RUN/data.json say which ran. A precision the config names wins."),
        para("tracking: --set report_to=tensorboard (event files in RUN/tracking/), wandb, mlflow, … (several: "
             "report_to=tensorboard,wandb) get the records of RUN/metrics.jsonl through Accelerate's trackers."),
        para("config keys (--set KEY=VALUE, or the TOML file; each explained in docs/config.md): "
             + ", ".join(config_keys())),
    ])


def add_arguments(parser) -> None:
    parser.description = textwrap.fill(
        "Train a SiCLIP model on a data root's shards (with their caption and teacher sidecars), in the stages of a "
        "training config. Checkpoints count against the storage budget; --resume continues a run at the exact next "
        "sample.", 100)
    parser.epilog = epilog()
    parser.formatter_class = argparse.RawDescriptionHelpFormatter  # keeps the command on one line
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
