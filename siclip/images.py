"""One decode for every image that enters siclip, whether from a file (eval folders, clean caption pairs)
or from a shard member: an RGB PIL image, decoded the way stage 1 decoded what it wrote into the shards.

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
