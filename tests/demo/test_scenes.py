"""The demo's scenes: the pictures show what their clean captions say; web captions are noisy as promised."""

import io
import random
import re

import numpy as np
from PIL import Image

from demo.scenes import COLOURS, RELATIONS, SHAPES, SIZES, WebNoise, make_scene, web_caption, write_inputs

OBJECT = rf"an? (?P<size>{'|'.join(SIZES)}) (?P<colour>{'|'.join(COLOURS)}) (?P<shape>{'|'.join(SHAPES)})"


def parse(caption: str):
    """(objects as (size, colour, shape), relation) of a clean caption, or an AssertionError."""
    m = re.fullmatch(rf"(?P<a>{OBJECT.replace('?P<', '?P<a_')})(?: (?P<rel>{'|'.join(RELATIONS)}) "
                     rf"(?P<b>{OBJECT.replace('?P<', '?P<b_')}))?", caption)
    assert m, caption
    objs = [(m["a_size"], m["a_colour"], m["a_shape"])]
    if m["b"]:
        objs.append((m["b_size"], m["b_colour"], m["b_shape"]))
    return objs, m["rel"]


def centre_colour(img, box):
    x0, y0, x1, y1 = box
    cx, cy = (x0 + x1) // 2, (y0 + y1) // 2
    pixels = [img.getpixel((x, y)) for x in range(cx - 1, cx + 2) for y in range(cy - 1, cy + 2)]
    return tuple(sum(p[i] for p in pixels) / len(pixels) for i in range(3))


def nearest_colour(rgb):
    return min(COLOURS, key=lambda c: sum((a - b) ** 2 for a, b in zip(COLOURS[c], rgb)))


def test_clean_captions_say_what_the_pictures_show():
    for i in range(60):
        data, scene = make_scene(3, i)
        img = Image.open(io.BytesIO(data)).convert("RGB")
        objs, relation = parse(scene.clean_caption())
        assert objs == [(o.size, o.colour, o.shape) for o in scene.objects]
        for o in scene.objects:  # the object's centre has the colour the caption names
            assert nearest_colour(centre_colour(img, o.box)) == o.colour, (i, scene.clean_caption())
            side = (o.box[2] - o.box[0]) / scene.side
            lo, hi = SIZES[o.size]
            assert lo - 0.02 <= side <= hi + 0.02
        if relation:
            a, b = scene.objects[0].box, scene.objects[1].box
            apart = {"above": a[3] <= b[1], "below": b[3] <= a[1], "left of": a[2] <= b[0], "right of": b[2] <= a[0]}
            assert apart[relation], (i, scene.clean_caption(), a, b)


def test_web_captions_carry_each_kind_of_noise_at_its_rate():
    noise = WebNoise()
    counts, two = {}, 0
    for i in range(1500):
        _, scene = make_scene(4, i)
        two += len(scene.objects) == 2
        caption, applied = web_caption(scene, random.Random(i), noise)
        for kind in applied:
            counts[kind] = counts.get(kind, 0) + 1
        if not applied:
            assert caption == scene.clean_caption()
        if "drop_object" in applied:
            assert sum(caption.lower().count(s) for s in SHAPES) == 1
        if applied == ["wrong_colour"]:  # the clean caption with one colour word swapped (and its article)
            got, clean = caption.split(), scene.clean_caption().split()
            diff = [(g, c) for g, c in zip(got, clean) if g != c and g not in ("a", "an")]
            assert len(got) == len(clean) and len(diff) == 1 and all(w in COLOURS for w in diff[0]), caption
    kept = 1500 * (1 - noise.only_boilerplate)
    for kind, p, n in (("boilerplate", noise.boilerplate, kept), ("wrong_colour", noise.wrong_colour, kept),
                       ("drop_size", noise.drop_size, kept), ("case", noise.case, kept),
                       ("only_boilerplate", noise.only_boilerplate, 1500)):
        assert abs(counts.get(kind, 0) / n - p) < 0.05, (kind, counts.get(kind, 0) / n, p)
    assert abs(counts["drop_object"] / (two * (1 - noise.only_boilerplate)) - noise.drop_object) < 0.06


def test_scenes_are_the_same_on_every_run():
    assert make_scene(0, 7)[0] == make_scene(0, 7)[0]
    assert make_scene(0, 7)[0] != make_scene(0, 8)[0]


def test_inputs_hold_clean_pairs_and_zero_shot_folders_and_a_rerun_skips(tmp_path):
    info = write_inputs(tmp_path / "inputs", clean=6, per_class=2)
    pairs = sorted((tmp_path / "inputs" / "clean").glob("*.jpg"))
    assert len(pairs) == 6 and all(parse(p.with_suffix(".txt").read_text().strip()) for p in pairs)
    for attribute, classes in (("colour", COLOURS), ("shape", SHAPES), ("size", SIZES)):
        folder = tmp_path / "inputs" / "zeroshot" / attribute
        assert sorted(p.name for p in folder.iterdir() if p.is_dir()) == sorted(classes)
        templates = (folder / "templates.txt").read_text().splitlines()
        assert templates and all("{}" in t for t in templates)
        for name in classes:  # each class's pictures show that value of the attribute
            assert len(list((folder / name).glob("*.jpg"))) == 2
            assert all(parse(t.format(name))[0][0][{"size": 0, "colour": 1, "shape": 2}[attribute]] == name
                       for t in templates)
    assert info["images"] == {"clean": 6, "colour": 16, "shape": 10, "size": 4}
    before = pairs[0].stat().st_mtime_ns
    assert write_inputs(tmp_path / "inputs", clean=6, per_class=2)["skipped"]
    assert pairs[0].stat().st_mtime_ns == before


def test_zero_shot_colour_pictures_show_their_colour(tmp_path):
    write_inputs(tmp_path, clean=2, per_class=3)
    for folder in (tmp_path / "zeroshot" / "colour").iterdir():
        for p in folder.glob("*.jpg") if folder.is_dir() else ():
            counts = {}  # pixels near each scene colour: the one object's colour covers the most
            for rgb in np.asarray(Image.open(p).convert("RGB")).reshape(-1, 3).tolist():
                c = nearest_colour(rgb)
                if sum((a - b) ** 2 for a, b in zip(COLOURS[c], rgb)) < 40 ** 2:
                    counts[c] = counts.get(c, 0) + 1
            assert max(counts, key=counts.get) == folder.name, p
