"""`siclip teacher`: CLIP teacher image and text embeddings into DATA/teacher/<shard>.arrow."""

from __future__ import annotations

from manifests.config import add_config_arguments, config_from_args

from captioning.config import TEACHER_TOML, TeacherConfig


def add_arguments(parser) -> None:
    add_config_arguments(parser, TeacherConfig, TEACHER_TOML)


def run(args) -> int:
    return run_config(config_from_args(TeacherConfig, args))


def _needs_captions(root, shard: str) -> str | None:
    from manifests.manifest import StageManifest

    if StageManifest.load(root, "captions").entry_ok(root, shard):
        return None
    return f"no captions sidecar listed in {root.manifest_path('captions')} (run 'siclip captions' first, or --set captions=false)"


def run_config(cfg: TeacherConfig) -> int:
    from captioning.fanout import local_cluster_threads
    from captioning.stage import StageJob, run_stage

    threads = cfg.threads_per_worker or local_cluster_threads(max(cfg.workers, 1))
    # the embedding width is known only once the teachers load; 2 x 768 (two ViT-L/14) is the seed's ensemble
    width = 1536
    texts = 1 + (3 if cfg.captions else 0)
    job = StageJob(
        stage="teacher", cfg=cfg, params=cfg.params(),
        setup=("captioning.embed:build_teachers",
               {"names": cfg.teachers(), "device": cfg.device, "seed": cfg.seed,
                "trust_remote_code": cfg.trust_remote_code, "threads": threads}),
        job="captioning.jobs:teacher_shard",
        bytes_per_row=32 + 2 * width * (1 + cfg.augmentations + texts) + 20 * cfg.augmentations,
        needs=_needs_captions if cfg.captions else None)
    return run_stage(job)
