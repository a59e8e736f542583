"""The images `siclip eval` reads from files decode as the shards' images did in stage 1: a transparent PNG
gives the eval the pixels training saw, and a file that is no image is skipped and counted, not fatal."""

from __future__ import annotations

import io
import json

import numpy as np
import torch
from PIL import Image
from siclip_testing import SMALL, siclip, write_list

from siclip.images import Preprocess

SIZE = 64  # stage 1's --image-size in SMALL: a 64 px image is written as it is, re-encoded as JPEG q95


def transparent_pngs() -> dict[str, bytes]:
    """Flat shapes on a transparent background whose stored colour is black, as clip art often stores it."""
    rgba = np.zeros((SIZE, SIZE, 4), np.uint8)
    rgba[8:28, 8:28] = (230, 20, 20, 255)  # opaque red
    rgba[36:56, 36:56] = (20, 20, 230, 128)  # half-transparent blue
    la = np.zeros((SIZE, SIZE, 2), np.uint8)
    la[8:56, 8:28] = (40, 255)
    la[8:56, 36:56] = (40, 100)
    pal = Image.new("P", (SIZE, SIZE), 0)
    pal.putpalette([0, 0, 0, 20, 160, 20] + [0] * 762)
    pal.paste(1, (16, 16, 48, 48))
    out = {}
    for name, img, kw in (("rgba", Image.fromarray(rgba, "RGBA"), {}), ("la", Image.fromarray(la, "LA"), {}),
                          ("palette", pal, {"transparency": 0})):
        buf = io.BytesIO()
        img.save(buf, "PNG", **kw)
        out[name] = buf.getvalue()
    return out


def as_pixels(x: torch.Tensor, p: Preprocess) -> np.ndarray:
    """A normalised (3, H, W) input back in 0..255."""
    return ((x * torch.tensor(p.std).view(3, 1, 1) + torch.tensor(p.mean).view(3, 1, 1)) * 255).numpy()


def test_a_transparent_png_reads_the_same_from_disk_in_eval_as_from_its_shard(tmp_path):
    """The issue's check: eval's preprocessing of the file and the shard's sample after `siclip shards`
    (real img2dataset over loopback) agree within JPEG error; transparent areas are white in both."""
    from siclip.manifests.layout import DataRoot
    from demo.loopback import ImageServer
    from siclip.images import OPENAI_MEAN, OPENAI_STD
    from siclip.training.data import SampleSettings, all_shards, eval_batches

    pngs = transparent_pngs()
    for name, data in pngs.items():
        (tmp_path / f"{name}.png").write_bytes(data)
    with ImageServer({f"img/{name}.png": data for name, data in pngs.items()}) as server:
        urls = write_list(tmp_path / "urls.parquet", [(f"{server.base}/img/{name}.png", name) for name in pngs])
        siclip("shards", "--urls", urls, "--data", tmp_path / "data", *SMALL, "--set", "min_success_ratio=0")
    root = DataRoot(tmp_path / "data")
    settings = SampleSettings(seed=0, image_size=SIZE, context_length=16, synthetic_captions=0, train=False)
    from_shards = {}
    for batch in eval_batches(root, all_shards(root), settings, 8):
        from_shards.update(zip(batch["web"], batch["pixels"].numpy().astype(np.float32)))
    assert set(from_shards) == set(pngs)

    preprocess = Preprocess(SIZE, list(OPENAI_MEAN), list(OPENAI_STD))
    for name in pngs:
        shard = from_shards[name]
        assert shard[:, :4, :4].min() > 245, name  # stage 1 mattes the transparent corner onto white
        for how, source in (("PIL image", lambda: Image.open(tmp_path / f"{name}.png")),
                            ("path", lambda: tmp_path / f"{name}.png")):
            disk = as_pixels(preprocess(source()), preprocess)
            # "within JPEG error": the shard holds the JPEG (q95, as stage 1 encodes) of what eval reads
            jpeg = io.BytesIO()
            as_read = np.rint(disk).clip(0, 255).astype(np.uint8).transpose(1, 2, 0)
            Image.fromarray(as_read).save(jpeg, "JPEG", quality=95)
            disk_as_jpeg = np.asarray(Image.open(jpeg), dtype=np.float32).transpose(2, 0, 1)
            assert np.abs(disk_as_jpeg - shard).max() <= 3, (name, how)  # the same here; another libjpeg rounds apart
            assert np.abs(disk - shard).mean() < 2.5, (name, how)


def test_zero_shot_skips_a_file_that_is_no_image_counts_it_and_still_gives_a_result(tmp_path, tokenizer, capsys):
    from siclip.images import OPENAI_MEAN, OPENAI_STD
    from siclip.training.evaluate import ModelEncoder, zeroshot, zeroshot_set
    from siclip.training.model import build_model

    folder = tmp_path / "classes"
    for colour in ("red", "blue"):
        (folder / colour).mkdir(parents=True)
        for i in range(2):
            rgba = (255, 0, 0, 255 - 60 * i) if colour == "red" else (0, 0, 255, 255 - 60 * i)
            Image.new("RGBA", (40, 40), rgba).save(folder / colour / f"{i}.png")
    bad = folder / "red" / "notes.jpg"
    bad.write_text("not a picture, whatever its name says\n")
    torch.manual_seed(0)
    model = build_model("tiny").eval()
    preprocess = Preprocess(model.config.image.image_size, list(OPENAI_MEAN), list(OPENAI_STD))
    out = zeroshot(ModelEncoder(model, tokenizer, preprocess), zeroshot_set(folder, templates=["a {}."]))
    assert out["images"] == 4 and out["unreadable"] == 1 and out["classes"] == 2
    assert 0 <= out["top1"] <= out["top5"] == 1.0
    err = capsys.readouterr().err
    assert f"skipped 1 unreadable image of 5: {bad}: not a readable image (UnidentifiedImageError" in err


def test_siclip_eval_reports_the_skipped_file_in_its_output_and_exits_0(tmp_path):
    from siclip.training.model import build_model

    torch.manual_seed(0)
    build_model("tiny").save_pretrained(tmp_path / "run" / "final")
    folder = tmp_path / "shapes"
    for shape in ("circle", "square"):
        (folder / shape).mkdir(parents=True)
        Image.new("LA", (48, 48), (200, 128 if shape == "circle" else 255)).save(folder / shape / "0.png")
    (folder / "square" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    res = siclip("eval", "--run", tmp_path / "run", "--imagefolder", folder, "--json")
    out = json.loads(res.stdout)["zeroshot"]
    assert out["images"] == 2 and out["unreadable"] == 1
    assert "Traceback" not in res.stderr and f"{folder / 'square' / 'broken.png'}: not a readable image" in res.stderr
    table = siclip("eval", "--run", tmp_path / "run", "--imagefolder", folder).stdout
    assert "1 unreadable" in table


def test_siclip_eval_shows_progress_for_each_folder_on_stderr_and_keeps_stdout_for_the_json(tmp_path):
    """A progress line per folder (count, rate, ETA, the skipped so far) on stderr; stdout is the result alone."""
    import re

    from siclip.training.model import build_model

    torch.manual_seed(0)
    build_model("tiny").save_pretrained(tmp_path / "run" / "final")
    folders = [tmp_path / "a" / "shapes", tmp_path / "b" / "colours"]
    for folder, n in zip(folders, (3, 70)):  # 140 images: three batches of 64 or fewer
        for cls in ("one", "two"):
            (folder / cls).mkdir(parents=True)
            for i in range(n):
                Image.new("RGB", (20, 20), (60 * i % 256, 0, 200 if cls == "one" else 0)).save(folder / cls / f"{i}.png")
    (folders[1] / "two" / "x.jpg").write_text("a text file named like a picture\n")
    res = siclip("eval", "--run", tmp_path / "run", *[a for f in folders for a in ("--imagefolder", f)], "--json")
    out = json.loads(res.stdout)  # the whole of stdout is the one JSON object
    assert set(out) == {"zeroshot"} and set(out["zeroshot"]) == {"shapes", "colours"}
    assert out["zeroshot"]["shapes"]["unreadable"] == 0 and out["zeroshot"]["shapes"]["images"] == 6
    assert out["zeroshot"]["colours"]["unreadable"] == 1 and out["zeroshot"]["colours"]["images"] == 140
    lines = res.stderr.splitlines()
    progress = {f: [ln for ln in lines if ln.startswith(f"eval: zero-shot {f}: ")
                    and re.search(r"\d+/\d+ images .*\| [\d.,]+ images/s \| ETA \w+", ln)] for f in folders}
    assert progress[folders[0]][-1].startswith(f"eval: zero-shot {folders[0]}: 6/6 images (100%) | ")
    assert not progress[folders[0]][-1].endswith("skipped")
    assert progress[folders[1]][-1].startswith(f"eval: zero-shot {folders[1]}: 141/141 images (100%) | ")
    assert progress[folders[1]][-1].endswith(" | 1 unreadable, skipped")
