"""`python -m bench captions`: siclip captions against transformers' image-to-text pipeline, one image at
a time as a user would write it, on the same images with the same model and generation settings.

Two models: the tiny captioner, and a base-size BLIP built from its default config with random
weights (realistic compute, nothing downloaded). Throughput is steady state: model loading and
cluster start are excluded for both (reported apart as siclip's end-to-end rate); the pipeline
gets the better of torch's default threading and one thread.
"""

from __future__ import annotations

import io
import json
import tarfile
import tempfile
import time
from pathlib import Path
from siclip.manifests.messages import log

GEN = dict(num_captions=3, top_p=0.5, temperature=0.9, max_new_tokens=30)


def _log(msg: str) -> None:
    log(f"bench captions: {msg}")


def _images(n: int, size: int = 256) -> list[bytes]:
    import numpy as np
    from PIL import Image

    out = []
    for i in range(n):
        rng = np.random.default_rng(i)
        # smooth gradients plus noise: JPEGs of a realistic size, not pure noise
        y, x = np.mgrid[0:size, 0:size] / size
        base = np.stack([x * rng.random(), y * rng.random(), (x + y) / 2 * rng.random()], -1) * 255
        img = np.clip(base + rng.normal(0, 20, base.shape), 0, 255).astype("uint8")
        buf = io.BytesIO()
        Image.fromarray(img).save(buf, format="JPEG", quality=90)
        out.append(buf.getvalue())
    return out


def _data_root(path: Path, jpegs: list[bytes], shards: int):
    """A data root in stage 1's layout holding `jpegs`, split over `shards` tars."""
    from siclip.manifests.layout import DataRoot, shard_name
    from siclip.manifests.manifest import StageManifest

    root = DataRoot(path)
    root.shards.mkdir(parents=True)
    m = StageManifest("shards")
    per = -(-len(jpegs) // shards)
    for s in range(shards):
        part = jpegs[s * per:(s + 1) * per]
        tar = root.shards / f"{shard_name(s)}.tar"
        with tarfile.open(tar, "w") as tf:
            for i, data in enumerate(part):
                key = f"{s:05d}{i:04d}"
                for ext, payload in (("jpg", data), ("txt", b"an image"), ("json", json.dumps({"key": key}).encode())):
                    info = tarfile.TarInfo(f"{key}.{ext}")
                    info.size = len(payload)
                    tf.addfile(info, io.BytesIO(payload))
        m.add(root, shard_name(s), [tar], len(part), rows=len(part), failures={})
    m.save(root)
    return root


def _base_blip(path: Path) -> Path:
    """BLIP captioning at base size (ViT-B/16 at 384 px, BERT-base decoder), random weights, saved to `path`."""
    import torch
    from transformers import BertTokenizerFast, BlipConfig, BlipForConditionalGeneration, BlipImageProcessorPil, BlipProcessor

    cfg = BlipConfig()
    vocab_size = cfg.text_config.vocab_size
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    words = specials + [f"w{i}" for i in range(vocab_size - len(specials) - 1)] + ["[DEC]"]
    tok = BertTokenizerFast(vocab={w: i for i, w in enumerate(words)}, do_lower_case=True)
    tok.add_special_tokens({"bos_token": "[DEC]"})
    cfg.text_config.bos_token_id = tok.convert_tokens_to_ids("[DEC]")
    cfg.text_config.sep_token_id = cfg.text_config.eos_token_id = tok.sep_token_id
    cfg.text_config.pad_token_id = tok.pad_token_id
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = BlipForConditionalGeneration(cfg).eval()
    model.save_pretrained(path)
    BlipProcessor(BlipImageProcessorPil(size={"height": 384, "width": 384}), tok).save_pretrained(path)
    return path


def _tiny_blip(path: Path) -> Path:
    """siclip's `tiny` captioner (random weights, seed 0), saved to `path` as a hub folder: the pipeline loads it."""
    from siclip.captioning.models import build_tiny_captioner

    model, processor = build_tiny_captioner(0)
    model.save_pretrained(path)
    processor.save_pretrained(path)
    return path


def _pipeline_rate(model_path: Path, jpegs: list[bytes], time_cap: float, device: str = "cpu",
                   dtype: str = "float16") -> tuple[float, int]:
    """Images/s of transformers' pipeline, one image per call, after one warm-up call.

    Measured with torch's default threads and with one thread, the better one kept: on small CPUs
    torch's default threading can stall badly, and the baseline should not lose by that. Each
    setting stops after `time_cap` seconds. Returns (images/s, threads of the better setting)."""
    import warnings

    import torch
    from PIL import Image
    from transformers import pipeline

    gen = dict(do_sample=True, top_p=GEN["top_p"], temperature=GEN["temperature"],
               num_return_sequences=GEN["num_captions"], max_new_tokens=GEN["max_new_tokens"])
    on_gpu = {"device": device, "dtype": getattr(torch, dtype)} if device.startswith("cuda") else {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:  # transformers 5 folded image-to-text into image-text-to-text
            pipe, kw = pipeline("image-text-to-text", model=str(model_path), **on_gpu), {"text": ""}
        except (KeyError, ValueError):
            pipe, kw = pipeline("image-to-text", model=str(model_path), **on_gpu), {}
    # the bench's own RGB JPEGs, decoded as a pipeline user would: nothing from outside, so not siclip.images
    images = [Image.open(io.BytesIO(b)).convert("RGB") for b in jpegs]
    default_threads = torch.get_num_threads()
    best = (0.0, default_threads)
    try:
        for threads in [default_threads] if on_gpu else sorted({default_threads, 1}, reverse=True):
            torch.set_num_threads(threads)
            pipe(images[0], generate_kwargs=gen, **kw)
            t0, n = time.perf_counter(), 0
            for img in images:
                pipe(img, generate_kwargs=gen, **kw)
                n += 1
                if time.perf_counter() - t0 > time_cap:
                    break
            rate = n / (time.perf_counter() - t0)
            _log(f"pipeline with {threads} torch thread(s): {rate:.3f} images/s over {n} images")
            best = max(best, (rate, threads))
    finally:
        torch.set_num_threads(default_threads)
    return best


def _siclip_rate(model_path: Path, jpegs: list[bytes], work: Path, workers: int, batch_size: int,
                 device: str = "cpu", dtype: str = "float16") -> dict:
    from siclip.captioning.cli import run_config
    from siclip.captioning.config import CaptionsConfig
    from siclip.manifests.layout import DataRoot
    from siclip.manifests.manifest import StageManifest

    root = _data_root(work / "data", jpegs, shards=max(2, 2 * workers))
    cfg = CaptionsConfig(data=str(root.root), model=str(model_path), workers=workers, batch_size=batch_size,
                         device="cuda" if device.startswith("cuda") else "cpu",
                         dtype=dtype if device.startswith("cuda") else "auto", **GEN)
    t0 = time.perf_counter()
    rc = run_config(cfg)
    wall = time.perf_counter() - t0
    if rc != 0:
        raise RuntimeError(f"siclip captions exited {rc}")
    m = StageManifest.load(DataRoot(root.root), "captions")
    timings = [e.timing for e in m.entries.values()]
    steady = max(t.finished for t in timings) - min(t.started for t in timings)
    captions = m.total_samples * GEN["num_captions"]
    return {"images_per_s": len(jpegs) / steady, "end_to_end_images_per_s": len(jpegs) / wall,
            "bytes_per_caption": m.total_bytes / captions, "sidecar_bytes": m.total_bytes}


def _one(name: str, model_path: Path, images: int, work: Path, workers: int, batch_size: int, time_cap: float,
         device: str = "cpu", dtype: str = "float16") -> dict:
    jpegs = _images(images)
    base, threads = _pipeline_rate(model_path, jpegs, time_cap, device, dtype)
    _log(f"{name}: pipeline one image at a time: {base:.3f} images/s ({threads} torch threads)")
    ours = _siclip_rate(model_path, jpegs, work / name, workers, batch_size, device, dtype)
    res = {"images": images, "pipeline_images_per_s": base, "pipeline_threads": threads, **ours,
           "ratio": ours["images_per_s"] / base}
    _log(f"{name}: siclip captions ({workers} workers, batch {batch_size}): {ours['images_per_s']:.2f} images/s "
         f"(end to end with cluster start and model load {ours['end_to_end_images_per_s']:.2f}), "
         f"ratio {res['ratio']:.2f}x, {ours['bytes_per_caption']:.1f} sidecar bytes per caption")
    return res


def bench_captions(quick: bool = False, work_dir: str | Path | None = None, device: str = "cpu",
                   dtype: str = "float16") -> dict:
    """Images/s and bytes per caption of siclip captions against the pipeline; ratio = siclip over pipeline.

    work_dir: where the models and data roots go (<work_dir>/<model>/data), kept for inspection;
    default a temporary folder, removed at the end. device "cuda": the base-size BLIP only, in `dtype`,
    batches of 64 on one dask worker against the pipeline on the same GPU."""
    import contextlib
    import os

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from siclip.teachers import quiet_transformers

    quiet_transformers()
    place = contextlib.nullcontext(str(work_dir)) if work_dir else tempfile.TemporaryDirectory(prefix="siclip-bench-")
    with place as tmp:
        work = Path(tmp)
        if device.startswith("cuda"):
            base = _one("base", _base_blip(work / "base-model"), 64 if quick else 512, work, 1, 64, time_cap=30,
                        device=device, dtype=dtype)
            return {"ratio": base["ratio"], "images_per_s": base["images_per_s"], "model": "blip-base(random)",
                    "device": device, "dtype": dtype, "base": base}
        tiny = _one("tiny", _tiny_blip(work / "tiny-model"), 24 if quick else 128, work, 2, 16,
                    time_cap=4 if quick else 20)
        result = {"ratio": tiny["ratio"], "images_per_s": tiny["images_per_s"],
                  "bytes_per_caption": tiny["bytes_per_caption"], "model": "tiny", "tiny": tiny}
        if not quick:
            _log("base: building a base-size BLIP with random weights")
            base = _one("base", _base_blip(work / "base-model"), 8, work, 2, 4, time_cap=60)
            result.update(ratio=base["ratio"], images_per_s=base["images_per_s"],
                          bytes_per_caption=base["bytes_per_caption"], model="blip-base(random)", base=base)
    _log(f"summary: {result['model']}: siclip {result['images_per_s']:.2f} images/s, ratio {result['ratio']:.2f}x "
         f"over the pipeline, {result['bytes_per_caption']:.1f} bytes per caption")
    return result


def bench_coca(quick: bool = False, arch: str | None = None, images: int | None = None,
               device: str = "cpu", batch_size: int | None = None, dtype: str = "auto") -> dict:
    """Images/s of `siclip captions` with an open_clip CoCa (the seed's: coca_ViT-L-14) built with random weights,
    saved and named as `coca:ARCH:FILE`: 3 captions per image, top-p 0.5, temperature 0.9, 30 new tokens.

    Random weights rarely draw the end token, so every caption runs its 30 tokens: a trained captioner stops
    sooner (about 10-15 tokens for COCO-style captions). No baseline: open_clip's own `generate` is switched off
    under transformers 5. batch_size: images per generate call (default all of them); dtype: the model's
    precision on a GPU (auto: float16). Needs the extra siclip[mobileclip]; without it, {"skipped": why}."""
    try:
        import open_clip
    except Exception as e:  # ImportError, or a torchvision that does not match torch
        _log(f"coca: skipped, open_clip does not import ({type(e).__name__}): pip install 'siclip[mobileclip]'")
        return {"skipped": f"open_clip does not import ({type(e).__name__})"}
    import torch
    from safetensors.torch import save_file

    from siclip.captioning.cli import run_config
    from siclip.captioning.config import CaptionsConfig
    from siclip.manifests.layout import DataRoot
    from siclip.manifests.manifest import StageManifest

    arch = arch or ("coca_ViT-B-32" if quick else "coca_ViT-L-14")
    images = images or (2 if quick else 6)
    gen = {**GEN, "max_new_tokens": 6} if quick else GEN
    with tempfile.TemporaryDirectory(prefix="siclip-bench-coca-") as tmp:
        work = Path(tmp)
        torch.manual_seed(0)
        model = open_clip.create_model(arch)
        # open_clip leaves the decoder's vocabulary projection unset (torch.empty); give it random weights too
        torch.nn.init.normal_(model.text_decoder.text_projection, std=model.text_decoder.width ** -0.5)
        params = sum(p.numel() for p in model.parameters())
        weights = work / "coca.safetensors"
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(weights))
        del model
        root = _data_root(work / "data", _images(images), shards=1)
        cfg = CaptionsConfig(data=str(root.root), model=f"coca:{arch}:{weights}", workers=1,
                             batch_size=batch_size or images, device=device,
                             dtype=dtype if device.startswith("cuda") else "auto", **gen)
        t0 = time.perf_counter()
        if run_config(cfg) != 0:
            raise RuntimeError("siclip captions exited non-zero")
        wall = time.perf_counter() - t0
        timing = next(iter(StageManifest.load(DataRoot(root.root), "captions").entries.values())).timing
    rate = images / timing.seconds
    hours = 1e6 / rate / 3600
    _log(f"coca: {arch} ({params / 1e6:.0f}M parameters, random weights) on {device}: {rate:.3f} images/s for "
         f"{gen['num_captions']} captions of {gen['max_new_tokens']} tokens each ({images} images; end to end with "
         f"the model load {images / wall:.3f}); {hours:,.0f} hours per million images at this rate")
    return {"model": arch, "parameters": params, "images": images, "batch_size": batch_size or images,
            "images_per_s": rate, "end_to_end_images_per_s": images / wall, "hours_per_million_images": hours,
            "device": device, **{k: gen[k] for k in ("num_captions", "top_p", "temperature", "max_new_tokens")}}
