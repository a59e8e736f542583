"""The two counts README's days-to-train table is built from, measured on a CPU.

1. A config's training FLOPs per sample: one forward and backward of both towers (one image and the captions
   each step gives it: the web caption and `synthetic_captions` synthetic ones), counted by
   `torch.utils.flop_counter` on a batch of 2. The loss terms' own FLOPs are left out (under 0.1% at s0).
   Model FLOPs utilisation on a card = samples/s × FLOPs per sample / the card's dense bf16 peak.
2. The loader's CPU seconds per sample at the config's image size: JPEG decode (siclip.images), the random
   resized crop and resize (`view_pixels`) and the tokenisation of the captions, in one process and one thread,
   on process CPU time (so the figure holds on a busy machine). Loader cores a card needs = its samples/s × that.

`python -m bench days [--quick]`; `s0` (the `paper` config) needs the extra siclip[mobileclip] (timm), and is
left out, saying so, without it.
"""

from __future__ import annotations

import io
import os
import random
import time

import numpy as np
import torch


def flops_per_sample(config: str, batch: int = 2) -> dict:
    from siclip.training.config import load_train_config
    from siclip.training.model import build_model, load_config

    cfg = load_train_config(config, [])
    torch.manual_seed(0)
    model = build_model(load_config(cfg.model, cfg.model_overrides()))
    size, captions = model.config.image.image_size, 1 + cfg.synthetic_captions
    context = model.config.text.context_length
    pixels = torch.randn(batch, 3, size, size)
    texts = random_tokens(batch * captions, context)
    out = {"config": config, "model": cfg.model, "image_size": size, "captions_per_image": captions}
    for tower, encode, inputs in (("image", model.encode_image, pixels), ("text", model.encode_text, texts)):
        out[f"{tower}_gflop"] = round(count_training_flops(encode, None, inputs, None) / batch / 1e9, 2)
    out["gflop_per_sample"] = round(out["image_gflop"] + out["text_gflop"], 2)
    return out


def random_tokens(rows: int, context: int, device="cpu", generator=None) -> torch.Tensor:
    """Random caption ids with an end token at position 20, so that a tower pooling there pools a real position."""
    tokens = torch.randint(1, 49000, (rows, context), generator=generator)
    tokens[:, min(20, context - 1)] = 49407
    return tokens.to(device)


def count_training_flops(encode_image, encode_text, pixels, texts) -> int:
    """FLOPs of one forward and backward of each given tower (None: left out) on its inputs, as
    torch.utils.flop_counter counts them (matrix products and convolutions)."""
    from torch.utils.flop_counter import FlopCounterMode

    total = 0
    for encode, inputs in ((encode_image, pixels), (encode_text, texts)):
        if encode is None:
            continue
        with FlopCounterMode(display=False) as counter:
            encode(inputs).float().pow(2).sum().backward()
        total += counter.get_total_flops()
    return total


def _jpegs(n: int, size: int, seed: int = 0) -> list[bytes]:
    """n JPEGs at quality 95 with edges and grain, so that they decode about as a photo of that size does."""
    from PIL import Image, ImageDraw

    rng = random.Random(seed)
    out = []
    for i in range(n):
        img = Image.new("RGB", (size, size), tuple(rng.randrange(256) for _ in range(3)))
        draw = ImageDraw.Draw(img)
        for _ in range(30):
            x, y = rng.randrange(size), rng.randrange(size)
            w, h = rng.randrange(size // 25, size // 3), rng.randrange(size // 25, size // 3)
            draw.ellipse((x, y, x + w, y + h), fill=tuple(rng.randrange(256) for _ in range(3)))
        grain = np.random.default_rng(i).integers(-20, 20, (size, size, 3))
        buf = io.BytesIO()
        Image.fromarray((np.asarray(img).astype(np.int16) + grain).clip(0, 255).astype(np.uint8)).save(
            buf, "JPEG", quality=95)
        out.append(buf.getvalue())
    return out


def loader_seconds_per_sample(size: int, captions: int, quick: bool = False) -> dict:
    from siclip.images import decode_image, random_resized_box, view_pixels
    from siclip.training.data import shared_tokenizer

    torch.set_num_threads(1)
    rng = random.Random(0)
    tokenizer = shared_tokenizer()
    jpegs = _jpegs(16 if quick else 64, size)
    text = "a small red circle above a large blue square on a white table, stock photo"

    def one(jpeg: bytes) -> None:
        img = decode_image(jpeg)
        view_pixels(img, random_resized_box(*img.size, (0.35, 1.0), rng), size, False)
        tokenizer([text] * captions)

    for jpeg in jpegs:  # warm-up
        one(jpeg)
    rates = []
    for _ in range(3 if quick else 5):
        started = time.process_time()
        for jpeg in jpegs * 4:
            one(jpeg)
        rates.append(len(jpegs) * 4 / (time.process_time() - started))
    rates.sort()
    median = rates[len(rates) // 2]
    return {"image_size": size, "captions": captions, "jpeg_kb": round(sum(map(len, jpegs)) / len(jpegs) / 1024, 1),
            "samples_per_cpu_second": round(median), "runs": [round(r) for r in rates],
            "cpu_ms_per_sample": round(1000 / median, 2), "load_1min": round(os.getloadavg()[0], 1)}


def bench_days(quick: bool = False) -> dict:
    figures = {"flops": {}, "loader": None}
    for config in ("tiny", "paper"):
        try:
            figures["flops"][config] = flops_per_sample(config)
        except ImportError as exc:  # s0's image tower is timm's MCi0
            figures["flops"][config] = {"skipped": f"needs the extra siclip[mobileclip] ({exc})"}
    paper = figures["flops"]["paper"]
    figures["loader"] = loader_seconds_per_sample(paper.get("image_size", 256), paper.get("captions_per_image", 3),
                                                  quick)
    return figures
