"""Compositional scenes: the demo's data, drawn with Pillow.

A scene holds one or two objects, each with a size (small/large), a colour and a shape; two objects
stand in a relation (above, below, left of, right of). Its *clean* caption says exactly that
("a small red circle above a large blue square"). Its *web* caption is what alt-text is like: the
clean caption through seeded noise (boilerplate, a wrong colour, a missing object, a dropped
relation or size, case noise), each with its own probability, so the demo's web captions are noisy
the way CC3M's are while the clean ones stand in for MSCOCO.

`write_inputs` writes the demo's inputs, outside the data root: the clean pairs (image + .txt, the
captioner's training set) and held-out zero-shot folders (one class sub-folder per attribute value,
with a `templates.txt` of prompts). The web part is served on 127.0.0.1 by `python -m demo`.
"""

from __future__ import annotations

import io
import json
import random
from dataclasses import dataclass
from pathlib import Path

COLOURS = {"red": (215, 35, 35), "green": (35, 170, 60), "blue": (35, 70, 215), "yellow": (240, 215, 30),
           "purple": (135, 45, 175), "orange": (245, 135, 20), "white": (248, 248, 248), "black": (15, 15, 15)}
SHAPES = ("circle", "square", "triangle", "star", "cross")
SIZES = {"small": (0.18, 0.24), "large": (0.36, 0.44)}  # side of the object's box as a fraction of the image
RELATIONS = ("above", "below", "left of", "right of")
BOILERPLATE = ("stock photo", "IMG_{n}.jpg", "click to enlarge", "free download", "royalty free vector",
               "| shutterstock", "image may contain:", "DSC{n}", "wallpaper hd", "clipart")
SCENES_FILE = "scenes.json"


@dataclass
class Obj:
    size: str
    colour: str
    shape: str
    box: tuple[int, int, int, int] = (0, 0, 0, 0)  # where it was drawn: x0, y0, x1, y1

    def words(self, size: bool = True) -> str:
        return " ".join(([self.size] if size else []) + [self.colour, self.shape])


@dataclass
class Scene:
    objects: list[Obj]
    relation: str | None = None  # objects[0] <relation> objects[1]
    side: int = 128

    def clean_caption(self) -> str:
        """What the picture shows, exactly: 'a small red circle above a large blue square'."""
        first = with_article(self.objects[0].words())
        if len(self.objects) == 1:
            return first
        return f"{first} {self.relation} {with_article(self.objects[1].words())}"


@dataclass
class WebNoise:
    """Probabilities of each kind of alt-text noise; each is drawn independently per caption."""

    boilerplate: float = 0.4  # a stock-photo phrase or a file name before or after the caption
    only_boilerplate: float = 0.05  # the caption is nothing but a file name
    wrong_colour: float = 0.15  # one object's colour is another
    drop_object: float = 0.25  # two objects: only the first is named
    drop_relation: float = 0.25  # two objects: 'a red circle and a blue square'
    drop_size: float = 0.4  # the size words go
    case: float = 0.2  # UPPER or Title Case


def with_article(words: str) -> str:
    return ("an " if words[0] in "aeiou" else "a ") + words


def random_scene(rng: random.Random, objects: int | None = None, side: int | None = None) -> Scene:
    """A scene with random attributes; two objects never share colour and shape both."""
    n = objects or rng.choice((1, 2, 2))
    objs = [Obj(rng.choice(list(SIZES)), rng.choice(list(COLOURS)), rng.choice(SHAPES)) for _ in range(n)]
    while n == 2 and (objs[0].colour, objs[0].shape) == (objs[1].colour, objs[1].shape):
        objs[1].colour = rng.choice(list(COLOURS))
    return Scene(objs, rng.choice(RELATIONS) if n == 2 else None, side or rng.randint(96, 160))


def web_caption(scene: Scene, rng: random.Random, noise: WebNoise = WebNoise()) -> tuple[str, list[str]]:
    """(a noisy alt-text caption of the scene, the kinds of noise applied)."""
    applied = []
    objs = [Obj(o.size, o.colour, o.shape) for o in scene.objects]
    if rng.random() < noise.only_boilerplate:
        return f"IMG_{rng.randint(1000, 9999)}.jpg", ["only_boilerplate"]
    if rng.random() < noise.wrong_colour:
        o = rng.choice(objs)
        o.colour = rng.choice([c for c in COLOURS if c != o.colour])
        applied.append("wrong_colour")
    keep_size = rng.random() >= noise.drop_size
    if not keep_size:
        applied.append("drop_size")
    text = with_article(objs[0].words(keep_size))
    if len(objs) == 2:
        if rng.random() < noise.drop_object:
            applied.append("drop_object")
        else:
            joint = "and"
            if rng.random() < noise.drop_relation:
                applied.append("drop_relation")
            else:
                joint = scene.relation
            text = f"{text} {joint} {with_article(objs[1].words(keep_size))}"
    if rng.random() < noise.boilerplate:
        phrase = rng.choice(BOILERPLATE).format(n=rng.randint(1000, 9999))
        text = f"{phrase} {text}" if rng.random() < 0.5 else f"{text} {phrase}"
        applied.append("boilerplate")
    if rng.random() < noise.case:
        text = text.upper() if rng.random() < 0.5 else text.title()
        applied.append("case")
    return text, applied


# ----------------------------------------------------------------------------- drawing


def background(rng: random.Random, side: int):
    """A mid-tone background (plain, gradient, stripes or noise) that white and black objects stand out on."""
    from PIL import Image, ImageDraw

    def tone():
        base = rng.randint(95, 170)
        return tuple(max(0, min(255, base + rng.randint(-25, 25))) for _ in range(3))

    a, b = tone(), tone()
    style = rng.choice(("plain", "gradient", "stripes", "noise"))
    img = Image.new("RGB", (side, side), a)
    draw = ImageDraw.Draw(img)
    if style == "gradient":
        for y in range(side):
            t = y / max(side - 1, 1)
            draw.line([(0, y), (side, y)], fill=tuple(round(a[i] * (1 - t) + b[i] * t) for i in range(3)))
    elif style == "stripes":
        step = rng.randint(6, 16)
        for x in range(0, side, 2 * step):
            draw.rectangle((x, 0, x + step - 1, side), fill=b)
    elif style == "noise":
        img = Image.blend(img, _noise(rng, side, rng.randint(20, 50)), 0.35)
    return img


def _noise(rng: random.Random, side: int, sigma: float):
    """Grey Gaussian noise from the scene's own generator (Pillow's effect_noise is not seedable)."""
    import numpy as np
    from PIL import Image

    grey = np.random.default_rng(rng.getrandbits(32)).normal(128, sigma, (side, side)).clip(0, 255)
    return Image.fromarray(grey.astype(np.uint8), "L").convert("RGB")


def _draw(draw, obj: Obj) -> None:
    import math

    x0, y0, x1, y1 = obj.box
    fill = COLOURS[obj.colour]
    cx, cy, r = (x0 + x1) / 2, (y0 + y1) / 2, (x1 - x0) / 2
    if obj.shape == "circle":
        draw.ellipse(obj.box, fill=fill)
    elif obj.shape == "square":
        draw.rectangle(obj.box, fill=fill)
    elif obj.shape == "triangle":
        draw.polygon([(x0, y1), (x1, y1), (cx, y0)], fill=fill)
    elif obj.shape == "star":
        pts = [(cx + (r if i % 2 == 0 else r * 0.45) * math.sin(i * math.pi / 5),
                cy - (r if i % 2 == 0 else r * 0.45) * math.cos(i * math.pi / 5)) for i in range(10)]
        draw.polygon(pts, fill=fill)
    elif obj.shape == "cross":
        w = r * 0.38
        draw.rectangle((cx - w, y0, cx + w, y1), fill=fill)
        draw.rectangle((x0, cy - w, x1, cy + w), fill=fill)


def _place(scene: Scene, rng: random.Random) -> None:
    """Boxes for the objects: anywhere for one; for two, on either side of the relation's axis, apart."""
    s = scene.side
    sides = [round(s * rng.uniform(*SIZES[o.size])) for o in scene.objects]
    margin = max(2, s // 40)
    if len(scene.objects) == 1:
        w = sides[0]
        x, y = rng.randint(margin, s - w - margin), rng.randint(margin, s - w - margin)
        scene.objects[0].box = (x, y, x + w, y + w)
        return
    first_low = scene.relation in ("above", "left of")  # objects[0] nearer the top / the left edge
    near, far = (0, 1) if first_low else (1, 0)
    # along the axis: the near object in the first part, the far one in the rest, never overlapping
    gap = s - sides[0] - sides[1] - 2 * margin
    a = margin + rng.randint(0, max(0, gap // 3))
    b = s - margin - sides[far] - rng.randint(0, max(0, gap // 3))
    along = {near: a, far: max(b, a + sides[near] + 1)}
    for i, o in enumerate(scene.objects):
        w = sides[i]
        centre = s / 2 + rng.uniform(-0.08, 0.08) * s  # across the axis: near the middle, so the relation is clear
        across = round(min(max(centre - w / 2, margin), s - w - margin))
        if scene.relation in ("above", "below"):
            o.box = (across, along[i], across + w, along[i] + w)
        else:
            o.box = (along[i], across, along[i] + w, across + w)


def render(scene: Scene, rng: random.Random, quality: int = 90) -> bytes:
    """The scene as JPEG bytes, on a random background with a little sensor noise."""
    from PIL import Image, ImageDraw

    _place(scene, rng)
    img = background(rng, scene.side)
    draw = ImageDraw.Draw(img)
    for o in scene.objects:
        _draw(draw, o)
    img = Image.blend(img, _noise(rng, scene.side, 12), 0.06)
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=quality)
    return buf.getvalue()


def make_scene(seed: int, index: int, objects: int | None = None) -> tuple[bytes, Scene]:
    """Scene `index` of stream `seed`: the same bytes and scene on every run."""
    rng = random.Random(f"scene:{seed}:{index}")
    scene = random_scene(rng, objects)
    return render(scene, rng), scene


# ----------------------------------------------------------------------------- the demo's inputs


def web_part(n: int, seed: int = 0, noise: WebNoise = WebNoise()) -> tuple[dict[str, bytes], list[tuple[str, str]]]:
    """n scenes as served files plus (relative path, noisy web caption) rows."""
    files, rows = {}, []
    for i in range(n):
        data, scene = make_scene(seed, i)
        path = f"scenes/{i:06d}.jpg"
        files[path] = data
        rows.append((path, web_caption(scene, random.Random(f"web:{seed}:{i}"), noise)[0]))
    return files, rows


def zeroshot_templates(attribute: str) -> list[str]:
    """Prompts for one attribute's classes, averaged over the other attributes (CLIP's prompt ensembling)."""
    sizes, colours, shapes = list(SIZES), list(COLOURS), list(SHAPES)
    if attribute == "colour":
        return [f"a {s} {{}} {sh}" for s in sizes for sh in shapes]
    if attribute == "shape":
        return [f"a {s} {c} {{}}" for s in sizes for c in colours]
    if attribute == "size":
        return [f"a {{}} {c} {sh}" for c in colours for sh in shapes]
    raise ValueError(attribute)


def write_inputs(folder: str | Path, clean: int = 600, per_class: int = 16, seed: int = 0) -> dict:
    """The clean pairs and the zero-shot folders under `folder`; skipped when the same ones are there.

    clean/NNNNNN.jpg + .txt: clean captions (the captioner's training set, MSCOCO's stand-in);
    zeroshot/{colour,shape,size}/<class>/*.jpg with templates.txt: single-object held-out scenes.
    Streams differ from the web part's, so no picture is in both.
    """
    folder = Path(folder)
    params = {"clean": clean, "per_class": per_class, "seed": seed, "version": 1}
    record = folder / SCENES_FILE
    if record.is_file() and json.loads(record.read_text()).get("params") == params:
        return {"skipped": True, **json.loads(record.read_text())}
    pairs = folder / "clean"
    pairs.mkdir(parents=True, exist_ok=True)
    for i in range(clean):
        data, scene = make_scene(seed + 1_000, i)
        (pairs / f"{i:06d}.jpg").write_bytes(data)
        (pairs / f"{i:06d}.txt").write_text(scene.clean_caption() + "\n")
    counts = {}
    for attribute, classes in (("colour", list(COLOURS)), ("shape", list(SHAPES)), ("size", list(SIZES))):
        root = folder / "zeroshot" / attribute
        n = 0
        for c, name in enumerate(classes):
            (root / name).mkdir(parents=True, exist_ok=True)
            for j in range(per_class):
                rng = random.Random(f"zeroshot:{seed}:{attribute}:{name}:{j}")
                scene = random_scene(rng, objects=1)
                setattr(scene.objects[0], attribute, name)
                (root / name / f"{j:04d}.jpg").write_bytes(render(scene, rng))
                n += 1
        (root / "templates.txt").write_text("\n".join(zeroshot_templates(attribute)) + "\n")
        counts[attribute] = n
    info = {"params": params, "clean": str(pairs), "zeroshot": {a: str(folder / "zeroshot" / a) for a in counts},
            "images": {"clean": clean, **counts}}
    record.write_text(json.dumps(info, indent=1) + "\n")
    return info
