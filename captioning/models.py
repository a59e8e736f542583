"""Loading captioners and CLIP teachers by hub name or local folder, and the tiny offline ones.

Every model goes through `from_pretrained(name_or_path)`; `tiny` builds a small randomly initialised
model from a config, deterministic by seed, so tests and the demo never download weights.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

from siclip.manifests.errors import SiclipError
from siclip.teachers import PREFIX as OPEN_CLIP, find_checkpoint, load_open_clip, open_clip_embed_dim, \
    quiet_transformers as _quiet_transformers, siclip_embed_dim
from siclip.manifests.messages import first_line

TINY = "tiny"
# A small English vocabulary for the tiny models' WordPiece tokenizer: enough words for captions to read
# like captions, few enough that the embedding tables stay tiny.
_TINY_WORDS = (
    "a an the of on in with and at near by is are two three some cat dog man woman child people bird horse car bus "
    "train bike boat plane tree trees street road field grass water beach sky sea mountain house building room table "
    "chair bed kitchen food plate pizza cake ball red blue green white black yellow brown small large big old young "
    "sitting standing walking running riding holding eating playing looking parked flying photo picture view close up"
).split()
_SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "[DEC]"]
TINY_CLIP_DIM = 24  # the tiny CLIP teacher's embedding width


def torch_dtype(name: str, device: str):
    import torch

    if name == "auto":
        return torch.float16 if device.startswith("cuda") else torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


def check_device(device: str) -> None:
    import torch

    if device.startswith("cuda") and not torch.cuda.is_available():
        raise SiclipError(f"--device {device}: no CUDA device is visible to torch (torch {torch.__version__}); use --device cpu")


def seed_for(seed: int, key: str, index: int) -> int:
    """A 63-bit seed for one random draw of one sample: the same for the same key wherever it runs."""
    h = hashlib.sha256(f"{seed}\x00{key}\x00{index}".encode()).digest()
    return int.from_bytes(h[:8], "little") >> 1


def _tiny_tokenizer(words=()):
    """A WordPiece tokenizer of whole words: the tiny vocabulary plus `words` (a data set's own, for a fitted captioner)."""
    from transformers import BertTokenizerFast

    extra = [w for w in dict.fromkeys(w.lower() for w in words) if w not in _TINY_WORDS]
    vocab = {w: i for i, w in enumerate(_SPECIAL + list(_TINY_WORDS) + extra)}
    tok = BertTokenizerFast(vocab=vocab, do_lower_case=True)
    tok.add_special_tokens({"bos_token": "[DEC]"})
    return tok


def build_tiny_captioner(seed: int = 0, words=(), image_size: int = 32, width: int = 32, layers: int = 2):
    """(model, processor) of a tiny random BLIP captioner; the same arguments give the same weights.

    `words` extend the vocabulary, `image_size`/`width`/`layers` the model: `demo.fit` (the demo's captioner) trains a
    larger one on a data set's words; the defaults are the `tiny` model of the tests and benches."""
    import torch
    from transformers import BlipConfig, BlipForConditionalGeneration, BlipImageProcessorPil, BlipProcessor

    tok = _tiny_tokenizer(words)
    ids = tok.convert_tokens_to_ids
    cfg = BlipConfig(
        vision_config=dict(hidden_size=width, intermediate_size=2 * width, num_hidden_layers=layers,
                           num_attention_heads=2, image_size=image_size, patch_size=8),
        text_config=dict(vocab_size=len(tok), hidden_size=width, intermediate_size=2 * width,
                         num_hidden_layers=layers, num_attention_heads=2, encoder_hidden_size=width,
                         max_position_embeddings=64, bos_token_id=ids("[DEC]"), sep_token_id=ids("[SEP]"),
                         eos_token_id=ids("[SEP]"), pad_token_id=ids("[PAD]")),
        projection_dim=width)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = BlipForConditionalGeneration(cfg).eval()
    processor = BlipProcessor(BlipImageProcessorPil(size={"height": image_size, "width": image_size}), tok)
    return model, processor


def build_tiny_clip(seed: int = 0):
    """(model, processor) of a tiny random CLIPModel with the same tiny WordPiece tokenizer."""
    import torch
    from transformers import CLIPConfig, CLIPImageProcessorPil, CLIPModel

    tok = _tiny_tokenizer()
    cfg = CLIPConfig(
        text_config=dict(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, max_position_embeddings=32, eos_token_id=tok.sep_token_id,
                         pad_token_id=tok.pad_token_id, bos_token_id=tok.cls_token_id),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                           image_size=32, patch_size=8),
        projection_dim=TINY_CLIP_DIM)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = CLIPModel(cfg).eval()
    ip = CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    return model, (ip, tok)


def _hub_or_path(name: str) -> str:
    p = Path(name).expanduser()
    return str(p.absolute()) if p.exists() else name


def _load_error(what: str, name: str, e: Exception) -> SiclipError:
    where = "local folder" if Path(name).exists() else "hub model (offline? set HF_HUB_OFFLINE=0 to download, or pass a local folder)"
    return SiclipError(f"cannot load {what} {name!r} as a {where}: {first_line(e)}")


@dataclass
class LoadedModel:
    model: object
    image_processor: object
    tokenizer: object
    model_id: str
    revision: str | None


def load_captioner(name: str, revision: str | None, device: str, dtype: str, seed: int,
                   trust_remote_code: bool = False) -> LoadedModel:
    """An image-to-text model with its image processor and tokenizer, on `device` in `dtype`."""
    _quiet_transformers()
    check_device(device)
    if name == TINY:
        model, processor = build_tiny_captioner(seed)
        loaded = LoadedModel(model, processor.image_processor, processor.tokenizer, f"tiny(seed={seed})", None)
    else:
        from transformers import AutoImageProcessor, AutoModelForImageTextToText, AutoTokenizer

        src = _hub_or_path(name)
        kw = {"revision": revision, "trust_remote_code": trust_remote_code}
        try:
            model = AutoModelForImageTextToText.from_pretrained(src, dtype=torch_dtype(dtype, device), **kw).eval()
            ip = AutoImageProcessor.from_pretrained(src, **kw)
            tok = AutoTokenizer.from_pretrained(src, **kw)
        except (OSError, ValueError, KeyError, ImportError) as e:
            raise _load_error("captioner", name, e) from None
        commit = getattr(model.config, "_commit_hash", None)
        loaded = LoadedModel(model, ip, tok, src, revision or commit)
    loaded.model.to(device=device, dtype=torch_dtype(dtype, device))
    return loaded


def clip_embedding_width(name: str, trust_remote_code: bool = False) -> int | None:
    """A CLIP teacher's embedding width from its config alone (no weights), or None when that cannot be read."""
    if name == TINY:
        return TINY_CLIP_DIM
    if name.startswith(OPEN_CLIP):
        return open_clip_embed_dim(name)
    if (checkpoint := find_checkpoint(name)) is not None:
        return siclip_embed_dim(checkpoint)
    _quiet_transformers()
    try:
        from transformers import AutoConfig

        config = AutoConfig.from_pretrained(_hub_or_path(name), trust_remote_code=trust_remote_code)
    except Exception:  # the model load proper reports why, with the whole context
        return None
    width = getattr(config, "projection_dim", None)
    return int(width) if isinstance(width, int) and width > 0 else None


def load_coca(spec: str, device: str, dtype: str):
    """(model, image preprocessing) of an open_clip CoCa from 'coca:ARCH:PRETRAINED', PRETRAINED a tag
    (coca:coca_ViT-L-14:mscoco_finetuned_laion2b_s13b_b90k) or a weights file on disk."""
    parts = spec.split(":", 2)
    if len(parts) != 3 or not parts[1] or not parts[2]:
        raise SiclipError(f"captioner {spec!r}: expected coca:ARCH:PRETRAINED, PRETRAINED a tag or a weights file")
    model, preprocess, _ = load_open_clip(f"{OPEN_CLIP}{parts[1]}/{parts[2]}", "captioner")
    if not hasattr(model, "text_decoder"):
        raise SiclipError(f"captioner {spec!r}: {parts[1]} is not a CoCa model (it has no text decoder)")
    return model.to(device=device, dtype=torch_dtype(dtype, device)), preprocess
