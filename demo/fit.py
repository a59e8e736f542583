"""Fit the tiny BLIP captioner on a folder of clean image-caption pairs, so that its synthetic captions
mean something (a random captioner's do not). The demo's stand-in for a captioner fine-tuned on MSCOCO.

    python -m demo.fit --pairs DIR --out DIR [--minutes 1.5 | --steps N]

DIR holds pairs: an image (jpg/png/webp/...) and a .txt of the same stem with its caption; images are decoded
as stage 1 decodes the shards' (siclip.images: transparency onto white), one that does not decode is skipped
and counted. The vocabulary
is the tiny one plus the captions' words; training is teacher forcing (next-token cross-entropy given
the image), AdamW, for a time or step budget. The result is saved with save_pretrained, with
`fit.json` beside it, and loads through `siclip captions --model DIR`. A rerun with the same
arguments finds `fit.json` and skips.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from pathlib import Path

from siclip.manifests.errors import SiclipError
from siclip.manifests.progress import Progress, format_duration
from siclip.images import UnreadableImage, decode_image, is_image_file

FIT_FILE = "fit.json"


def read_pairs(folder: str | Path) -> list[tuple[Path, str]]:
    """(image path, caption) of every image in `folder` that has a non-empty .txt of the same stem."""
    folder = Path(folder)
    if not folder.is_dir():
        raise SiclipError(f"--pairs {folder}: not a folder")
    pairs = []
    for image in sorted(p for p in folder.iterdir() if is_image_file(p)):
        text = image.with_suffix(".txt")
        caption = text.read_text(errors="replace").strip() if text.is_file() else ""
        if caption:
            pairs.append((image, caption))
    if len(pairs) < 2:
        raise SiclipError(f"--pairs {folder}: needs two or more images with a caption in a .txt of the same stem "
                          f"(found {len(pairs)})")
    return pairs


def decode_pairs(pairs: list[tuple[Path, str]], log) -> tuple[list, list[str], int]:
    """(RGB images, their captions, how many were unreadable) of `pairs`; an image that does not decode is
    left out and the first such is logged."""
    images, captions, unreadable = [], [], []
    for path, caption in pairs:
        try:
            images.append(decode_image(path))
            captions.append(caption)
        except UnreadableImage as e:
            unreadable.append(e)
    if unreadable:
        log(f"fit: skipped {len(unreadable)} unreadable image{'s' * (len(unreadable) > 1)} of {len(pairs)}: "
            f"{unreadable[0]}")
    if len(images) < 2:
        raise SiclipError(f"--pairs {pairs[0][0].parent}: needs two or more readable images with a caption "
                          f"(found {len(images)}; {len(unreadable)} unreadable, such as {unreadable[0]})")
    return images, captions, len(unreadable)


def caption_words(captions: list[str]) -> list[str]:
    """The captions' words, lower-cased, in first-seen order (BERT's basic tokenizer splits on punctuation)."""
    return list(dict.fromkeys(w for c in captions for w in re.findall(r"[a-z0-9]+", c.lower())))


def fit(pairs_dir: str | Path, out: str | Path, minutes: float = 1.5, steps: int = 0, batch_size: int = 32,
        lr: float = 2e-3, image_size: int = 64, width: int = 96, layers: int = 2, seed: int = 0,
        threads: int = 1, log=lambda msg: print(msg, file=sys.stderr, flush=True)) -> dict:
    """Train the captioner for `steps` steps (or `minutes` when steps is 0), save it into `out`; its summary."""
    import torch

    from siclip.captioning.models import build_tiny_captioner
    from siclip.teachers import quiet_transformers

    out = Path(out)
    params = {"pairs": str(Path(pairs_dir).absolute()), "minutes": minutes, "steps": steps, "batch_size": batch_size,
              "lr": lr, "image_size": image_size, "width": width, "layers": layers, "seed": seed}
    record = out / FIT_FILE
    if record.is_file() and json.loads(record.read_text()).get("params") == params:
        summary = json.loads(record.read_text())
        log(f"fit: {out} is fitted already ({summary['steps']} steps, loss {summary['loss']:.3f}); skipped")
        return {**summary, "skipped": True}
    if threads:  # tiny models: one thread is fastest, and on a busy machine by far
        torch.set_num_threads(threads)
    quiet_transformers()
    images, captions, unreadable = decode_pairs(read_pairs(pairs_dir), log)
    model, processor = build_tiny_captioner(seed, words=caption_words(captions), image_size=image_size,
                                            width=width, layers=layers)
    tok = processor.tokenizer
    pixels = processor.image_processor(images=images, return_tensors="pt")["pixel_values"]
    enc = tok(captions, padding="longest", truncation=True, max_length=40, return_tensors="pt")
    ids, mask = enc["input_ids"], enc["attention_mask"]
    ids[:, 0] = model.config.text_config.bos_token_id  # BLIP decodes from [DEC], as generate() starts
    labels = ids.masked_fill(mask == 0, -100)

    gen = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    budget = steps or None
    deadline = time.monotonic() + minutes * 60
    progress = Progress("fit", steps or round(minutes * 60), unit="steps" if steps else "s", every_s=5.0)
    model.train()
    started, step, first, loss = time.monotonic(), 0, None, None
    order = torch.randperm(len(captions), generator=gen)
    cursor = 0
    while (step < budget) if budget else (time.monotonic() < deadline):
        if cursor + batch_size > len(order):
            order, cursor = torch.randperm(len(captions), generator=gen), 0
        idx = order[cursor:cursor + batch_size]
        cursor += batch_size
        loss = model(pixel_values=pixels[idx], input_ids=ids[idx], attention_mask=mask[idx], labels=labels[idx]).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        step += 1
        first = first if first is not None else float(loss.detach())
        if progress.due():
            done = step if steps else round(time.monotonic() - started)
            rate = step / max(time.monotonic() - started, 1e-9)
            progress.update(done, f"step {step}, {rate * batch_size:,.0f} pairs/s | loss {float(loss.detach()):.3f}")
    progress.close()
    model.eval()
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    processor.save_pretrained(out)
    seconds = time.monotonic() - started
    summary = {"params": params, "pairs": len(captions), "unreadable": unreadable, "steps": step, "samples": step * batch_size,
               "loss_first": first, "loss": float(loss.detach()) if loss is not None else float("nan"),
               "seconds": round(seconds, 1), "vocabulary": len(tok)}
    record.write_text(json.dumps(summary, indent=1) + "\n")
    log(f"fit: {step} steps ({step * batch_size:,} pairs seen, {step * batch_size / len(captions):.1f} epochs of "
        f"{len(captions)}) in {format_duration(seconds)}, loss {summary['loss_first']:.3f} -> {summary['loss']:.3f}; "
        f"captioner in {out} (siclip captions --model {out})")
    return summary


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m demo.fit", description=__doc__.split("\n\n")[0])
    p.add_argument("--pairs", required=True, metavar="DIR", help="images with a .txt caption of the same stem")
    p.add_argument("--out", required=True, metavar="DIR", help="where the fitted captioner is saved")
    p.add_argument("--minutes", type=float, default=1.5, help="training time (default 1.5)")
    p.add_argument("--steps", type=int, default=0, help="train this many steps instead of --minutes")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1, help="torch threads (0: torch's default)")
    args = p.parse_args(argv)
    try:
        if args.minutes <= 0 and args.steps <= 0:
            raise SiclipError("--minutes or --steps must be positive")
        fit(args.pairs, args.out, minutes=args.minutes, steps=args.steps, batch_size=args.batch_size,
            image_size=args.image_size, seed=args.seed, threads=args.threads)
    except SiclipError as e:
        print(f"fit: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
