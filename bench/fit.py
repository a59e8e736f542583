"""`make bench-fit`: how fast each model shape fits the same pairs, beside open_clip's CLIP of the same shape.

Every model sees the same batches of generated scenes (demo/scenes.py: noisy web captions, 64 px),
with one optimizer and schedule (AdamW lr 1e-3, wd 0.1 on matrices, betas 0.9/0.98, 50 warm-up steps
then cosine, gradient clipping 1, logit_scale clamped at 100), in one process, so what differs is the
model alone: its blocks and its initialisation. Reported per model: the first step whose CLIP loss is
below 0.9·ln(batch) (how long it sits on the starting plateau), the loss at 25/50/100% of training,
and image->text R@1 on 500 held-out scenes. `open_clip` (when importable: the mobileclip environment)
is open_clip.CLIP with tiny_preln's shape, the peer the pre-LN preset must fit as fast as.

    python -m bench fit                          tiny_preln, tiny and open_clip; 300 steps of 64; seed 0
    python -m bench fit --models tiny --seeds 0,1,2 --steps 200
    python -m bench fit --models "tiny:image.depth=6"     a preset with dotted overrides (JSON values)
    python -m bench fit --models 'tiny:text.block=["sasp","sasp","sasp","preln"]:text.share_attention=[[1,2]]'
Ends with one JSON line: per model, the mean over seeds, and the ratios of each loss to open_clip's.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

HELD_OUT = 500
WARMUP, LR = 50, 1e-3


def scenes(n: int, size: int = 64):
    """n + HELD_OUT generated scenes: normalised pixels and tokenised web captions (the same on every run)."""
    from demo.scenes import make_scene, web_caption
    from siclip.images import OPENAI_MEAN, OPENAI_STD, decode_image
    from siclip.training.tokenizer import ClipTokenizer

    pixels, captions = [], []
    for i in range(n + HELD_OUT):
        data, scene = make_scene(7, i)
        img = decode_image(data).resize((size, size), resample=3)  # bicubic
        pixels.append(np.asarray(img).transpose(2, 0, 1))
        captions.append(web_caption(scene, random.Random(f"w{i}"))[0])
    x = torch.from_numpy(np.stack(pixels)).float().div_(255)
    x = (x - torch.tensor(OPENAI_MEAN).view(1, 3, 1, 1)) / torch.tensor(OPENAI_STD).view(1, 3, 1, 1)
    return x, ClipTokenizer()(captions, context_length=77)


def open_clip_model():
    """open_clip's CLIP with tiny_preln's shape: a 64 px ViT-8 4x128 and a causal 4x128 text tower."""
    import open_clip
    from open_clip.model import CLIPTextCfg, CLIPVisionCfg

    model = open_clip.CLIP(128, CLIPVisionCfg(layers=4, width=128, head_width=32, patch_size=8, image_size=64),
                           CLIPTextCfg(context_length=77, vocab_size=49408, width=128, heads=4, layers=4))
    return model, lambda x, t: (model.encode_image(x, normalize=True), model.encode_text(t, normalize=True),
                                model.logit_scale.exp())


def siclip_model(spec: str):
    from siclip.training.model import build_model, load_config

    model = build_model(load_config(*parse_spec(spec)))
    return model, lambda x, t: model(x, t)


def fit(spec: str, seed: int, data, steps: int, batch: int) -> dict:
    x, t = data
    n = len(x) - HELD_OUT
    torch.manual_seed(seed)
    model, forward = open_clip_model() if spec == "open_clip" else siclip_model(spec)
    named = list(model.named_parameters())
    decay = [p for name, p in named if p.ndim >= 2 and "logit_scale" not in name]
    rest = [p for name, p in named if not (p.ndim >= 2 and "logit_scale" not in name)]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": rest, "weight_decay": 0.0}],
                            lr=LR, betas=(0.9, 0.98), eps=1e-6)
    g = torch.Generator().manual_seed(1234)  # the same batches for every model and seed
    order = torch.cat([torch.randperm(n, generator=g) for _ in range(steps * batch // n + 1)])
    labels, losses, plateau, t0 = torch.arange(batch), [], None, time.perf_counter()
    for step in range(steps):
        lr = LR * (step + 1) / WARMUP if step < WARMUP else \
            0.5 * LR * (1 + math.cos(math.pi * (step - WARMUP) / max(1, steps - WARMUP)))
        for group in opt.param_groups:
            group["lr"] = lr
        idx = order[step * batch:(step + 1) * batch]
        image, text, scale = forward(x[idx], t[idx])
        logits = scale * image @ text.T
        loss = (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(100))
        losses.append(loss.item())
        if plateau is None and losses[-1] < 0.9 * math.log(batch):
            plateau = step
    model.eval()
    with torch.no_grad():
        image, text, _ = forward(x[n:], t[n:])
    r1 = float(((image @ text.T).argmax(1) == torch.arange(HELD_OUT)).float().mean())
    at = lambda f: float(np.mean(losses[max(0, round(f * steps) - 10):round(f * steps)]))  # mean of 10 steps
    return {"model": spec, "seed": seed, "plateau_steps": plateau, "loss25": at(0.25), "loss50": at(0.5),
            "loss100": at(1.0), "heldout_i2t_r1": r1, "seconds": time.perf_counter() - t0}


def parse_spec(spec: str) -> tuple[str, dict]:
    """"preset:key=JSON:key=JSON" into the preset's name and its overrides; a malformed one exits in one line."""
    name, *pairs = spec.split(":")
    try:
        return name, {k: json.loads(v) for k, v in (p.split("=", 1) for p in pairs)}
    except ValueError as err:  # no "=" in a pair, or a value that is not JSON
        sys.exit(f"bench-fit: model {spec!r}: each override is key=JSON ({err})")


def split_models(text: str) -> list[str]:
    """--models' comma-separated specs, where a comma inside an override's JSON list (`image.block=["sasp","preln"]`)
    does not separate two models."""
    specs, depth, start = [], 0, 0
    for i, ch in enumerate(text):
        depth += {"[": 1, "]": -1}.get(ch, 0)
        if ch == "," and depth == 0:
            specs.append(text[start:i])
            start = i + 1
    return [*specs, text[start:]]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="tiny_preln,tiny,open_clip", help="comma-separated presets (open_clip: the peer)")
    p.add_argument("--seeds", default="0")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--samples", type=int, default=3000, help="training scenes")
    args = p.parse_args(argv)
    torch.set_num_threads(1)  # the same on any machine; runs are compared with each other, not timed
    models = [m for m in split_models(args.models) if m]
    for spec in models:  # before the scenes are made, so that a typo fails at once
        if spec != "open_clip":
            parse_spec(spec)
    if "open_clip" in models:
        try:
            import open_clip  # noqa: F401
        except ImportError:
            print("bench-fit: open_clip is not installed (make install-mobileclip): leaving it out", file=sys.stderr)
            models.remove("open_clip")
    data = scenes(args.samples)
    rows = []
    for spec in models:
        for seed in (int(s) for s in args.seeds.split(",")):
            rows.append(fit(spec, seed, data, args.steps, args.batch))
            r = rows[-1]
            print(f"bench-fit: {spec:<24} seed {seed}  leaves 0.9·ln(B) at step {r['plateau_steps']}  loss "
                  f"{r['loss25']:.3f} / {r['loss50']:.3f} / {r['loss100']:.3f}  held-out R@1 {r['heldout_i2t_r1']:.3f}",
                  file=sys.stderr, flush=True)
    summary = {}
    for spec in models:
        mine = [r for r in rows if r["model"] == spec]
        summary[spec] = {k: statistics.mean(r[k] for r in mine) if all(r[k] is not None for r in mine) else None
                         for k in ("plateau_steps", "loss25", "loss50", "loss100", "heldout_i2t_r1")}
    if "open_clip" in summary:
        peer = summary["open_clip"]
        for spec, s in summary.items():
            s["loss100_ratio_to_open_clip"] = s["loss100"] / peer["loss100"]
            s["r1_ratio_to_open_clip"] = s["heldout_i2t_r1"] / peer["heldout_i2t_r1"] if peer["heldout_i2t_r1"] else None
    print(json.dumps({"bench": "fit", "steps": args.steps, "batch": args.batch, "seeds": args.seeds,
                      "models": summary, "runs": rows}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
