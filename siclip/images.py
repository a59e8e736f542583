"""Every image that enters siclip, decoded once and viewed one way.

Decode: whether from a file (eval folders, clean caption pairs) or from a shard member, an RGB PIL image,
decoded the way stage 1 decoded what it wrote into the shards (below). View: the random resized crop and flip,
drawn (`draw_view`), recorded by stage 2 beside the teacher's embedding of it as fractions of the image, and
replayed (`view_box`, `apply_view`) by stage 2's teacher and by training; `view_pixels` makes a box of an image
into a model's square input. Normalisation: `Preprocess`, a model's own image size, mean and std (OpenAI's by
default).

Stage 1's img2dataset decodes with OpenCV (`cv2.IMREAD_UNCHANGED`) and, when the result has an alpha
channel, mattes it onto white: out = rint(a/255 * c + 255 - a). This module matches that, mode by mode:
- RGBA, LA, PA, and palette or RGB images with a transparency entry: composited onto white, by that formula;
- greyscale (1, L) and 16-bit greyscale: a transparency entry is ignored, as OpenCV ignores it for grey PNGs;
- EXIF orientation is not applied (IMREAD_UNCHANGED does not apply it either);
- CMYK: Pillow's conversion, within 1-2 levels of OpenCV's.
One deliberate difference: 16-bit greyscale (I;16, I) is scaled from its full range (v / 257). OpenCV keeps
16 bits and img2dataset's JPEG or WebP encode then saturates every value above 255 to white, which is a
defect to avoid in the eval, not a decode to copy.
"""

from __future__ import annotations

import io
import json
import math
import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from siclip.manifests.errors import SiclipError
from siclip.manifests.messages import one_line

# Image file suffixes and shard member extensions siclip reads, in the order a sample's members are tried.
IMAGE_EXTS = ("jpg", "jpeg", "png", "webp", "bmp", "gif")
# OpenAI CLIP's image statistics (pixels in [0, 1]): the default normalisation of every siclip model.
OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)


class UnreadableImage(SiclipError):
    """An image that does not decode. `source` names it, `reason` is the decoder's complaint; callers that
    read many images catch this, count the image as skipped and go on."""

    def __init__(self, source: str, reason: str):
        super().__init__(f"{source}: not a readable image ({reason})")
        self.source, self.reason = source, reason


def is_image_file(path: str | Path) -> bool:
    """Whether a file's suffix is one of IMAGE_EXTS (case-insensitive)."""
    return Path(path).suffix.lower().lstrip(".") in IMAGE_EXTS


def image_member(sample: dict) -> str | None:
    """The extension of a shard sample's image member (the first of IMAGE_EXTS it has), None if it has none."""
    return next((ext for ext in IMAGE_EXTS if ext in sample), None)


def decode_image(source, name: str | None = None):
    """Bytes, a path, an open binary file or an already opened PIL image -> an RGB PIL image, decoded as
    stage 1 decodes (module docstring). Raises UnreadableImage, naming `name` (else the path), when it does not."""
    from PIL import Image

    label = name or (str(source) if isinstance(source, (str, Path)) else "image")
    try:
        if isinstance(source, Image.Image):
            source.load()
            return _to_rgb(source)
        if isinstance(source, (bytes, bytearray, memoryview)):
            source = io.BytesIO(source)
        with Image.open(source) as img:
            img.load()  # now, inside the try: a truncated file fails here, not later in a resize
            return _to_rgb(img)
    except Exception as e:  # whatever the decoder raises for foreign or broken data is one outcome to the caller
        raise UnreadableImage(label, one_line(e)) from None


class SkippedImages:
    """A reader of many images that skips those that do not decode: `decode` gives decode_image's RGB image, or
    None for one that does not decode, which it counts (`count`) and keeps the first of (`first`)."""

    def __init__(self):
        self.count, self.first = 0, None

    def decode(self, source, name: str | None = None):
        try:
            return decode_image(source, name)
        except UnreadableImage as e:
            self.count += 1
            self.first = self.first or e
            return None

    def summary(self, of: int) -> str:
        """'skipped N unreadable image(s) of `of`: the first's error (and M more)', or '' when none was skipped."""
        if not self.count:
            return ""
        more = f" (and {self.count - 1} more)" if self.count > 1 else ""
        return f"skipped {self.count} unreadable image{'s' * (self.count > 1)} of {of}: {self.first}{more}"


def _to_rgb(img):
    from PIL import Image

    if img.mode.startswith("I;16") or img.mode == "I":
        grey = np.asarray(img).astype(np.float32).clip(0, 65535) / 257
        return Image.fromarray(np.rint(grey).astype(np.uint8), "L").convert("RGB")
    if img.mode in ("1", "L"):  # a grey PNG's transparency entry is ignored, as OpenCV does
        return img.convert("RGB")
    if img.has_transparency_data:
        return _over_white(img.convert("RGBA"))
    return img.convert("RGB")


def _over_white(rgba):
    """img2dataset's matte: rint(a/255 * c + 255 - a). In float32 it rounds exactly as in float64: a*c/255
    is never within 1/510 of a half, far more than float32's error at these magnitudes."""
    from PIL import Image

    px = np.asarray(rgba, dtype=np.float32)
    alpha = px[..., 3:]
    out = alpha / 255 * px[..., :3] + 255 - alpha
    return Image.fromarray(np.rint(out.clip(0, 255)).astype(np.uint8), "RGB")


# ----------------------------------------------------------------------------- the view


def draw_view(rng: random.Random, scale: tuple[float, float], flip: bool = True) -> list[float]:
    """One augmentation: [x0, y0, w, h] as fractions of the image, and flip (0/1). A random-resized crop (area in
    `scale`, aspect 3/4..4/3) and a horizontal flip (unless `flip` is false), as stage 2 records it so that
    training can replay exactly the view the teacher saw."""
    area = rng.uniform(*scale)
    ratio = math.exp(rng.uniform(math.log(3 / 4), math.log(4 / 3)))
    w = min(1.0, math.sqrt(area * ratio))
    h = min(1.0, math.sqrt(area / ratio))
    x0 = rng.uniform(0, 1 - w)
    y0 = rng.uniform(0, 1 - h)
    flipped = rng.random() < 0.5  # drawn either way, so the crops are the same with and without flips
    return [x0, y0, w, h, float(flip and flipped)]


def view_box(params, width: int, height: int) -> tuple[tuple[int, int, int, int], bool]:
    """The pixel box and flip of one recorded view (x0, y0, w, h as fractions of the image, flip >= 0.5)."""
    x0, y0, w, h, flip = (float(v) for v in params[:5])
    box = (round(x0 * width), round(y0 * height), round((x0 + w) * width), round((y0 + h) * height))
    return box, flip >= 0.5


def apply_view(img, params):
    """Replay one recorded view on a PIL image: its box, mirrored if it was."""
    from PIL import Image

    box, flip = view_box(params, *img.size)
    out = img.crop(box)
    return out.transpose(Image.Transpose.FLIP_LEFT_RIGHT) if flip else out


def center_box(width: int, height: int, box=None) -> tuple[int, int, int, int]:
    """The largest centered square of `box` (default: the whole image): resize-shortest-side then center-crop."""
    x0, y0, x1, y1 = box or (0, 0, width, height)
    side = min(x1 - x0, y1 - y0)
    left, top = x0 + (x1 - x0 - side) // 2, y0 + (y1 - y0 - side) // 2
    return left, top, left + side, top + side


def random_resized_box(width: int, height: int, scale, rng: random.Random) -> tuple[int, int, int, int]:
    """A random crop of `scale` of the area and aspect 3/4..4/3 in pixels (ten tries, then the center square):
    training's own augmentation where no recorded view is replayed."""
    area = width * height
    for _ in range(10):
        target = area * rng.uniform(*scale)
        ratio = math.exp(rng.uniform(math.log(3 / 4), math.log(4 / 3)))
        w, h = round(math.sqrt(target * ratio)), round(math.sqrt(target / ratio))
        if 0 < w <= width and 0 < h <= height:
            x0, y0 = rng.randint(0, width - w), rng.randint(0, height - h)
            return x0, y0, x0 + w, y0 + h
    return center_box(width, height)


def view_pixels(img, box, size: int, flip: bool) -> np.ndarray:
    """The box of the image (default: all of it), made square (center), resized to size x size, mirrored if
    `flip`: uint8 (3, size, size)."""
    from PIL import Image

    out = img.resize((size, size), Image.Resampling.BICUBIC, box=center_box(*img.size, box))
    if flip:
        out = out.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    return np.asarray(out, dtype=np.uint8).transpose(2, 0, 1).copy()


# ----------------------------------------------------------------------------- normalisation

PREPROCESS_FILE = "preprocess.json"  # beside a model's weights: its image size, mean and std


@dataclass
class Preprocess:
    """An image (PIL image of any mode, bytes or a path; decoded by decode_image, alpha onto white) ->
    normalised float tensor (3, size, size): shortest side resized, center crop. UnreadableImage if it won't decode."""

    image_size: int
    mean: list
    std: list

    def __call__(self, img):
        import torch

        x = torch.from_numpy(view_pixels(decode_image(img), None, self.image_size, False)).float().div_(255)
        return (x - torch.tensor(self.mean).view(3, 1, 1)) / torch.tensor(self.std).view(3, 1, 1)

    def save(self, folder: Path) -> None:
        (Path(folder) / PREPROCESS_FILE).write_text(json.dumps(
            {"image_size": self.image_size, "mean": list(self.mean), "std": list(self.std)}, indent=1) + "\n")

    @classmethod
    def for_model(cls, folder: Path, image_size: int) -> "Preprocess":
        path = Path(folder) / PREPROCESS_FILE
        if path.is_file():
            d = json.loads(path.read_text())
            return cls(int(d["image_size"]), d["mean"], d["std"])
        return cls(image_size, list(OPENAI_MEAN), list(OPENAI_STD))
