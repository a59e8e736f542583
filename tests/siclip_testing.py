"""Helpers the suites share: writing a URL list or a tar by hand, running the real `siclip` CLI in a subprocess, a
port that refuses connections, tiny models saved as a hub folder."""

from __future__ import annotations

import io
import os
import socket
import subprocess
import sys
import tarfile
from contextlib import contextmanager
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def write_list(path: Path, rows) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"url": pa.array([r[0] for r in rows], pa.string()),
                             "caption": pa.array([r[1] for r in rows], pa.string())}), path)
    return path


# The tiny SAS-P shapes (16 px, 2 layers sharing attention, width 32) the training tests run in seconds, as a
# train config's line
TINY_MODEL_SET = (
    'model_set = ["image.image_size=16", "image.patch_size=8", "image.width=32", "image.depth=2", "image.heads=2",\n'
    '             "image.share_attention=[[1, 2]]", "text.width=32", "text.depth=2", "text.heads=2",\n'
    '             "text.share_attention=[[1, 2]]", "text.context_length=16", "embed_dim=16"]')


def write_tar(path: Path, members: list[tuple[str, bytes]]) -> Path:
    """A tar with these (name, bytes) members, in this order (a shard as another tool, or a fault, would leave it)."""
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def siclip(*args, check=True, timeout=300, env=None, **popen) -> subprocess.CompletedProcess:
    """Run the real `siclip` CLI in a subprocess, as a user would (`env`: the environment, default os.environ)."""
    env = {**(env or os.environ), "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""),
           "PYTHONUNBUFFERED": "1"}
    res = subprocess.run([sys.executable, "-m", "siclip.cli", *map(str, args)], capture_output=True, text=True,
                         timeout=timeout, env=env, cwd=REPO, **popen)
    if check and res.returncode != 0:
        raise AssertionError(f"siclip {' '.join(map(str, args))} exited {res.returncode}:\n{res.stderr[-3000:]}")
    return res


# the tests serve their pictures on 127.0.0.1, a private address stage 1 refuses unless allowed
SMALL = ["--image-size", "64", "--samples-per-shard", "8", "--processes", "2", "--threads", "8",
         "--budget", "1GB", "--reserve", "0%", "--set", "timeout=10", "--allow-private-addresses"]

# The slow fault row answers after SLOW_S seconds and must time out, so a run with it adds
# FAULT_TIMEOUT; every other row still has 5 s to answer, which loopback manages on a loaded machine.
SLOW_S = 30
FAULT_TIMEOUT = ["--set", "timeout=5"]


def fault_rows(base: str, refused: str) -> list[tuple]:
    """(url, caption, expected outcome): every way a row of a web URL list goes wrong, on server `base`."""
    return [
        (f"{base}/status/404", "missing", "http_404"),
        (f"{base}/status/500", "server error", "http_5xx"),
        (refused, "refused", "connection_error"),
        (f"{base}/bad/text.jpg", "text named jpg", "decode_error"),
        (f"{base}/bad/truncated.jpg", "truncated jpeg", "decode_error"),
        (f"{base}/empty", "empty body", "empty_body"),
        (f"{base}/bad/one.png", "one pixel", "image_too_small"),  # under min_image_size (32 px) by default
        (f"{base}/bad/bomb.png", "decompression bomb", "decompression_bomb"),
        (f"{base}/slow/{SLOW_S}/img/000000.jpg", "too slow", "timeout"),  # with FAULT_TIMEOUT
        (f"{base}/redirect-loop", "redirect loop", "redirect_loop"),
        ("file:///etc/hostname", "local file", "scheme_file"),
        (None, "no url", "no_url"),
    ]


@contextmanager
def refusing_port():
    """A loopback port that refuses connections, for as long as the block runs: bound but never
    listening, so no other program can start listening on it meanwhile."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        yield s.getsockname()[1]


def save_tiny(kind: str, path: Path, seed: int = 0) -> Path:
    """Save siclip's tiny captioner ('captioner') or CLIP teacher ('clip') with save_pretrained into `path`: a model
    that loads by folder as a downloaded one does, with nothing downloaded."""
    from siclip.captioning.models import build_tiny_captioner, build_tiny_clip
    from siclip.teachers import quiet_transformers

    quiet_transformers()
    path = Path(path)
    if kind == "captioner":
        model, processor = build_tiny_captioner(seed)
        model.save_pretrained(path)
        processor.save_pretrained(path)
    elif kind == "clip":
        model, (ip, tok) = build_tiny_clip(seed)
        model.save_pretrained(path)
        ip.save_pretrained(path)
        tok.save_pretrained(path)
    else:
        raise ValueError(kind)
    return path


def save_open_clip(name: str, folder: Path, seed: int = 0, preprocess: dict | None = None) -> Path:
    """An open_clip architecture built with random weights (no pretrained tag: nothing downloads), saved as open_clip's
    hub repositories are laid out (open_clip_config.json beside open_clip_model.safetensors), so that it loads
    through `open_clip:FOLDER` the way a downloaded model does. `preprocess`: the image statistics to record."""
    import json

    import open_clip
    import torch
    from safetensors.torch import save_file

    torch.manual_seed(seed)
    model = open_clip.create_model(name)
    decoder = getattr(model, "text_decoder", None)
    if decoder is not None:  # open_clip leaves CoCa's vocabulary projection as torch.empty: zeros or garbage
        torch.nn.init.normal_(decoder.text_projection, std=decoder.width ** -0.5)
    folder.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(folder / "open_clip_model.safetensors"))
    config = {"model_cfg": open_clip.get_model_config(name),
              "preprocess_cfg": preprocess or {"mean": list(model.visual.image_mean), "std": list(model.visual.image_std)}}
    (folder / "open_clip_config.json").write_text(json.dumps(config, indent=1))
    return folder


def fill_disk(folder: Path, leave: int = 0) -> Path:
    """Write a file into `folder` until its file system has less than `leave` bytes (and 512) free;
    returns it (delete it to make room)."""
    import shutil

    path = Path(folder) / "filler"
    with open(path, "wb", buffering=0) as f:
        for block in (64 * 1024, 4096, 512):
            while shutil.disk_usage(folder).free >= leave + block:
                try:
                    f.write(bytes(block))
                except OSError:  # full already
                    break
    return path
