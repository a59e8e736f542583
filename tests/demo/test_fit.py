"""`python -m demo.fit`: the tiny captioner, fitted on clean pairs, learns to name what it sees; it loads
through the stage's own captioner path; a rerun skips; bad input is one clear error."""

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from demo.fit import fit
from siclip.manifests.errors import SiclipError

REPO = Path(__file__).resolve().parents[2]  # `python -m demo.fit` runs from a checkout's root
COLOURS = ("red", "green", "blue", "yellow", "purple", "orange", "white", "black")


def write_pairs(folder, seed, n):
    from demo.scenes import make_scene

    folder.mkdir(parents=True)
    scenes = []
    for i in range(n):
        data, scene = make_scene(seed, i, objects=1)
        (folder / f"{i:05d}.jpg").write_bytes(data)
        (folder / f"{i:05d}.txt").write_text(scene.clean_caption())
        scenes.append(scene)
    return scenes


@pytest.fixture(scope="module")
def fitted(tmp_path_factory):
    base = tmp_path_factory.mktemp("fit")
    write_pairs(base / "pairs", seed=11, n=240)
    summary = fit(base / "pairs", base / "captioner", steps=160, batch_size=32, seed=0, log=lambda m: None)
    return base, summary


def test_fitted_captioner_names_the_colour_of_held_out_pictures(fitted, tmp_path):
    from PIL import Image

    from siclip.captioning.generate import build_captioner

    base, summary = fitted
    assert summary["steps"] == 160 and summary["loss"] < summary["loss_first"] / 3
    held_out = write_pairs(tmp_path / "held_out", seed=12, n=48)
    # loaded as `siclip captions --model DIR` loads it, sampling as the stage samples
    captioner = build_captioner({"model": str(base / "captioner"), "num_captions": 1, "top_p": 0.5, "temperature": 0.9,
                                 "max_new_tokens": 12, "seed": 0}, "cpu", "float32", False, threads=1)
    images = [Image.open(tmp_path / "held_out" / f"{i:05d}.jpg").convert("RGB") for i in range(len(held_out))]
    captions = captioner.caption(captioner.prepare(images), [str(i) for i in range(len(held_out))])
    named = [next((w for w in re.findall(r"[a-z]+", c[0]) if w in COLOURS), None) for c in captions]
    right = sum(n == s.objects[0].colour for n, s in zip(named, held_out)) / len(held_out)
    assert right >= 0.5, (right, captions[:5])  # chance: 1 in 8


def test_a_rerun_with_the_same_arguments_skips(fitted):
    base, summary = fitted
    before = (base / "captioner" / "model.safetensors").stat().st_mtime_ns
    again = fit(base / "pairs", base / "captioner", steps=160, batch_size=32, seed=0, log=lambda m: None)
    assert again["skipped"] and again["steps"] == summary["steps"]
    assert (base / "captioner" / "model.safetensors").stat().st_mtime_ns == before
    assert json.loads((base / "captioner" / "fit.json").read_text())["pairs"] == 240


def test_pairs_without_captions_are_one_clear_error(tmp_path):
    (tmp_path / "pairs").mkdir()
    (tmp_path / "pairs" / "a.jpg").write_bytes(b"x")
    with pytest.raises(SiclipError, match=r"--pairs .*pairs: needs two or more images with a caption"):
        fit(tmp_path / "pairs", tmp_path / "out", steps=1)
    res = subprocess.run([sys.executable, "-m", "demo.fit", "--pairs", str(tmp_path / "nothing"), "--out",
                          str(tmp_path / "out"), "--steps", "1"], capture_output=True, text=True, cwd=REPO)
    assert res.returncode == 2 and res.stderr.strip().splitlines()[-1].startswith("fit: error: --pairs")


def test_an_image_that_does_not_decode_is_skipped_and_counted(tmp_path):
    from PIL import Image

    write_pairs(tmp_path / "pairs", seed=13, n=3)
    Image.new("RGBA", (64, 64), (200, 30, 30, 0)).save(tmp_path / "pairs" / "clear.png")  # transparent: white
    (tmp_path / "pairs" / "clear.txt").write_text("a white picture")
    (tmp_path / "pairs" / "notes.jpg").write_text("a text file with an image's name\n")
    (tmp_path / "pairs" / "notes.txt").write_text("a caption for it")
    lines = []
    summary = fit(tmp_path / "pairs", tmp_path / "out", steps=1, batch_size=2, log=lines.append)
    assert summary["pairs"] == 4 and summary["unreadable"] == 1
    assert any(ln.startswith(f"fit: skipped 1 unreadable image of 5: {tmp_path / 'pairs' / 'notes.jpg'}: not a "
                             "readable image") for ln in lines), lines
