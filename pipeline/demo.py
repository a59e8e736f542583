"""The embedded default data: generated images served on 127.0.0.1 while `siclip shards` downloads
them. `python -m pipeline.demo --data DATA` (what `make demo` runs first)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from manifests.config import resolve
from manifests.errors import SiclipError
from pipeline.config import DEFAULT_CONFIG, ShardsConfig
from pipeline.loopback import ImageServer, generate, write_url_list

DEMO_PORT = 18765  # a fixed port keeps the URL list identical across reruns, so a rerun resumes


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="Download the generated demo images into DATA/shards.")
    p.add_argument("--data", default="data/demo")
    p.add_argument("--images", type=int, default=400)
    p.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE")
    args = p.parse_args(argv)
    from pipeline.stage import run_shards

    files, rows = generate(args.images, seed=0)
    try:
        server = ImageServer(files, DEMO_PORT)
    except OSError:
        server = ImageServer(files, 0)
    data = Path(args.data)
    data.mkdir(parents=True, exist_ok=True)
    urls = data / "demo_urls.parquet"
    try:
        with server:
            write_url_list(urls, server.base, rows)
            # the images are served on 127.0.0.1, an address stage 1 refuses unless allowed
            cfg = resolve(ShardsConfig, DEFAULT_CONFIG,
                          ["image_size=128", "samples_per_shard=100", "budget=2GB", "reserve=40%", "timeout=5",
                           "allow_private_addresses=true", *args.sets], {"urls": str(urls), "data": str(data)})
            return run_shards(cfg)
    except SiclipError as e:
        print(f"demo: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
