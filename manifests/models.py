"""How every stage names an open_clip model (extra siclip[mobileclip]), and loading one.

Teachers (`siclip teacher --teacher`, a training stage's `teacher`, `inherit_from`) take

    open_clip:ARCH/PRETRAINED   open_clip's own names: PRETRAINED is a tag whose weights open_clip
                                downloads (MobileCLIP2-S0/dfndr2b) or a weights file on disk
    open_clip:FOLDER            a folder laid out as open_clip's hub repositories are:
                                open_clip_config.json (model_cfg, preprocess_cfg) beside
                                open_clip_model.safetensors; the config carries the image statistics,
                                which a bare weights file does not
    open_clip:hf-hub:ORG/REPO   such a repository on the hub

A name that gives no weights is refused: open_clip would build random weights without a word.
"""

from __future__ import annotations

import json
from pathlib import Path

from siclip.manifests.errors import SiclipError
from siclip.manifests.messages import first_line

PREFIX = "open_clip:"
CONFIG_NAME = "open_clip_config.json"  # open_clip's hub layout
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pth", ".pt")
EXTRA_HINT = "pip install 'siclip[mobileclip]'"


def open_clip_source(spec: str) -> tuple[str, str | None]:
    """open_clip's (model_name, pretrained) for `open_clip:…`; a SiclipError when it names no weights."""
    rest = spec[len(PREFIX):] if spec.startswith(PREFIX) else spec
    if rest.startswith("hf-hub:"):
        return rest, None
    folder = Path(rest).expanduser()
    if folder.is_dir():
        if not (folder / CONFIG_NAME).is_file():
            raise SiclipError(f"{spec!r}: {folder} has no {CONFIG_NAME} (open_clip's hub layout: the config beside "
                              f"open_clip_model.safetensors)")
        if not any(p.suffix in WEIGHT_SUFFIXES for p in folder.iterdir()):
            raise SiclipError(f"{spec!r}: {folder} holds no weights file (open_clip_model.safetensors)")
        return f"local-dir:{folder.absolute()}", None
    name, _, pretrained = rest.partition("/")
    if not name or not pretrained:
        raise SiclipError(f"{spec!r} names no weights: use open_clip:ARCH/TAG (a pretrained tag or a weights file) "
                          f"or open_clip:FOLDER (open_clip's hub layout)")
    return name, pretrained


def open_clip_embed_dim(spec: str) -> int | None:
    """The embedding width from the model's config alone (no weights read), or None when it cannot be read."""
    try:
        name, _ = open_clip_source(spec)
        if name.startswith("local-dir:"):
            return int(json.loads((Path(name[len("local-dir:"):]) / CONFIG_NAME).read_text())["model_cfg"]["embed_dim"])
        import open_clip

        return int(open_clip.get_model_config(name)["embed_dim"])
    except Exception:  # the model load proper reports why, with the whole context
        return None


def load_open_clip(spec: str, what: str = "model"):
    """(model in eval mode, its image preprocessing, its tokenizer) for an `open_clip:` name; `what` names it in errors."""
    name, pretrained = open_clip_source(spec)
    try:
        import open_clip
    except ImportError:
        raise SiclipError(f"{what} {spec!r} needs open_clip: {EXTRA_HINT}") from None
    try:
        model, _, preprocess = open_clip.create_model_and_transforms(name, pretrained=pretrained)
        tokenizer = open_clip.get_tokenizer(name)
    except Exception as e:  # open_clip raises RuntimeError, ValueError, FileNotFoundError … for a bad name or file
        raise SiclipError(f"{what} {spec!r} does not load through open_clip: {first_line(e)}") from None
    return model.eval(), preprocess, tokenizer
