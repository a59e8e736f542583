"""`python -m bench shards`: raw `img2dataset.download` against `siclip shards`, same loopback URL
list, same settings, interleaved runs, each in a fresh process; ratio = siclip time / raw time."""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from demo.loopback import ImageServer, generate, write_url_list

RAW_SCRIPT = """
import sys
from img2dataset import download

if __name__ == "__main__":  # img2dataset spawns its workers
    urls, out, size, sps, procs, threads = sys.argv[1:7]
    download(url_list=urls, output_folder=out, output_format="webdataset", input_format="parquet", url_col="url",
             caption_col="caption", image_size=int(size), resize_mode="center_crop", encode_format="jpg",
             encode_quality=95, processes_count=int(procs), thread_count=int(threads),
             number_sample_per_shard=int(sps), timeout=10, extract_exif=False, compute_hash="sha256",
             enable_wandb=False, max_image_area=89478485)
"""


def _timed(cmd: list[str], env: dict) -> float:
    t = time.perf_counter()
    res = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if res.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd[:4])} failed:\n{res.stderr[-2000:]}")
    return time.perf_counter() - t


def bench_shards(quick: bool = False, images: int | None = None, rounds: int | None = None) -> dict:
    images = images or (300 if quick else 2000)
    rounds = rounds or (1 if quick else 3)
    size, sps, procs, threads = 256, max(50, images // 8), 2, 64
    repo = str(Path(__file__).resolve().parents[1])
    env = {**os.environ, "NO_ALBUMENTATIONS_UPDATE": "1", "WANDB_MODE": "disabled",
           "OPENCV_IO_MAX_IMAGE_PIXELS": "89478485", "PYTHONPATH": repo + os.pathsep + os.environ.get("PYTHONPATH", "")}
    print(f"bench shards: generating {images} images", file=sys.stderr)
    files, rows = generate(images, seed=7, max_side=320)
    raw_t, ours_t = [], []
    with tempfile.TemporaryDirectory() as tmp, ImageServer(files) as server:
        tmp = Path(tmp)
        urls = tmp / "urls.parquet"
        write_url_list(urls, server.base, rows)
        script = tmp / "raw_img2dataset.py"
        script.write_text(RAW_SCRIPT)
        for r in range(rounds):
            raw_t.append(_timed([sys.executable, str(script), str(urls), str(tmp / f"raw{r}"), str(size), str(sps),
                                 str(procs), str(threads)], env))
            ours_t.append(_timed([sys.executable, "-m", "siclip.cli", "shards", "--urls", str(urls), "--data",
                                  str(tmp / f"ours{r}"), "--image-size", str(size), "--samples-per-shard", str(sps),
                                  "--processes", str(procs), "--threads", str(threads), "--budget", "1TB",
                                  "--allow-private-addresses"], env))  # the list is served on 127.0.0.1
            print(f"bench shards: round {r + 1}/{rounds}: raw img2dataset {raw_t[-1]:.1f} s, siclip {ours_t[-1]:.1f} s",
                  file=sys.stderr)
    raw, ours = statistics.median(raw_t), statistics.median(ours_t)
    result = {"ratio": round(ours / raw, 3), "images_per_s": round(images / ours, 1),
              "raw_images_per_s": round(images / raw, 1), "images": images, "rounds": rounds,
              "baseline": "img2dataset.download, same list and settings", "raw_s": raw_t, "siclip_s": ours_t}
    print(f"bench shards: siclip/raw wall time {result['ratio']:.3f} (goal <= 1.05); siclip {result['images_per_s']} img/s, "
          f"raw {result['raw_images_per_s']} img/s", file=sys.stderr)
    return result
