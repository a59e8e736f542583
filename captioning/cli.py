"""`siclip captions`: N synthetic captions per image into DATA/captions/<shard>.arrow, one dask task per shard."""

from __future__ import annotations

from siclip.config import add_config_arguments, config_from_args

from siclip.captioning.config import CAPTIONS_TOML, CaptionsConfig


def add_arguments(parser) -> None:
    add_config_arguments(parser, CaptionsConfig, CAPTIONS_TOML)


def run(args) -> int:
    cfg = config_from_args(CaptionsConfig, args)
    return run_config(cfg)


def run_config(cfg: CaptionsConfig) -> int:
    from functools import partial

    from siclip.captioning.fanout import local_cluster_threads
    from siclip.captioning.jobs import build_captioner, caption_shard
    from siclip.captioning.stage import StageJob, run_stage

    threads = cfg.threads_per_worker or local_cluster_threads(max(cfg.workers, 1))
    job = StageJob(
        stage="captions", cfg=cfg, params=cfg.generation_params(),
        setup=partial(build_captioner, params=cfg.generation_params(), device=cfg.device, dtype=cfg.dtype,
                      trust_remote_code=cfg.trust_remote_code, threads=threads),
        job=caption_shard,
        # key and status (~24 B) plus up to max_new_tokens words of ~6 B per caption, before compression
        bytes_per_row=64 + cfg.num_captions * (16 + 6 * cfg.max_new_tokens))
    return run_stage(job)
