"""Real images for `make bench-real`: the emoji of Debian's Noto Color Emoji font, captioned with their Unicode
names and CLDR keywords, grouped by Unicode's emoji groups and subgroups.

Sources (Debian packages; `bench/real.py` installs them when missing):
  fonts-noto-color-emoji  /usr/share/fonts/truetype/noto/NotoColorEmoji.ttf  (a colour bitmap font: size 109)
  unicode-data            /usr/share/unicode/emoji/emoji-test.txt   (every emoji, its name, group and subgroup)
  unicode-cldr-core       /usr/share/unicode/cldr/common/annotations{,Derived}/en.xml   (keywords)
Skin-tone variants and the Component group are left out: they repeat an emoji with another tone.

Each emoji is rendered at a few sizes and positions on varied backgrounds (`demo.scenes`' own), or, for
`make bench-peer`'s second set, on a transparent background as an RGBA PNG. The held-out split is by emoji, not by rendering: no held-out emoji is ever seen in training.
"""

from __future__ import annotations

import hashlib
import io
import random
import re
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from siclip.manifests.errors import SiclipError

FONT = Path("/usr/share/fonts/truetype/noto/NotoColorEmoji.ttf")
EMOJI_TEST = Path("/usr/share/unicode/emoji/emoji-test.txt")
CLDR = Path("/usr/share/unicode/cldr/common")
PACKAGES = ("fonts-noto-color-emoji", "unicode-data", "unicode-cldr-core")
FONT_SIZE = 109  # the one size the colour bitmap strike has


@dataclass(frozen=True)
class Emoji:
    text: str
    name: str
    group: str
    subgroup: str
    keywords: tuple[str, ...] = ()

    def caption(self) -> str:
        """'grinning face: face, grin': the name, then the keywords that add to it."""
        extra = [k for k in self.keywords if k != self.name]
        return f"{self.name}: {', '.join(extra)}" if extra else self.name


def missing_sources() -> list[str]:
    return [str(p) for p in (FONT, EMOJI_TEST, CLDR / "annotations" / "en.xml") if not p.is_file()]


def _keywords() -> dict[str, tuple[str, ...]]:
    """CLDR English keywords by emoji (FE0F stripped), from the annotations and the derived annotations."""
    import xml.etree.ElementTree as ET

    out = {}
    for name in ("annotations", "annotationsDerived"):
        path = CLDR / name / "en.xml"
        if not path.is_file():
            continue
        for node in ET.parse(path).getroot().iter("annotation"):
            if node.get("type") != "tts" and node.text:
                out.setdefault(node.get("cp", "").replace("\ufe0f", ""), tuple(k.strip() for k in node.text.split("|")))
    return out


@lru_cache(maxsize=1)
def emoji_list() -> tuple[Emoji, ...]:
    """Every fully-qualified emoji of emoji-test.txt except skin-tone variants and components, in file order."""
    missing = missing_sources()
    if missing:
        raise SiclipError(f"bench-real needs {', '.join(missing)}: apt-get install -y {' '.join(PACKAGES)}")
    keywords = _keywords()
    group = subgroup = ""
    out = []
    for line in EMOJI_TEST.read_text(encoding="utf-8").splitlines():
        if line.startswith("# group:"):
            group = line.split(":", 1)[1].strip()
        elif line.startswith("# subgroup:"):
            subgroup = line.split(":", 1)[1].strip()
        elif line and not line.startswith("#"):
            m = re.match(r"^[0-9A-F ]+;\s*fully-qualified\s*#\s*(\S+)\s+E[\d.]+\s+(.+)$", line)
            if not m or group == "Component" or "skin tone" in m.group(2):
                continue
            text, name = m.group(1), m.group(2).strip()
            out.append(Emoji(text, name, group, subgroup, keywords.get(text.replace("\ufe0f", ""), ())))
    return tuple(out)


def held_out(emoji: Emoji, fraction: float, seed: int = 0) -> bool:
    """Whether an emoji is in the held-out split: decided by its name alone, so every rendering goes the same way."""
    h = int.from_bytes(hashlib.sha256(f"{seed}:{emoji.name}".encode()).digest()[:8], "little")
    return h / 2**64 < fraction


@lru_cache(maxsize=1)
def _glyphs_font():
    from PIL import ImageFont

    return ImageFont.truetype(str(FONT), FONT_SIZE)


def glyph(text: str):
    """The emoji as an RGBA image cropped to its ink (the font's 109 px strike)."""
    from PIL import Image, ImageDraw

    img = Image.new("RGBA", (4 * FONT_SIZE, 2 * FONT_SIZE), (0, 0, 0, 0))
    ImageDraw.Draw(img).text((8, 8), text, font=_glyphs_font(), embedded_color=True)
    box = img.getbbox()
    if box is None:
        raise SiclipError(f"{FONT} draws nothing for {text!r}")
    return img.crop(box)


def _sized_glyph(emoji: Emoji, rng: random.Random, side: int):
    """The emoji's glyph at a random size: its longer side 45–90% of the picture's."""
    g = glyph(emoji.text)
    scale = rng.uniform(0.45, 0.9) * side / max(g.size)
    return g.resize((max(1, round(g.width * scale)), max(1, round(g.height * scale))))


def _position(side: int, g, rng: random.Random) -> tuple[int, int]:
    return rng.randint(0, side - g.width), rng.randint(0, side - g.height)


def render(emoji: Emoji, rng: random.Random, side: int = 128, quality: int = 90) -> bytes:
    """One rendering: the emoji at a random size (45–90% of the picture) and position, on a random background."""
    from demo.scenes import background

    g = _sized_glyph(emoji, rng, side)
    img = background(rng, side)
    img.paste(g, _position(side, g, rng), g)
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=quality)
    return buf.getvalue()


def render_transparent(emoji: Emoji, rng: random.Random, side: int = 128) -> bytes:
    """One rendering as clip art is published: the emoji at a random size and position on a fully transparent
    picture, an RGBA PNG whose transparent pixels store black (what a reader that drops alpha shows)."""
    from PIL import Image

    g = _sized_glyph(emoji, rng, side)
    img = Image.new("RGBA", (side, side), (0, 0, 0, 0))
    img.alpha_composite(g, _position(side, g, rng))  # "over": paste() would square the edges' alpha
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return buf.getvalue()


def folder_name(label: str) -> str:
    """A class folder name that reads back as the label: 'face-smiling' -> 'face_smiling' (eval reads _ as a space)."""
    return re.sub(r"[\s\-]+", "_", label.lower()).replace("/", "_")
