"""`siclip shards` arguments; the work is in pipeline.stage."""

from __future__ import annotations

from siclip.config import add_config_arguments, config_from_args
from siclip.pipeline.config import DEFAULT_CONFIG, ShardsConfig


def add_arguments(parser) -> None:
    parser.description = ("Download an image-text URL list with img2dataset into webdataset shards under DATA/shards, "
                          "under a storage budget planned on a pilot shard and enforced per shard. Rerun to resume. With --adopt, "
                          "take in the tars of an img2dataset output folder (or brace notation) made elsewhere instead.")
    add_config_arguments(parser, ShardsConfig, DEFAULT_CONFIG)


def run(args) -> int:
    from siclip.pipeline.stage import run_shards

    return run_shards(config_from_args(ShardsConfig, args))
