"""open_clip_train's own entry point, as `python -m open_clip_train.main` runs it, with two additions for
`make bench-peer`: the model configs of bench/configs/open_clip/ registered (ViT-peer-tiny-preln, the shape of
siclip's tiny_preln preset), and log timestamps to the millisecond, so that samples/s can be read from the log
over the same window as siclip's metrics give it. One shim lets it read shards with the webdataset siclip
installs (see `shard_ends_unmarked`).

    python bench/open_clip_peer.py --model ViT-peer-tiny-preln --train-data … (open_clip_train.main's flags)
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

MODEL_CONFIGS = Path(__file__).resolve().parent / "configs" / "open_clip"
LOG_FORMAT = "%(asctime)s.%(msecs)03d | %(levelname)s | %(message)s"  # open_clip's own, plus milliseconds
DATE_FORMAT = "%Y-%m-%d,%H:%M:%S"


def register_models() -> None:
    """Make the benchmark's model configs known to open_clip by name."""
    import open_clip

    open_clip.add_model_config(MODEL_CONFIGS)


def shard_ends_unmarked() -> None:
    """webdataset 0.2.87 and later end each shard's stream of files with an empty record; open_clip_train 3.3,
    written for webdataset <= 0.2.86 (its `training` extra's pin), reads that record as a file and stops with
    KeyError 'fname'. siclip needs webdataset >= 0.2.100, so open_clip_train's tar reader is given the stream
    without the marker, which is the stream it was written for."""
    import functools

    import open_clip_train.data as data
    from webdataset.tariterators import tar_file_expander

    data.tar_file_expander = functools.partial(tar_file_expander, eof_value=None)


def with_milliseconds(setup_logging):
    """open_clip_train's setup_logging, then its handlers' timestamps carried to the millisecond."""

    def setup(*args, **kwargs):
        setup_logging(*args, **kwargs)
        for handler in logging.root.handlers:
            handler.setFormatter(logging.Formatter(LOG_FORMAT, datefmt=DATE_FORMAT))

    return setup


def main(argv: list[str]) -> int:
    import open_clip_train.main as train_main

    register_models()
    shard_ends_unmarked()
    train_main.setup_logging = with_milliseconds(train_main.setup_logging)
    status = train_main.main(argv)  # -1 when the experiment's log exists already
    return 0 if status is None else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
