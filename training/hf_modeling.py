"""SiCLIP as a Hugging Face model: the file `siclip export` ships as `modeling_siclip.py` in every folder it writes
for a model that a plain CLIPModel cannot hold (SAS-P blocks, shared attention, a bidirectional text tower, the
MCi0 image tower). It needs torch and transformers (and Pillow and numpy, which transformers' image processing
uses), and timm for the MCi0 tower only: siclip itself need not be installed.

    from transformers import AutoModel, AutoProcessor
    model = AutoModel.from_pretrained(FOLDER, trust_remote_code=True).eval()
    processor = AutoProcessor.from_pretrained(FOLDER, trust_remote_code=True)
    inputs = processor(text=["a red circle", "a blue square"], images=[image], return_tensors="pt")
    images = model.encode_image(inputs["pixel_values"])      # L2-normalised, as siclip's encode_image
    texts = model.encode_text(inputs["input_ids"])           # get_*_features: the same, not normalised

Read top to bottom, in the order data flows: the config, the attention masks, the two blocks (pre-LN and SAS-P,
He & Hofmann's "Simplifying Transformer Blocks"), the towers, the model, then the image processor and the
processor. Parameter names are siclip's own, so the weights are siclip's state dict; a layer that shares another
layer's attention borrows that module without registering it, so shared weights are stored (and loaded) once,
under the first layer of their group. The equivalence with siclip's training/model.py is a test in siclip
(tests/training/test_export.py), not shared code: this file stands alone.
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass
from types import SimpleNamespace

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
import transformers
from transformers import BaseImageProcessor, BatchFeature, PretrainedConfig, PreTrainedModel, ProcessorMixin
from transformers.utils import ModelOutput

try:  # the image processor's; transformers checks the imports of a remote file except those in a try block
    from PIL import Image
except ImportError:
    Image = None

OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)


class SiCLIPConfig(PretrainedConfig):
    """siclip's model config: the joint width, the temperature, and one dict per tower (siclip's keys)."""

    model_type = "siclip"

    def __init__(self, name="custom", embed_dim=512, init_logit_scale=math.log(1 / 0.07), max_logit_scale=100.0,
                 image=None, text=None, **kwargs):
        self.name, self.embed_dim = name, embed_dim
        self.init_logit_scale, self.max_logit_scale = init_logit_scale, max_logit_scale
        self.image, self.text = dict(image or {}), dict(text or {})
        super().__init__(**kwargs)


# ----------------------------------------------------------------------------- attention


def causal_mask(n: int, device) -> torch.Tensor:
    """(1, 1, N, N), True where query i may attend key j: j <= i."""
    return torch.ones(n, n, dtype=torch.bool, device=device).tril_()[None, None]


def padding_mask(token_ids: torch.Tensor, eot: torch.Tensor) -> torch.Tensor:
    """(B, 1, 1, N), True for the keys up to each text's end token: the padding after it is ignored."""
    return (torch.arange(token_ids.shape[1], device=token_ids.device) <= eot[:, None])[:, None, None, :]


def attention_weights(q, k, allowed) -> torch.Tensor:
    """softmax(QKᵀ/√d + mask), (B, H, N, N); `allowed` is a boolean mask or None (every key)."""
    scores = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])
    if allowed is not None:
        scores = scores.masked_fill(~allowed, float("-inf"))
    return scores.softmax(dim=-1)


def uniform_weights(allowed, n: int, like: torch.Tensor) -> torch.Tensor:
    """C: each query's uniform weights over the keys it may attend (the attention when Q = 0)."""
    allowed = torch.ones(1, 1, n, n, dtype=torch.bool, device=like.device) if allowed is None else allowed
    c = allowed.to(like.dtype).expand(*allowed.shape[:-2], n, n)
    return c / c.sum(dim=-1, keepdim=True)


def heads(x: torch.Tensor, h: int) -> torch.Tensor:
    """(B, N, D) -> (B, h, N, D/h)."""
    return x.unflatten(-1, (h, -1)).transpose(1, 2)


def merged(x: torch.Tensor) -> torch.Tensor:
    """(B, h, N, D/h) -> (B, N, D)."""
    return x.transpose(1, 2).flatten(2)


class SelfAttention(nn.Module):
    """Multi-head attention: out(softmax(QKᵀ/√d + mask)·V)."""

    def __init__(self, width: int, n_heads: int):
        super().__init__()
        self.n_heads = n_heads
        self.q, self.k, self.v, self.out = (nn.Linear(width, width) for _ in range(4))

    def forward(self, x, allowed=None):
        q, k, v = (heads(layer(x), self.n_heads) for layer in (self.q, self.k, self.v))
        return self.out(merged(attention_weights(q, k, allowed) @ v))


class ShapedAttention(nn.Module):
    """Shaped attention, no output projection: (α·I + β·softmax(QKᵀ/√d + mask) − γ·C)·V per head, where V
    is the input, or input + W_V·input in a layer that keeps a value projection."""

    def __init__(self, width: int, n_heads: int, value: bool):
        super().__init__()
        self.n_heads = n_heads
        self.q, self.k = nn.Linear(width, width), nn.Linear(width, width)
        self.value = nn.Linear(width, width, bias=False) if value else None
        self.alpha, self.beta, self.gamma = (nn.Parameter(torch.ones(n_heads)) for _ in range(3))

    def forward(self, x, allowed=None):
        v = heads(x if self.value is None else x + self.value(x), self.n_heads)
        q, k = heads(self.q(x), self.n_heads), heads(self.k(x), self.n_heads)
        a, b, c = (p.view(-1, 1, 1) for p in (self.alpha, self.beta, self.gamma))
        mix = b * attention_weights(q, k, allowed) - c * uniform_weights(allowed, x.shape[1], x)
        return merged(a * v + mix @ v)


# ----------------------------------------------------------------------------- blocks


class MLP(nn.Module):
    def __init__(self, width: int, ratio: float, act: str):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(width, int(width * ratio)), nn.Linear(int(width * ratio), width)
        self.act = QuickGELU() if act == "quick_gelu" else nn.GELU()

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class QuickGELU(nn.Module):
    def forward(self, x):
        return x * torch.sigmoid(1.702 * x)


class PreLNBlock(nn.Module):
    """x + Attn(N(x)), then + MLP(N(x)). `borrowed`: another layer's attention, used but not registered here."""

    def __init__(self, cfg, layer: int, borrowed=None):
        super().__init__()
        self.ln_1 = nn.LayerNorm(cfg.width, eps=cfg.ln_eps)
        self.attn = SelfAttention(cfg.width, cfg.heads) if borrowed is None else None
        self.borrowed = (borrowed,)  # a tuple, which nn.Module does not register
        self.ln_2 = nn.LayerNorm(cfg.width, eps=cfg.ln_eps)
        self.mlp = MLP(cfg.width, cfg.mlp_ratio, cfg.act)

    def forward(self, x, allowed=None):
        attn = self.attn if self.attn is not None else self.borrowed[0]
        x = x + attn(self.ln_1(x), allowed)
        return x + self.mlp(self.ln_2(x))


class SASPBlock(nn.Module):
    """g_a·ShapedAttn(N(x)) + g_m·MLP(N(x)): attention and MLP in parallel, no skip connection."""

    def __init__(self, cfg, layer: int, borrowed=None):
        super().__init__()
        self.ln = nn.LayerNorm(cfg.width, eps=cfg.ln_eps)
        value = layer == 0 and cfg.first_layer_value
        self.attn = ShapedAttention(cfg.width, cfg.heads, value) if borrowed is None else None
        self.borrowed = (borrowed,)
        self.mlp = MLP(cfg.width, cfg.mlp_ratio, cfg.act)
        self.gain_attn = nn.Parameter(torch.ones(()))
        self.gain_mlp = nn.Parameter(torch.tensor(float(cfg.gain_mlp_init)))

    def forward(self, x, allowed=None):
        attn = self.attn if self.attn is not None else self.borrowed[0]
        h = self.ln(x)
        return self.gain_attn * attn(h, allowed) + self.gain_mlp * self.mlp(h)


def block_types(cfg) -> list[str]:
    return [cfg.block] * cfg.depth if isinstance(cfg.block, str) else list(cfg.block)


def build_blocks(cfg) -> list[nn.Module]:
    """One block per layer; a layer of a `share_attention` group (layers counted from 1) borrows the attention of
    the group's first layer."""
    owner = {layer - 1: group[0] - 1 for group in cfg.share_attention for layer in group[1:]}
    blocks = []
    for i, kind in enumerate(block_types(cfg)):
        borrowed = blocks[owner[i]].attn if i in owner else None
        blocks.append((SASPBlock if kind == "sasp" else PreLNBlock)(cfg, i, borrowed))
    return blocks


# ----------------------------------------------------------------------------- towers


class VisionTransformer(nn.Module):
    """Patches + class token + positions, the blocks, the class token's state projected."""

    def __init__(self, cfg, embed_dim: int):
        super().__init__()
        grid = cfg.image_size // cfg.patch_size
        self.patch_embed = nn.Conv2d(3, cfg.width, cfg.patch_size, cfg.patch_size, bias=False)
        self.cls_token = nn.Parameter(torch.zeros(cfg.width))
        self.pos_embed = nn.Parameter(torch.zeros(grid * grid + 1, cfg.width))
        self.ln_pre = nn.LayerNorm(cfg.width, eps=cfg.ln_eps)
        self.blocks = nn.ModuleList(build_blocks(cfg))
        self.ln_post = nn.LayerNorm(cfg.width, eps=cfg.ln_eps)
        self.proj = nn.Linear(cfg.width, embed_dim, bias=False)

    def forward(self, pixels):
        x = self.patch_embed(pixels).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls_token.expand(len(x), 1, -1), x], dim=1) + self.pos_embed
        x = self.ln_pre(x)
        for block in self.blocks:
            x = block(x)
        return self.proj(self.ln_post(x[:, 0]))


class TokenBlock(nn.Module):
    """A token block run on a (B, C, H, W) feature map."""

    def __init__(self, block: nn.Module):
        super().__init__()
        self.block = block

    def forward(self, x):
        B, C, H, W = x.shape
        return self.block(x.flatten(2).transpose(1, 2)).transpose(1, 2).reshape(B, C, H, W)


class MCi0Tower(nn.Module):
    """MobileCLIP-S0's image tower, timm's fastvit_mci0, its last stage's "sasp" layers replaced by SAS-P blocks."""

    def __init__(self, cfg, embed_dim: int):
        super().__init__()
        try:  # this tower alone needs it
            import timm
        except ImportError:
            raise ImportError("the MCi0 image tower needs timm: pip install timm") from None

        self.trunk = timm.create_model("fastvit_mci0", pretrained=False, num_classes=embed_dim)
        stage = self.trunk.stages[-1]
        for i, (kind, block) in enumerate(zip(block_types(cfg), build_blocks(cfg))):
            if kind == "sasp":
                stage.blocks[i] = TokenBlock(block)

    def forward(self, pixels):
        return self.trunk(pixels)


class TextTransformer(nn.Module):
    """Tokens + positions, the blocks, the final norm; the state at each text's first end token projected."""

    def __init__(self, cfg, embed_dim: int):
        super().__init__()
        self.causal, self.mask_padding, self.eot_token_id = cfg.causal, cfg.mask_padding, cfg.eot_token_id
        self.token_embed = nn.Embedding(cfg.vocab_size, cfg.width)
        self.pos_embed = nn.Parameter(torch.zeros(cfg.context_length, cfg.width))
        self.blocks = nn.ModuleList(build_blocks(cfg))
        self.ln_final = nn.LayerNorm(cfg.width, eps=cfg.ln_eps)
        self.proj = nn.Linear(cfg.width, embed_dim, bias=False)

    def forward(self, token_ids):
        eot = (token_ids == self.eot_token_id).int().argmax(dim=-1)
        allowed = (causal_mask(token_ids.shape[1], token_ids.device) if self.causal
                   else padding_mask(token_ids, eot) if self.mask_padding else None)
        x = self.token_embed(token_ids) + self.pos_embed[: token_ids.shape[1]]
        for block in self.blocks:
            x = block(x, allowed)
        x = self.ln_final(x)
        return self.proj(x[torch.arange(len(x), device=x.device), eot])


# ----------------------------------------------------------------------------- the model


@dataclass
class SiCLIPOutput(ModelOutput):
    logits_per_image: torch.Tensor | None = None
    logits_per_text: torch.Tensor | None = None
    image_embeds: torch.Tensor | None = None
    text_embeds: torch.Tensor | None = None


class SiCLIPModel(PreTrainedModel):
    """The image and text towers into one embedding space, with the learned temperature exp(logit_scale)."""

    config_class = SiCLIPConfig
    base_model_prefix = "siclip"
    main_input_name = "pixel_values"

    def __init__(self, config: SiCLIPConfig):
        super().__init__(config)
        image, text = SimpleNamespace(**config.image), SimpleNamespace(**config.text)
        tower = MCi0Tower if image.kind == "mci0" else VisionTransformer
        self.visual = tower(image, config.embed_dim)
        self.text = TextTransformer(text, config.embed_dim)
        self.logit_scale = nn.Parameter(torch.tensor(float(config.init_logit_scale)))
        self.post_init()

    def _init_weights(self, module):
        """Nothing: the weights are a trained model's, all in the checkpoint (train new ones with siclip)."""

    def get_image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.visual(pixel_values)

    def get_text_features(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """The mask is not needed: each text ends at its first end token, which also marks the padding."""
        return self.text(input_ids)

    def encode_image(self, pixel_values: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        x = self.get_image_features(pixel_values)
        return F.normalize(x, dim=-1) if normalize else x

    def encode_text(self, input_ids: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        x = self.get_text_features(input_ids)
        return F.normalize(x, dim=-1) if normalize else x

    def forward(self, input_ids=None, pixel_values=None, attention_mask=None, **kwargs) -> SiCLIPOutput:
        image = self.encode_image(pixel_values) if pixel_values is not None else None
        text = self.encode_text(input_ids) if input_ids is not None else None
        logits = self.logit_scale.exp() * image @ text.T if image is not None and text is not None else None
        return SiCLIPOutput(logits, None if logits is None else logits.T, image, text)


# ----------------------------------------------------------------------------- preprocessing


def to_rgb(image):
    """An RGB PIL image, decoded as siclip decodes (as img2dataset's OpenCV did): alpha matted onto white, 16-bit grey
    scaled from its full range, a grey image's transparency entry ignored, EXIF orientation not applied."""
    if isinstance(image, (bytes, bytearray)):
        image = io.BytesIO(image)
    if not isinstance(image, Image.Image):
        image = Image.fromarray(image) if isinstance(image, np.ndarray) else Image.open(image)
    image.load()
    if image.mode.startswith("I;16") or image.mode == "I":
        grey = np.rint(np.asarray(image).astype(np.float32).clip(0, 65535) / 257).astype(np.uint8)
        return Image.fromarray(grey, "L").convert("RGB")
    if image.mode in ("1", "L") or not image.has_transparency_data:
        return image.convert("RGB")
    px = np.asarray(image.convert("RGBA"), dtype=np.float32)
    alpha = px[..., 3:]
    return Image.fromarray(np.rint((alpha / 255 * px[..., :3] + 255 - alpha).clip(0, 255)).astype(np.uint8), "RGB")


class SiCLIPImageProcessor(BaseImageProcessor):
    """siclip's preprocessing: the image's largest centered square, resized (bicubic) to image_size, scaled to
    [0, 1] and normalised by image_mean and image_std. Takes PIL images, paths, bytes, open files or uint8 HWC
    arrays."""

    model_input_names = ["pixel_values"]

    def __init__(self, image_size=224, image_mean=OPENAI_MEAN, image_std=OPENAI_STD, **kwargs):
        super().__init__(**kwargs)
        self.image_size, self.image_mean, self.image_std = int(image_size), list(image_mean), list(image_std)

    def pixels(self, image):
        image = to_rgb(image)
        w, h = image.size
        side = min(w, h)
        box = ((w - side) // 2, (h - side) // 2, (w - side) // 2 + side, (h - side) // 2 + side)
        square = image.resize((self.image_size, self.image_size), Image.Resampling.BICUBIC, box=box)
        x = np.asarray(square, dtype=np.uint8).transpose(2, 0, 1).astype(np.float32) / 255
        mean, std = (np.asarray(v, dtype=np.float32).reshape(3, 1, 1) for v in (self.image_mean, self.image_std))
        return (x - mean) / std

    def __call__(self, images, return_tensors="pt", **kwargs) -> BatchFeature:
        images = list(images) if isinstance(images, (list, tuple)) else [images]
        return BatchFeature({"pixel_values": np.stack([self.pixels(im) for im in images])}, tensor_type=return_tensors)

    def preprocess(self, images, return_tensors="pt", **kwargs) -> BatchFeature:
        return self(images, return_tensors=return_tensors)


class SiCLIPProcessor(ProcessorMixin):
    """The image processor and CLIP's tokenizer: texts padded (with id 0, as siclip pads) or cut to the context."""

    attributes = ["image_processor", "tokenizer"]
    if int(transformers.__version__.split(".")[0]) < 5:  # 4.x asks each part's class; 5.x warns that it finds them
        image_processor_class, tokenizer_class = "AutoImageProcessor", "AutoTokenizer"

    def __init__(self, image_processor=None, tokenizer=None, **kwargs):
        super().__init__(image_processor, tokenizer)

    def __call__(self, text=None, images=None, return_tensors="pt", **kwargs) -> BatchFeature:
        out = {}
        if text is not None:
            out.update(self.tokenizer(text, padding="max_length", truncation=True, return_tensors=return_tensors,
                                      max_length=self.tokenizer.model_max_length))
        if images is not None:
            out.update(self.image_processor(images, return_tensors=return_tensors))
        return BatchFeature(out)
