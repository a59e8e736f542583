"""The demo's data: compositional scenes (demo/scenes.py). The clean pairs and the zero-shot folders
go to an inputs folder outside the data root; the web part, with noisy alt-text captions, is served
on 127.0.0.1 while `siclip shards` downloads it into DATA/shards, as a web URL list would be.

    python -m demo --data data/demo --inputs data/demo-inputs     (what `make demo` runs first)
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from siclip.config import resolve
from siclip.manifests.errors import SiclipError
from siclip.pipeline.config import DEFAULT_CONFIG, ShardsConfig
from demo.loopback import ImageServer, write_url_list
from demo.scenes import web_part, write_inputs

DEMO_PORT = 18765  # a fixed port keeps the URL list identical across reruns, so a rerun resumes
# the scenes are served on 127.0.0.1, an address stage 1 refuses unless allowed
DEMO_SETTINGS = ["image_size=96", "samples_per_shard=200", "budget=2GB", "reserve=40%", "timeout=5",
                 "allow_private_addresses=true"]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m demo",
                                description="Write the demo's inputs and download its web part into DATA/shards.")
    p.add_argument("--data", default="data/demo", help="data root (the pipeline's outputs)")
    p.add_argument("--inputs", default="data/demo-inputs", help="clean pairs and zero-shot folders (not outputs)")
    p.add_argument("--images", type=int, default=2000, help="web-part scenes to serve and download")
    p.add_argument("--clean", type=int, default=600, help="clean-captioned scenes (the captioner's data)")
    p.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                   help="a `siclip shards` config override")
    args = p.parse_args(argv)
    from siclip.pipeline.stage import run_shards

    data, inputs = Path(args.data).absolute(), Path(args.inputs).absolute()
    if inputs == data or data in inputs.parents:
        print(f"demo: error: --inputs {inputs} is inside the data root {data}; inputs are not the pipeline's outputs",
              file=sys.stderr)
        return 2
    t0 = time.monotonic()
    info = write_inputs(inputs, clean=args.clean)
    print(f"demo: inputs in {inputs} ({'there already' if info.get('skipped') else f'{time.monotonic() - t0:.0f} s'}): "
          f"{info['images']['clean']} clean pairs, zero-shot folders " + ", ".join(
              f"{a} ({n} images)" for a, n in info["images"].items() if a != "clean"), file=sys.stderr)
    files, rows = web_part(args.images, seed=0)
    try:
        server = ImageServer(files, DEMO_PORT)
    except OSError:
        server = ImageServer(files, 0)
    data.mkdir(parents=True, exist_ok=True)
    urls = data / "demo_urls.parquet"
    try:
        with server:
            write_url_list(urls, server.base, rows)
            cfg = resolve(ShardsConfig, DEFAULT_CONFIG, [*DEMO_SETTINGS, *args.sets],
                          {"urls": str(urls), "data": str(data)})
            return run_shards(cfg)
    except SiclipError as e:
        print(f"demo: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
