"""The SiCLIP model: a CLIP image tower and text tower whose transformer blocks are
standard pre-LN blocks or SAS-P blocks (He & Hofmann, "Simplifying Transformer Blocks").

Read top to bottom, in the order data flows: configs, `MLP`, `SelfAttention` and
`Block` (the standard pre-LN block), `ShapedAttention` and `SASPBlock` (the simplified
block), the towers (`VisionTransformer`, `MCi0Tower`, `TextTransformer`), `SiCLIP`,
then loading presets and checkpoints. Sizes live in `training/presets/*.toml`.

Layer numbers in configs (`share_attention = [[1, 2], [3, 4]]`) count from 1, as the
paper does; module names (`blocks.0`) count from 0.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn as nn
import torch.nn.functional as F

from pydantic import Field, model_validator

from siclip.config import bounded, build, config, load_toml
from siclip.teachers import is_siclip_checkpoint  # noqa: F401 (callers import it from here too)

PRESETS_DIR = Path(__file__).parent / "presets"
CONFIG_FILE, WEIGHTS_FILE = "config.json", "model.safetensors"
BLOCK_TYPES = ("preln", "sasp")


# ----------------------------------------------------------------------------- configs


@config
class ImageTowerConfig:
    kind: Literal["vit", "mci0"] = "vit"  # "vit", or "mci0": timm's fastvit_mci0 (MobileCLIP-S0), extra siclip[mobileclip]
    image_size: int = bounded(224, ge=1)  # input side in pixels
    patch_size: int = bounded(16, ge=1)  # vit only
    width: int = bounded(768, ge=1)  # the blocks' width (mci0: 512, fixed by its last stage)
    depth: int = bounded(12, ge=0)  # mci0: the number of attention blocks in the last stage (2)
    heads: int = bounded(12, ge=1)  # attention heads per block
    mlp_ratio: float = bounded(4.0, gt=0)  # MLP hidden width over the block's width
    act: Literal["gelu", "quick_gelu"] = "gelu"  # "gelu" or "quick_gelu" (OpenAI CLIP)
    block: str | list[str] = "preln"  # "preln" or "sasp" for all layers, or a list of one per layer
    share_attention: list[list[int]] = Field(default_factory=list)  # groups of layers (from 1) sharing one attention
    ln_eps: float = bounded(1e-5, gt=0)  # LayerNorm's ε
    gain_mlp_init: float = Field(default=0.1, allow_inf_nan=False)  # SAS-P g_m at init: He & Hofmann's skipless-parallel value, O(1/sqrt(depth))
    first_layer_value: bool = True  # a SAS-P layer 1 keeps a value projection, as the authors' first layer does
    # SAS-P W_Q at init, drawn at this × width^-1/2 (W_K's std); 0 keeps the paper's start, attention the identity
    query_init: float = bounded(0.0, ge=0, zero="W_Q = 0, attention the identity at init", allow_inf_nan=False)

    @model_validator(mode="after")
    def _blocks_and_sharing(self):
        sharing_sources(self)  # fail at load time, not at build time
        return self


@config
class TextTowerConfig:
    vocab_size: int = bounded(49408, ge=1)  # token embeddings (CLIP's BPE vocabulary)
    context_length: int = bounded(77, ge=2)  # tokens per text with its start and end tokens; a longer text is cut, keeping its end token
    width: int = bounded(512, ge=1)  # the blocks' width
    depth: int = bounded(12, ge=0)  # transformer layers
    heads: int = bounded(8, ge=1)  # attention heads per block
    mlp_ratio: float = bounded(4.0, gt=0)  # MLP hidden width over the block's width
    act: Literal["gelu", "quick_gelu"] = "gelu"  # as the image tower's
    block: str | list[str] = "preln"  # as the image tower's
    share_attention: list[list[int]] = Field(default_factory=list)  # as the image tower's
    ln_eps: float = bounded(1e-5, gt=0)  # LayerNorm's ε
    gain_mlp_init: float = Field(default=0.1, allow_inf_nan=False)  # as the image tower's
    first_layer_value: bool = True  # as the image tower's
    # as the image tower's
    query_init: float = bounded(0.0, ge=0, zero="W_Q = 0, attention the identity at init", allow_inf_nan=False)
    causal: bool = True  # causal attention, as CLIP's text tower; false: bidirectional
    # Bidirectional only: attention ignores the padding after the end token. open_clip's non-causal
    # towers (MobileCLIP's among them) attend to it, so a student inheriting one sets this False.
    mask_padding: bool = True
    eot_token_id: int = 49407  # the text embedding is read at the first end token

    @model_validator(mode="after")
    def _blocks_and_sharing(self):
        sharing_sources(self)
        return self


@config
class SiCLIPConfig:
    name: str = "custom"  # the preset's name, stored with the model
    embed_dim: int = bounded(512, ge=1)  # width of the joint embedding both towers project to
    init_logit_scale: float = math.log(1 / 0.07)  # log of the inverse temperature at init (CLIP's 1/0.07)
    max_logit_scale: float = bounded(100.0, gt=0)  # cap of the inverse temperature exp(logit_scale)
    image: ImageTowerConfig = Field(default_factory=ImageTowerConfig)
    text: TextTowerConfig = Field(default_factory=TextTowerConfig)


def block_types(cfg: ImageTowerConfig | TextTowerConfig) -> list[str]:
    """The block type of each layer."""
    types = [cfg.block] * cfg.depth if isinstance(cfg.block, str) else list(cfg.block)
    if len(types) != cfg.depth or any(t not in BLOCK_TYPES for t in types):
        raise ValueError(f"block must be one of {BLOCK_TYPES} or a list of {cfg.depth} of them, got {cfg.block!r}")
    return types


def sharing_sources(cfg: ImageTowerConfig | TextTowerConfig) -> dict[int, int]:
    """Map each layer (0-based) that reuses another layer's attention to the layer that owns it."""
    types, source = block_types(cfg), {}
    for group in cfg.share_attention:
        layers = [i - 1 for i in group]
        if len(layers) < 2 or any(not 0 <= i < cfg.depth for i in layers):
            raise ValueError(f"share_attention group {group} must name 2+ layers between 1 and {cfg.depth}")
        if any(a >= b for a, b in zip(layers, layers[1:])):  # the owner is built first, and owns no copy of itself
            raise ValueError(f"share_attention group {group} must list distinct layers in increasing order, "
                             f"e.g. {sorted(set(group))}")
        if any(i in source or i in source.values() for i in layers):
            raise ValueError(f"share_attention groups overlap: {cfg.share_attention}")
        if len({types[i] for i in layers}) != 1:
            raise ValueError(f"share_attention group {group} mixes block types")
        source.update({i: layers[0] for i in layers[1:]})
    return source


# ----------------------------------------------------------------------------- blocks


class QuickGELU(nn.Module):
    def forward(self, x):
        return x * torch.sigmoid(1.702 * x)


ACTIVATIONS = {"gelu": nn.GELU, "quick_gelu": QuickGELU}


class MLP(nn.Module):
    def __init__(self, width: int, mlp_ratio: float, act: str):
        super().__init__()
        self.fc1 = nn.Linear(width, int(width * mlp_ratio))
        self.act = ACTIVATIONS[act]()
        self.fc2 = nn.Linear(int(width * mlp_ratio), width)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


def split_heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    B, N, D = x.shape
    return x.view(B, N, heads, D // heads).transpose(1, 2)  # (B, heads, N, head_dim)


def merge_heads(x: torch.Tensor) -> torch.Tensor:
    B, H, N, Dh = x.shape
    return x.transpose(1, 2).reshape(B, N, H * Dh)


def fused_linear(x: torch.Tensor, layers: tuple[nn.Linear, ...]) -> tuple[torch.Tensor, ...]:
    """(layer(x) for each layer) from one matrix product: one large GEMM runs faster than several small
    ones on the same input. The weights stay separate parameters (names, inheritance, sharing); concatenating
    them costs one copy of the weights per call, less than the GEMM it saves."""
    weight = torch.cat([layer.weight for layer in layers])
    biases = [layer.bias if layer.bias is not None else x.new_zeros(layer.out_features) for layer in layers]
    return F.linear(x, weight, torch.cat(biases)).split([layer.out_features for layer in layers], dim=-1)


def padding_mask(valid: torch.Tensor | None) -> torch.Tensor | None:
    """(B, N) True-where-real into the (B, 1, 1, N) boolean mask that sdpa broadcasts over heads and queries."""
    return None if valid is None else valid[:, None, None, :]


class SelfAttention(nn.Module):
    """Standard multi-head attention with query, key, value and output projections."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.q, self.k, self.v = (nn.Linear(width, width) for _ in range(3))
        self.out = nn.Linear(width, width)

    def forward(self, x, causal: bool = False, valid: torch.Tensor | None = None):
        q, k, v = (split_heads(t, self.heads) for t in fused_linear(x, (self.q, self.k, self.v)))
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=padding_mask(valid), is_causal=causal)
        return self.out(merge_heads(y))


class Block(nn.Module):
    """Standard pre-LN transformer block: x + Attn(N(x)), then x + MLP(N(x))."""

    def __init__(self, width, heads, mlp_ratio, act, ln_eps, attn: SelfAttention | None = None):
        super().__init__()
        self.ln_1 = nn.LayerNorm(width, eps=ln_eps)
        self.attn = attn if attn is not None else SelfAttention(width, heads)
        self.ln_2 = nn.LayerNorm(width, eps=ln_eps)
        self.mlp = MLP(width, mlp_ratio, act)

    def forward(self, x, causal: bool = False, valid: torch.Tensor | None = None):
        x = x + self.attn(self.ln_1(x), causal, valid)
        return x + self.mlp(self.ln_2(x))


def uniform_attention(x: torch.Tensor, causal: bool, valid: torch.Tensor | None) -> torch.Tensor:
    """C·x for x of shape (B, N, ...): the mean over the positions each query may attend (C = attention at Q = 0).

    Bidirectional results have a length-1 position axis that broadcasts; causal ones are running means.
    """
    if causal:  # row i of C is 1/i over positions 1..i; a small matmul beats cumsum on CPU
        C = torch.ones(x.shape[1], x.shape[1], device=x.device, dtype=x.dtype).tril_()
        C /= C.sum(dim=1, keepdim=True)
        return (C @ x.flatten(2)).view_as(x)
    if valid is None:
        return x.mean(dim=1, keepdim=True)
    weights = valid.view(*valid.shape, *[1] * (x.dim() - 2)).to(x.dtype)  # (B, N, 1, ...)
    return (x * weights).sum(dim=1, keepdim=True) / weights.sum(dim=1, keepdim=True)


class ShapedAttention(nn.Module):
    """Shaped attention without output projection: y = (α·I + β·softmax(QKᵀ/√d + mask) − γ·C)·V per head.

    The values V are the inputs x, or with `value=True` (He & Hofmann keep one in the first
    layer) x + W_V·x, W_V starting at 0: weight decay then pulls V toward the identity, as the
    authors' reparametrised value does. α, β, γ are per-head and start at 1; W_Q starts at 0,
    so softmax(...) equals C and the attention is the identity at initialisation (a tower's
    `query_init` > 0 draws W_Q afterwards, in `init_blocks`).
    """

    def __init__(self, width: int, heads: int, value: bool = False):
        super().__init__()
        self.heads = heads
        self.q, self.k = nn.Linear(width, width), nn.Linear(width, width)
        self.value = nn.Linear(width, width, bias=False) if value else None
        self.alpha, self.beta, self.gamma = (nn.Parameter(torch.ones(heads)) for _ in range(3))
        self.reset_identity()

    def reset_query(self):
        nn.init.zeros_(self.q.weight)
        nn.init.zeros_(self.q.bias)

    def reset_identity(self):
        """W_Q = 0 and W_V = 0: the attention is the identity map."""
        self.reset_query()
        if self.value is not None:
            nn.init.zeros_(self.value.weight)

    def forward(self, x, causal: bool = False, valid: torch.Tensor | None = None, gain: torch.Tensor | None = None):
        """Shaped attention of x (B, N, D); `gain` (the block's g_a) is folded into α, β, γ to save a pass."""
        B, N, D = x.shape
        projections = (self.q, self.k) if self.value is None else (self.q, self.k, self.value)
        q, k, *value = fused_linear(x, projections)  # one GEMM for W_Q, W_K (and W_V)
        v = x if not value else x + value[0]
        xh = v.unflatten(2, (self.heads, D // self.heads))  # (B, N, H, Dh), no copy
        attended = F.scaled_dot_product_attention(split_heads(q, self.heads), split_heads(k, self.heads),
                                                  xh.transpose(1, 2), attn_mask=padding_mask(valid),
                                                  is_causal=causal).transpose(1, 2)
        a, b, c = ((p if gain is None else gain * p).view(-1, 1) for p in (self.alpha, self.beta, self.gamma))
        # α·x − γ·C·x in one pass (C·x of a bidirectional tower is one row that broadcasts), then + β·A·x
        y = torch.addcmul(-c * uniform_attention(xh, causal, valid), a, xh).addcmul_(b, attended)
        return y.view(B, N, D)


class SASPBlock(nn.Module):
    """SAS-P block: attention and MLP in parallel on one normalised input, no skip connection.

    y = g_a·ShapedAttn(N(x)) + g_m·MLP(N(x)); the identity path lives inside the shaped attention (α·I).
    g_a starts at 1, g_m at `gain_mlp_init` (0.1: He & Hofmann's skipless-parallel setting, so
    that at init the block is close to the identity on N(x) whatever the depth).
    """

    def __init__(self, width, heads, mlp_ratio, act, ln_eps, attn: ShapedAttention | None = None,
                 gain_mlp_init: float = 0.1, value: bool = False):
        super().__init__()
        self.ln = nn.LayerNorm(width, eps=ln_eps)
        self.attn = attn if attn is not None else ShapedAttention(width, heads, value=value)
        self.mlp = MLP(width, mlp_ratio, act)
        self.gain_attn = nn.Parameter(torch.ones(()))
        self.gain_mlp = nn.Parameter(torch.tensor(float(gain_mlp_init)))

    def forward(self, x, causal: bool = False, valid: torch.Tensor | None = None):
        h = self.ln(x)
        # in place into the attention's fresh output, which no backward step reads: one pass, no new tensor
        return self.attn(h, causal, valid, gain=self.gain_attn).addcmul_(self.gain_mlp, self.mlp(h))


def build_blocks(cfg: ImageTowerConfig | TextTowerConfig) -> nn.ModuleList:
    """The tower's blocks; a layer in a share_attention group reuses the first member's attention module
    (with layer 1's value projection, where it has one)."""
    types, source = block_types(cfg), sharing_sources(cfg)
    blocks = []
    for i, kind in enumerate(types):
        shared = blocks[source[i]].attn if i in source else None
        if kind == "sasp":
            block = SASPBlock(cfg.width, cfg.heads, cfg.mlp_ratio, cfg.act, cfg.ln_eps, attn=shared,
                              gain_mlp_init=cfg.gain_mlp_init, value=i == 0 and cfg.first_layer_value)
        else:
            block = Block(cfg.width, cfg.heads, cfg.mlp_ratio, cfg.act, cfg.ln_eps, attn=shared)
        blocks.append(block)
    return nn.ModuleList(blocks)


def init_weights(module: nn.Module):
    """CLIP-style normal init of embeddings and stems; applied children first, so ShapedAttention re-zeroes its
    W_Q (and W_V) afterwards. The blocks and the projection are then scaled by `init_tower`."""
    if isinstance(module, (nn.Linear, nn.Conv2d)):
        nn.init.normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.Embedding):
        nn.init.normal_(module.weight, std=0.02)
    elif isinstance(module, ShapedAttention):
        module.reset_identity()


def init_blocks(blocks, width: int, depth: int, query_init: float = 0.0) -> None:
    """OpenAI CLIP's init of transformer blocks, scaled by width and depth (open_clip's text tower uses it).

    Attention projections get std width^-1/2, the first MLP layer (2·width)^-1/2 and every layer that
    writes into the residual stream width^-1/2·(2·depth)^-1/2. A flat 0.02 leaves the query-key logits
    of a 128-wide tower near zero, and since W_Q's gradient scales with W_K (and back) attention then
    takes hundreds of steps to learn anything. A SAS-P block's W_V stays zero and its W_Q too unless
    `query_init` > 0 (then drawn at query_init·width^-1/2): with W_Q = 0 its attention is the identity
    at init, and its W_K at width^-1/2 lets W_Q grow from the first step.
    """
    attn_std, fc_std = width**-0.5, (2 * width) ** -0.5
    out_std = attn_std * (2 * depth) ** -0.5
    for block in blocks:
        attn = block.attn
        if isinstance(attn, ShapedAttention):
            nn.init.normal_(attn.k.weight, std=attn_std)
            if query_init:
                nn.init.normal_(attn.q.weight, std=query_init * attn_std)
        else:
            for layer in (attn.q, attn.k, attn.v):
                nn.init.normal_(layer.weight, std=attn_std)
            nn.init.normal_(attn.out.weight, std=out_std)
        nn.init.normal_(block.mlp.fc1.weight, std=fc_std)
        nn.init.normal_(block.mlp.fc2.weight, std=out_std)


# ----------------------------------------------------------------------------- towers


def run_block(block: nn.Module, x: torch.Tensor, *args, grad_checkpointing: bool = False) -> torch.Tensor:
    """block(x, *args); with gradient checkpointing, its activations are recomputed in the backward pass."""
    if grad_checkpointing and torch.is_grad_enabled():
        from torch.utils.checkpoint import checkpoint

        return checkpoint(block, x, *args, use_reentrant=False)
    return block(x, *args)


class VisionTransformer(nn.Module):
    """ViT image tower: patches + class token + positions, blocks, the class token projected to embed_dim."""

    def __init__(self, cfg: ImageTowerConfig, embed_dim: int):
        super().__init__()
        if cfg.image_size % cfg.patch_size:
            raise ValueError(f"image_size {cfg.image_size} is not a multiple of patch_size {cfg.patch_size}")
        n_patches = (cfg.image_size // cfg.patch_size) ** 2
        self.patch_embed = nn.Conv2d(3, cfg.width, cfg.patch_size, cfg.patch_size, bias=False)
        self.cls_token = nn.Parameter(torch.zeros(cfg.width))
        self.pos_embed = nn.Parameter(torch.zeros(n_patches + 1, cfg.width))
        self.ln_pre = nn.LayerNorm(cfg.width, eps=cfg.ln_eps)
        self.blocks = build_blocks(cfg)
        self.grad_checkpointing = False
        self.ln_post = nn.LayerNorm(cfg.width, eps=cfg.ln_eps)
        self.proj = nn.Linear(cfg.width, embed_dim, bias=False)
        self.apply(init_weights)
        init_blocks(self.blocks, cfg.width, cfg.depth, cfg.query_init)
        nn.init.normal_(self.cls_token, std=cfg.width**-0.5)
        nn.init.normal_(self.pos_embed, std=0.01)
        nn.init.normal_(self.proj.weight, std=cfg.width**-0.5)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(pixels).flatten(2).transpose(1, 2)  # (B, patches, width)
        x = torch.cat([self.cls_token.expand(x.shape[0], 1, -1), x], dim=1) + self.pos_embed
        x = self.ln_pre(x)
        for block in self.blocks:
            x = run_block(block, x, grad_checkpointing=self.grad_checkpointing)
        return self.proj(self.ln_post(x[:, 0]))


class TokenBlock(nn.Module):
    """Runs a token block on a (B, C, H, W) feature map, for the convolutional MCi0 tower."""

    def __init__(self, block: nn.Module):
        super().__init__()
        self.block = block

    def forward(self, x):
        B, C, H, W = x.shape
        y = self.block(x.flatten(2).transpose(1, 2))
        return y.transpose(1, 2).reshape(B, C, H, W)


class MCi0Tower(nn.Module):
    """MobileCLIP-S0's image tower (timm `fastvit_mci0`); the last stage's attention blocks become SAS-P blocks.

    Layers listed as "sasp" in the config are replaced (sharing per share_attention); "preln"
    layers keep timm's own attention block. timm is imported here so the rest works without it.
    """

    def __init__(self, cfg: ImageTowerConfig, embed_dim: int):
        super().__init__()
        try:
            import timm
        except ImportError:
            raise ImportError("the 'mci0' image tower needs timm: pip install 'siclip[mobileclip]'") from None
        self.trunk = timm.create_model("fastvit_mci0", pretrained=False, num_classes=embed_dim)
        stage = self.trunk.stages[-1]
        if len(stage.blocks) != cfg.depth or stage.blocks[0].token_mixer.qkv.in_features != cfg.width:
            raise ValueError(f"mci0's last stage has {len(stage.blocks)} blocks of width 512; config says "
                             f"depth={cfg.depth}, width={cfg.width}")
        sasp, fresh = build_blocks(cfg), []
        for i, kind in enumerate(block_types(cfg)):
            if kind == "sasp":
                sasp[i].apply(init_weights)
                fresh.append(sasp[i])
                stage.blocks[i] = TokenBlock(sasp[i])
        init_blocks(fresh, cfg.width, cfg.depth, cfg.query_init)

    @property
    def grad_checkpointing(self) -> bool:
        return bool(getattr(self.trunk, "grad_checkpointing", False))

    @grad_checkpointing.setter
    def grad_checkpointing(self, enable: bool) -> None:
        self.trunk.set_grad_checkpointing(enable)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.trunk(pixels)


class TextTransformer(nn.Module):
    """Text tower: tokens + positions, blocks, final norm; the end token's state projected to embed_dim."""

    def __init__(self, cfg: TextTowerConfig, embed_dim: int):
        super().__init__()
        self.causal, self.eot_token_id = cfg.causal, cfg.eot_token_id
        self.mask_padding = cfg.mask_padding and not cfg.causal  # causal attention never sees the padding
        self.token_embed = nn.Embedding(cfg.vocab_size, cfg.width)
        self.pos_embed = nn.Parameter(torch.zeros(cfg.context_length, cfg.width))
        self.blocks = build_blocks(cfg)
        self.grad_checkpointing = False
        self.ln_final = nn.LayerNorm(cfg.width, eps=cfg.ln_eps)
        self.proj = nn.Linear(cfg.width, embed_dim, bias=False)
        self.apply(init_weights)
        init_blocks(self.blocks, cfg.width, cfg.depth, cfg.query_init)
        nn.init.normal_(self.pos_embed, std=0.01)
        nn.init.normal_(self.proj.weight, std=cfg.width**-0.5)

    def forward(self, token_ids: torch.Tensor) -> torch.Tensor:
        B, N = token_ids.shape
        eot = (token_ids == self.eot_token_id).int().argmax(dim=-1)  # first end token of each row
        valid = torch.arange(N, device=token_ids.device) <= eot[:, None] if self.mask_padding else None
        x = self.token_embed(token_ids) + self.pos_embed[:N]
        for block in self.blocks:
            x = run_block(block, x, self.causal, valid, grad_checkpointing=self.grad_checkpointing)
        x = self.ln_final(x)
        return self.proj(x[torch.arange(B, device=x.device), eot])


# ----------------------------------------------------------------------------- model


class SiCLIP(nn.Module):
    """Image and text towers into one embedding space, with a learnable temperature (`logit_scale`, log-space)."""

    def __init__(self, config: SiCLIPConfig):
        super().__init__()
        self.config = config
        towers = {"vit": VisionTransformer, "mci0": MCi0Tower}
        if config.image.kind not in towers:
            raise ValueError(f"image.kind must be one of {sorted(towers)}, got {config.image.kind!r}")
        self.visual = towers[config.image.kind](config.image, config.embed_dim)
        self.text = TextTransformer(config.text, config.embed_dim)
        self.logit_scale = nn.Parameter(torch.tensor(float(config.init_logit_scale)))

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute each block's activations in the backward pass: less memory for more compute."""
        self.visual.grad_checkpointing = enable
        self.text.grad_checkpointing = enable

    def encode_image(self, pixels: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        x = self.visual(pixels)
        return F.normalize(x, dim=-1) if normalize else x

    def encode_text(self, token_ids: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        x = self.text(token_ids)
        return F.normalize(x, dim=-1) if normalize else x

    def scale(self) -> torch.Tensor:
        """exp(logit_scale): the multiplier the contrastive losses take. Not clamped here, which would zero its
        gradient past the cap for good; `clamp_logit_scale_` bounds the parameter after each optimizer step."""
        return self.logit_scale.exp()

    @torch.no_grad()
    def clamp_logit_scale_(self) -> None:
        """Keep exp(logit_scale) within [1, max_logit_scale], in place (open_clip's way)."""
        self.logit_scale.clamp_(0, math.log(self.config.max_logit_scale))

    def forward(self, pixels: torch.Tensor | None, token_ids: torch.Tensor | None):
        """(image embeddings, text embeddings, exp(logit_scale)): the arguments of every loss in losses.py. Given
        None for a tower, the other tower's embeddings alone, and None for the rest: gradient caching recomputes
        one tower at a time through DDP, whose synced pass expects a gradient for every tensor it returns."""
        if pixels is None or token_ids is None:
            return (None if pixels is None else self.encode_image(pixels),
                    None if token_ids is None else self.encode_text(token_ids), None)
        return self.encode_image(pixels), self.encode_text(token_ids), self.scale()

    def save_pretrained(self, directory: str | Path) -> Path:
        """Write config.json and model.safetensors (shared attention weights stored once)."""
        from safetensors.torch import save_model

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        payload = {"format": "siclip", **dataclasses.asdict(self.config)}
        (directory / CONFIG_FILE).write_text(json.dumps(payload, indent=2) + "\n")
        save_model(self, str(directory / WEIGHTS_FILE))
        return directory

    @classmethod
    def from_pretrained(cls, directory: str | Path, device: str = "cpu") -> "SiCLIP":
        """Load a folder written by save_pretrained."""
        from safetensors.torch import load_model

        directory = Path(directory)
        if not is_siclip_checkpoint(directory):
            raise ValueError(f"{directory} is not a siclip checkpoint (no {CONFIG_FILE} with format 'siclip')")
        payload = json.loads((directory / CONFIG_FILE).read_text())
        payload.pop("format")
        model = cls(config_from_dict(payload, where=str(directory / CONFIG_FILE)))
        load_model(model, str(directory / WEIGHTS_FILE), device=device)
        return model.to(device)


def count_parameters(module: nn.Module) -> int:
    """Distinct parameters: a shared attention module counts once."""
    return sum(p.numel() for p in module.parameters())


# ----------------------------------------------------------------------------- configs from files


def config_from_dict(data: dict[str, Any], where: str = "model config", sources: dict | None = None) -> SiCLIPConfig:
    """A SiCLIPConfig from nested dicts (a preset, a checkpoint's config.json); one SiclipError line otherwise."""
    data = {k: v for k, v in data.items() if k != "format"}
    return build(SiCLIPConfig, data, where, {(): where, **(sources or {})})


def list_presets() -> list[str]:
    return sorted(p.stem for p in PRESETS_DIR.glob("*.toml"))


def load_config(source: str | Path, overrides: dict[str, Any] | None = None) -> SiCLIPConfig:
    """A preset by name (`tiny`) or a TOML/JSON file path, with optional dotted overrides ({"text.depth": 6}; a
    value may be text, typed by its key)."""
    path = Path(source)
    if not path.is_file():
        path = PRESETS_DIR / f"{source}.toml"
        if not path.is_file():
            raise FileNotFoundError(f"no model config file or preset {str(source)!r}; presets: {list_presets()}")
    data = json.loads(path.read_text()) if path.suffix == ".json" else load_toml(path)
    sources = {}
    for key, value in (overrides or {}).items():
        *parents, leaf = key.split(".")
        node = data
        for parent in parents:
            node = node.setdefault(parent, {})
        node[leaf] = value
        sources[tuple(key.split("."))] = f"model override {key}={value}"
    return config_from_dict(data, str(path), sources)


def build_model(config: SiCLIPConfig | dict | str | Path) -> SiCLIP:
    """A freshly initialised SiCLIP from a config object, a dict, a preset name or a config file."""
    if isinstance(config, dict):
        config = config_from_dict(config)
    elif not isinstance(config, SiCLIPConfig):
        config = load_config(config)
    return SiCLIP(config)
