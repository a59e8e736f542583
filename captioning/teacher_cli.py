"""`siclip teacher`: CLIP teacher image and text embeddings into DATA/teacher/<shard>.arrow."""

from __future__ import annotations

from siclip.config import add_config_arguments, config_from_args

from siclip.captioning.config import TEACHER_TOML, TeacherConfig

# Before any sidecar exists, the size estimate rests on what the sidecar holds (see sidecar_size).
ASSUMED_WIDTH = 768  # a teacher whose config cannot be read up front: a ViT-L/14's width
ASSUMED_CAPTIONS = 3  # synthetic captions per sample when the captions manifest does not say
ROW_OVERHEAD = 32  # key and status strings, their offsets and the text list's offset
FILE_OVERHEAD = 4096  # Arrow framing, and the schema with its provenance (stored twice in an IPC file)


def add_arguments(parser) -> None:
    add_config_arguments(parser, TeacherConfig, TEACHER_TOML)


def run(args) -> int:
    return run_config(config_from_args(TeacherConfig, args))


def _needs_captions(root, shard: str) -> str | None:
    from siclip.manifests.manifest import StageManifest

    if StageManifest.load(root, "captions").entry_ok(root, shard):
        return None
    return f"no captions sidecar listed in {root.manifest_path('captions')} (run 'siclip captions' first, or --set captions=false)"


def sidecar_size(cfg: TeacherConfig) -> tuple[int, int, list[str]]:
    """(bytes per sample, bytes per sidecar file, teachers whose width was assumed): the estimate before any
    sidecar exists, from the teachers' configs (no weights loaded), the dtype and the counts per sample."""
    from siclip.captioning.models import clip_embedding_width
    from siclip.manifests.layout import DataRoot
    from siclip.manifests.manifest import StageManifest
    from siclip.teachers import in_data_root

    root = DataRoot(cfg.data)
    widths = {name: clip_embedding_width(in_data_root(name, root), cfg.trust_remote_code) for name in cfg.teachers()}
    assumed = [name for name, w in widths.items() if w is None]
    width = sum(w or ASSUMED_WIDTH for w in widths.values())
    texts = 1
    if cfg.captions:
        texts += int(StageManifest.load(root, "captions").params.get("num_captions", ASSUMED_CAPTIONS))
    vectors = 1 + cfg.augmentations + texts  # plain image, K augmentations, web + synthetic captions
    per_row = ROW_OVERHEAD + 2 * width * vectors + 4 * 5 * cfg.augmentations  # float16/bfloat16; 5 float32 per crop
    return per_row, FILE_OVERHEAD, assumed


def run_config(cfg: TeacherConfig) -> int:
    from functools import partial

    from siclip.captioning.fanout import local_cluster_threads
    from siclip.captioning.jobs import build_teachers, teacher_shard
    from siclip.captioning.stage import StageJob, log, run_stage
    from siclip.manifests.layout import DataRoot
    from siclip.teachers import parse_teacher

    # what each name loads (a path may be relative to the data root); a misspelt or missing one stops here,
    # before the estimate and the workers
    names = [parse_teacher(name, DataRoot(cfg.data)).source for name in cfg.teachers()]
    threads = cfg.threads_per_worker or local_cluster_threads(max(cfg.workers, 1))
    per_row, per_file, assumed = sidecar_size(cfg)
    if assumed:
        log(f"teacher: cannot read the embedding width of {', '.join(assumed)} before loading it; "
            f"the size estimate assumes {ASSUMED_WIDTH} each")
    job = StageJob(
        stage="teacher", cfg=cfg, params=cfg.params(),
        setup=partial(build_teachers, names=names, device=cfg.device, seed=cfg.seed,
                      trust_remote_code=cfg.trust_remote_code, threads=threads),
        job=teacher_shard,
        bytes_per_row=per_row, bytes_per_file=per_file,
        needs=_needs_captions if cfg.captions else None,
        inputs=("shards", "captions") if cfg.captions else ("shards",))
    return run_stage(job)
