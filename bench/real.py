"""`make bench-real` and `make ablations`: the whole pipeline on images nobody here drew.

The emoji of Debian's Noto Color Emoji font (bench/emoji.py), rendered at a few sizes and positions
on varied backgrounds, captioned with their Unicode names and CLDR keywords, are served on 127.0.0.1
and go through the real stages: shards -> a tiny captioner fitted on a clean part of the training
split -> captions -> a pre-LN teacher trained, exported, its sidecars -> the student -> eval.
The split is by emoji: the last shard holds one rendering of each of HELD_OUT emoji never trained on;
the zero-shot folders hold another rendering of the same held-out emoji, by Unicode group and subgroup
(every group and subgroup is a class, so chance is one over all of them).

    python -m bench real               the benchmark; ends with one JSON line
    python -m bench ablations          the ablation table (bench/configs/abl_*.toml, 3 seeds each)
A rerun skips what is done (inputs, shards, captions, the teacher and its sidecars, finished runs). A student's
run name carries a digest of its config and siclip's code (`run_name`), so after a code change the students
train anew; the teacher keeps its fixed name, so remove runs/real-teacher and teacher/ to remake it.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "bench" / "configs"
HELD_OUT = 300  # emoji held out: one shard of one rendering each
TRAIN_ROWS = 3000  # renderings of the other emoji (2 each, round-robin), ten shards
CLEAN = 600  # clean pairs the captioner is fitted on (other renderings of training emoji)
SHARDS = ["image_size=64", "samples_per_shard=300", "budget=4GB", "reserve=40%", "timeout=5",
          "allow_private_addresses=true"]  # served on 127.0.0.1, which stage 1 refuses unless allowed
PORT = 18766
ROWS = [  # (config, what the row adds), in the order of docs/benchmarks.md's ablation table
    ("abl_web", "CLIP loss on web captions only"),
    ("abl_synthetic", "+ synthetic captions"),
    ("abl_pm", "+ PM loss"),
    ("abl_wikd", "+ WIKD (inheritance and distillation from the teacher)"),
    ("abl_preln", "pre-LN blocks instead of SAS-P (as + PM)"),
]


def digest(*parts) -> str:
    """Eight hex digits of the parts (a Path by its bytes, anything else by its text): part of a run's name."""
    h = hashlib.sha256()
    for part in parts:
        h.update(part.read_bytes() if isinstance(part, Path) else str(part).encode())
        h.update(b"\0")
    return h.hexdigest()[:8]


def siclip_code() -> list[Path]:
    """What a siclip run's result depends on besides its data: the training and data-layer code, the presets."""
    files = [*REPO.glob("training/**/*.py"), *REPO.glob("training/presets/*.toml"), *REPO.glob("manifests/*.py"),
             *REPO.glob("siclip/*.py")]
    return sorted(files)


def run_name(config: str, seed: int | None = None) -> str:
    """A student's run name: the config's name, its seed and a digest of the config, the seed's --set and
    siclip's code, so a rerun after a code change trains anew instead of resuming an older result."""
    if seed is None:
        return f"{config}-{digest(CONFIGS / f'{config}.toml', *siclip_code())}"
    return f"{config}-s{seed}-{digest(CONFIGS / f'{config}.toml', f'seed={seed}', *siclip_code())}"


def drop_stale(data: Path, keep: str) -> list[str]:
    """Remove the runs that `keep` replaces: the same name with another digest (the same row and seed, trained by
    older code), from the train manifest and then from disk, so that the data root's budget holds one code
    version's runs. Returns their names."""
    import re

    from siclip.manifests.layout import open_data_root
    from siclip.manifests.manifest import StageManifest, stage_lock

    stem = keep.rsplit("-", 1)[0] + "-"
    stale = [p for p in sorted((data / "runs").glob(stem + "*"))
             if p.name != keep and re.fullmatch(re.escape(stem) + "[0-9a-f]{8}", p.name)]
    if not stale:
        return []
    root = open_data_root(data)
    with stage_lock(root, "train"):
        manifest = StageManifest.load(root, "train")
        for run in stale:
            unit = root.rel(run)
            for key in [k for k in manifest.entries if k == unit or k.startswith(unit + "/")]:
                del manifest.entries[key]
        manifest.save(root)  # forgotten first: a file listed but gone would read as damage
        for run in stale:
            shutil.rmtree(run)
            log(f"removed {root.rel(run)}: the same run trained by older code (its digest differs)")
    return [p.name for p in stale]


def log(msg: str) -> None:
    print(f"bench-real: {msg}", file=sys.stderr, flush=True)


def sh(*args: str) -> str:
    """Run a command as a user would, its stderr shown; its stdout returned; stop on failure."""
    res = subprocess.run([str(a) for a in args], stdout=subprocess.PIPE, text=True, cwd=REPO)
    if res.returncode:
        sys.exit(f"bench-real: {' '.join(map(str, args[:3]))} … exited {res.returncode}")
    return res.stdout


def siclip(*args: str) -> str:
    return sh(sys.executable, "-m", "siclip.cli", *args)


def ensure_sources() -> None:
    """Install the font and the Unicode data when missing (Debian, as root), else say what is needed."""
    from bench.emoji import PACKAGES, missing_sources

    if not missing_sources():
        return
    if shutil.which("apt-get") and os.geteuid() == 0:
        log(f"installing {' '.join(PACKAGES)}")
        subprocess.run(["apt-get", "install", "-y", "-q", *PACKAGES], check=True, stdout=subprocess.DEVNULL)
    if missing_sources():
        sys.exit(f"bench-real: missing {', '.join(missing_sources())}; run: sudo apt-get install -y {' '.join(PACKAGES)}")


def split():
    """(training emoji, held-out emoji): the HELD_OUT emoji whose name hashes lowest are held out."""
    from bench.emoji import emoji_list

    ranked = sorted(emoji_list(), key=lambda e: hashlib.sha256(e.name.encode()).digest())
    held = set(e.name for e in ranked[:HELD_OUT])
    return [e for e in emoji_list() if e.name not in held], [e for e in emoji_list() if e.name in held]


def write_inputs(inputs: Path) -> None:
    """Clean pairs (training emoji) and zero-shot folders (held-out emoji) by group and subgroup."""
    from bench.emoji import render

    record = inputs / "inputs.json"
    params = {"held_out": HELD_OUT, "clean": CLEAN, "version": 1}
    if record.is_file() and json.loads(record.read_text()) == params:
        return
    train, _ = split()
    clean = inputs / "clean"
    clean.mkdir(parents=True, exist_ok=True)
    for i in range(CLEAN):
        e = train[i * len(train) // CLEAN]
        (clean / f"{i:05d}.jpg").write_bytes(render(e, random.Random(f"clean:{e.name}")))
        (clean / f"{i:05d}.txt").write_text(e.caption() + "\n")
    write_zeroshot(inputs / "zeroshot")
    record.write_text(json.dumps(params))


def write_zeroshot(root: Path, render=None, ext: str = "jpg") -> None:
    """root/group and root/subgroup: one rendering of each held-out emoji in its label's folder, every label a
    class (so chance is one over all of them), and the folder's prompts in templates.txt."""
    from bench.emoji import emoji_list, folder_name
    from bench.emoji import render as default_render

    render = render or default_render
    _, held = split()
    for level in ("group", "subgroup"):
        folder = root / level
        for label in sorted({getattr(e, level) for e in emoji_list()}):
            (folder / folder_name(label)).mkdir(parents=True, exist_ok=True)
        for e in held:
            out = folder / folder_name(getattr(e, level)) / f"{folder_name(e.name)}.{ext}"
            out.write_bytes(render(e, random.Random(f"zeroshot:{e.name}")))
        (folder / "templates.txt").write_text("{}\nan emoji of {}\na {} emoji\n")


def web_rows(render=None, ext: str = "jpg", by_group: bool = False):
    """(files, rows): TRAIN_ROWS renderings of training emoji, then one of each held-out emoji, last.

    The training rows come in emoji-test.txt's order, twice over (each emoji's first rendering, then its
    second); `by_group` keeps an emoji's renderings together in Unicode group order instead, as a list sorted
    by category is, so each shard holds one or two groups."""
    from bench.emoji import render as default_render

    render = render or default_render
    train, held = split()
    picks = [(e, k) for k in range(2) for e in train][:TRAIN_ROWS]
    if by_group:
        rank = {e.name: i for i, e in enumerate(train)}  # the file lists emoji by group, then subgroup
        picks.sort(key=lambda p: (rank[p[0].name], p[1]))
    picks += [(e, 0) for e in held]
    files, rows = {}, []
    for i, (e, k) in enumerate(picks):
        path = f"emoji/{i:05d}.{ext}"
        files[path] = render(e, random.Random(f"web:{e.name}:{k}"))
        rows.append((path, e.caption()))
    return files, rows


def download(data: Path, files_rows=None, settings=SHARDS) -> None:
    """`siclip shards` of the web rows (default: `web_rows()`), served on 127.0.0.1, into `data`."""
    from siclip.config import resolve
    from siclip.pipeline.config import DEFAULT_CONFIG, ShardsConfig
    from demo.loopback import ImageServer, write_url_list
    from siclip.pipeline.stage import run_shards
    from siclip.manifests.errors import SiclipError

    files, rows = files_rows or web_rows()
    try:
        server = ImageServer(files, PORT)
    except OSError:
        server = ImageServer(files, 0)
    data.mkdir(parents=True, exist_ok=True)
    with server:
        write_url_list(data / "emoji_urls.parquet", server.base, rows)
        cfg = resolve(ShardsConfig, DEFAULT_CONFIG, settings, {"urls": str(data / "emoji_urls.parquet"), "data": str(data)})
        try:
            failed = run_shards(cfg)
        except SiclipError as e:  # e.g. a data root made by an older siclip: one line, not a traceback
            sys.exit(f"bench-real: {e} (or remove {data} to start over)")
        if failed:
            sys.exit("bench-real: siclip shards failed")


def prepare(data: Path, inputs: Path) -> None:
    """Everything the students need: shards, captions, the teacher and its sidecars."""
    ensure_sources()
    write_inputs(inputs)
    download(data)
    sh(sys.executable, "-m", "demo.fit", "--pairs", inputs / "clean", "--out", inputs / "captioner",
       "--minutes", "1")
    siclip("captions", "--data", data, "--model", inputs / "captioner", "--workers", "1", "--batch-size", "64")
    siclip("train", "--data", data, "--config", CONFIGS / "real_teacher.toml", "--out", "real-teacher", "--resume")
    siclip("export", "--data", data, "--run", "real-teacher")
    siclip("teacher", "--data", data, "--teacher", data / "runs" / "real-teacher" / "clip", "--workers", "1",
           "--batch-size", "64", "--augmentations", "2", "--set", "crop_scale=[0.7,1.0]", "--set", "flip=false")


def evaluate(data: Path, inputs: Path, run: str) -> dict:
    out = siclip("eval", "--data", data, "--run", run, "--imagefolder", inputs / "zeroshot" / "group",
                 "--imagefolder", inputs / "zeroshot" / "subgroup", "--retrieval", "--json")
    return json.loads(out)


def summary(result: dict, minutes: float) -> dict:
    zs, r = result["zeroshot"], result["retrieval"]
    return {"zeroshot_group": {"top1": round(zs["group"]["top1"], 4), "chance": round(zs["group"]["chance_top1"], 4)},
            "zeroshot_subgroup": {"top1": round(zs["subgroup"]["top1"], 4),
                                  "chance": round(zs["subgroup"]["chance_top1"], 4)},
            "retrieval": {k: round(r[k], 4) for k in ("i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1", "t2i_r5", "t2i_r10",
                                                      "chance_r1")},
            "minutes": round(minutes, 1)}


def bench(data: Path, inputs: Path) -> None:
    started = time.monotonic()
    prepare(data, inputs)
    run = run_name("real")
    drop_stale(data, run)
    siclip("train", "--data", data, "--config", CONFIGS / "real.toml", "--out", run, "--resume")
    result = summary(evaluate(data, inputs, run), (time.monotonic() - started) / 60)
    print(json.dumps(result), flush=True)


def ablations(data: Path, inputs: Path, seeds: int) -> None:
    """Every row's config with each seed, at the same samples seen; a markdown table of mean ± std."""
    started = time.monotonic()
    prepare(data, inputs)
    results = {}
    for config, what in ROWS:
        for seed in range(seeds):
            run = run_name(config, seed)
            drop_stale(data, run)
            siclip("train", "--data", data, "--config", CONFIGS / f"{config}.toml", "--out", run, "--resume",
                   "--set", f"seed={seed}")
            results.setdefault(config, []).append(summary(evaluate(data, inputs, run), 0))
            log(f"{run}: {json.dumps(results[config][-1])}")
    metrics = [("group top-1", "zeroshot_group"), ("subgroup top-1", "zeroshot_subgroup"),
               ("i2t R@1", "i2t_r1"), ("i2t R@5", "i2t_r5"), ("t2i R@1", "t2i_r1"), ("t2i R@5", "t2i_r5")]

    def value(s, key):
        return s[key]["top1"] if key.startswith("zeroshot") else s["retrieval"][key]

    def cell(values):
        return f"{100 * statistics.mean(values):.1f} ± {100 * statistics.stdev(values):.1f}" if len(values) > 1 \
            else f"{100 * values[0]:.1f}"

    first = results[ROWS[0][0]][0]
    lines = ["| row | " + " | ".join(m for m, _ in metrics) + " |", "|---" * (len(metrics) + 1) + "|"]
    for config, what in ROWS:
        lines.append(f"| {what} (`{config}`) | " + " | ".join(cell([value(s, k) for s in results[config]])
                                                           for _, k in metrics) + " |")
    def chance(key):  # R@k by chance is k over the pairs
        return first[key]["chance"] if key.startswith("zeroshot") else first["retrieval"]["chance_r1"] * int(key[5:])

    lines.append("| chance | " + " | ".join(f"{100 * chance(k):.1f}" for _, k in metrics) + " |")
    (data / "ablations.json").write_text(json.dumps(results, indent=1) + "\n")
    print("\n".join(lines))
    log(f"ablations: {len(ROWS)} rows × {seeds} seeds in {(time.monotonic() - started) / 60:.1f} min; "
        f"per-run results in {data / 'ablations.json'}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", default="data/bench-real", type=Path)
    p.add_argument("--inputs", default="data/bench-real-inputs", type=Path)
    p.add_argument("--ablations", action="store_true", help="the ablation table instead of the benchmark")
    p.add_argument("--seeds", type=int, default=3)
    args = p.parse_args(argv)
    data, inputs = (REPO / args.data).absolute(), (REPO / args.inputs).absolute()
    if args.ablations:
        ablations(data, inputs, args.seeds)
    else:
        bench(data, inputs)
    return 0


if __name__ == "__main__":
    sys.exit(main())
