"""The SiCLIP towers: SAS-P blocks with shaped attention, weight sharing, presets and checkpoints."""

import copy
import math
import sys

import pytest
import torch
import torch.nn.functional as F

from training.model import (
    Block,
    ImageTowerConfig,
    SASPBlock,
    ShapedAttention,
    SiCLIP,
    TextTowerConfig,
    TextTransformer,
    VisionTransformer,
    build_model,
    count_parameters,
    list_presets,
    load_config,
)

WIDTH, HEADS = 32, 4


def explicit_shaped_attention(attn: ShapedAttention, x, causal=False, valid=None):
    """(α·I + β·softmax(QKᵀ/√d + mask) − γ·C) x, with every matrix written out."""
    B, N, D = x.shape
    H, Dh = attn.heads, D // attn.heads
    heads = lambda t: t.view(B, N, H, Dh).transpose(1, 2)
    q, k, v = heads(attn.q(x)), heads(attn.k(x)), heads(x)
    allowed = torch.ones(B, 1, N, N, dtype=torch.bool)
    if causal:
        allowed &= torch.ones(N, N).tril().bool()
    if valid is not None:
        allowed &= valid[:, None, None, :]
    scores = (q @ k.transpose(-1, -2) / math.sqrt(Dh)).masked_fill(~allowed, float("-inf"))
    C = allowed.float() / allowed.float().sum(-1, keepdim=True)
    eye = torch.eye(N)
    A = (attn.alpha.view(1, H, 1, 1) * eye + attn.beta.view(1, H, 1, 1) * scores.softmax(-1)
         - attn.gamma.view(1, H, 1, 1) * C)
    return (A @ v).transpose(1, 2).reshape(B, N, D)


@pytest.mark.parametrize("mode", ["bidirectional", "causal", "padded"])
def test_shaped_attention_is_the_identity_at_init(mode):
    torch.manual_seed(0)
    attn = ShapedAttention(WIDTH, HEADS)
    x = torch.randn(3, 7, WIDTH)
    valid = torch.arange(7) < torch.tensor([[7], [4], [1]]) if mode == "padded" else None
    y = attn(x, causal=mode == "causal", valid=valid)
    assert torch.allclose(y, x, atol=1e-5)
    assert attn.q.weight.eq(0).all() and attn.alpha.eq(1).all() and attn.beta.eq(1).all() and attn.gamma.eq(1).all()


@pytest.mark.parametrize("mode", ["bidirectional", "causal", "padded"])
def test_shaped_attention_matches_its_formula_after_training_moves_it(mode):
    torch.manual_seed(1)
    attn = ShapedAttention(WIDTH, HEADS)
    with torch.no_grad():
        attn.q.weight.normal_(std=0.3)
        for p in (attn.alpha, attn.beta, attn.gamma):
            p.uniform_(0.5, 1.5)
    x = torch.randn(3, 7, WIDTH)
    valid = torch.arange(7) < torch.tensor([[7], [4], [2]]) if mode == "padded" else None
    causal = mode == "causal"
    y = attn(x, causal=causal, valid=valid)
    assert not torch.allclose(y, x, atol=1e-3)
    assert torch.allclose(y, explicit_shaped_attention(attn, x, causal, valid), atol=1e-5)


def test_sasp_block_runs_attention_and_mlp_in_parallel_without_skip():
    torch.manual_seed(0)
    block = SASPBlock(WIDTH, HEADS, 4.0, "gelu", 1e-5)
    with torch.no_grad():
        block.gain_attn.fill_(0.7), block.gain_mlp.fill_(0.3)
    x = torch.randn(2, 5, WIDTH)
    h = F.layer_norm(x, (WIDTH,), block.ln.weight, block.ln.bias, 1e-5)
    assert torch.allclose(block(x), 0.7 * h + 0.3 * block.mlp(h), atol=1e-6)  # attention = identity at init


def tiny_text(block, share=(), depth=4):
    return TextTowerConfig(vocab_size=100, context_length=16, width=WIDTH, depth=depth, heads=HEADS,
                           block=block, share_attention=[list(g) for g in share], eot_token_id=99)


def test_shared_attention_is_one_module_receiving_gradient_from_both_layers():
    torch.manual_seed(0)
    shared = TextTransformer(tiny_text("sasp", share=[(1, 2), (3, 4)]), 16)
    assert shared.blocks[0].attn is shared.blocks[1].attn and shared.blocks[2].attn is shared.blocks[3].attn
    assert shared.blocks[1].attn is not shared.blocks[2].attn
    with torch.no_grad():
        for p in shared.parameters():  # move W_Q away from 0 so every weight gets gradient
            p.add_(0.05 * torch.randn_like(p))
    unshared = copy.deepcopy(shared)
    unshared.blocks[1].attn = copy.deepcopy(unshared.blocks[0].attn)
    assert unshared.blocks[1].attn is not unshared.blocks[0].attn
    ids = torch.randint(1, 99, (3, 16))
    ids[:, 9] = 99
    assert torch.allclose(shared(ids), unshared(ids))
    shared(ids).square().sum().backward()
    unshared(ids).square().sum().backward()
    for name in ("q", "k"):
        g_shared = getattr(shared.blocks[0].attn, name).weight.grad
        g_first = getattr(unshared.blocks[0].attn, name).weight.grad
        g_second = getattr(unshared.blocks[1].attn, name).weight.grad
        assert g_first.abs().sum() > 0 and g_second.abs().sum() > 0
        assert torch.allclose(g_shared, g_first + g_second, atol=1e-5)


def test_sasp_with_sharing_has_fewer_parameters_than_preln_at_the_same_width_and_depth():
    D, H, M = WIDTH, HEADS, 4 * WIDTH
    mlp = D * M + M + M * D + D
    preln_block = 2 * 2 * D + 4 * (D * D + D) + mlp
    sasp_block_without_attention = 2 * D + 2 + mlp
    shaped_attention = 2 * (D * D + D) + 3 * H
    preln = TextTransformer(tiny_text("preln"), 16)
    sasp = TextTransformer(tiny_text("sasp", share=[(1, 2), (3, 4)]), 16)
    assert count_parameters(preln.blocks) == 4 * preln_block
    assert count_parameters(sasp.blocks) == 4 * sasp_block_without_attention + 2 * shaped_attention
    assert count_parameters(sasp.blocks) / count_parameters(preln.blocks) < 0.85
    vit = dict(image_size=32, patch_size=8, width=D, depth=4, heads=H)
    image_preln = VisionTransformer(ImageTowerConfig(**vit, block="preln"), 16)
    image_sasp = VisionTransformer(ImageTowerConfig(**vit, block="sasp", share_attention=[[1, 2], [3, 4]]), 16)
    assert count_parameters(image_sasp.blocks) / count_parameters(image_preln.blocks) < 0.85


def test_layers_can_mix_block_types():
    text = TextTransformer(tiny_text(["sasp", "sasp", "preln", "preln"], share=[(1, 2)]), 16)
    assert [type(b) for b in text.blocks] == [SASPBlock, SASPBlock, Block, Block]


@pytest.mark.parametrize("share, message", [([(1, 2), (2, 3)], "overlap"), ([(1, 5)], "between 1 and 4"),
                                            ([(2, 3)], "mixes block types")])
def test_invalid_sharing_groups_are_refused(share, message):
    with pytest.raises(ValueError, match=message):
        TextTransformer(tiny_text(["sasp", "sasp", "preln", "preln"], share=share), 16)


@pytest.mark.parametrize("causal", [True, False])
def test_text_embedding_ignores_everything_after_the_end_token(causal):
    torch.manual_seed(0)
    cfg = tiny_text("sasp", share=[(1, 2)])
    cfg.causal = causal
    text = TextTransformer(cfg, 16)
    with torch.no_grad():
        for p in text.parameters():
            p.add_(0.05 * torch.randn_like(p))
    ids = torch.randint(1, 99, (2, 16))
    ids[:, 6] = 99
    other = ids.clone()
    other[:, 7:] = torch.randint(1, 99, (2, 9))
    assert torch.allclose(text(ids), text(other), atol=1e-5)
    changed = ids.clone()
    changed[:, 3] = (changed[:, 3] % 98) + 1
    assert not torch.allclose(text(ids), text(changed), atol=1e-5)


def test_tiny_preset_encodes_normalised_embeddings_and_trains(tokenizer):
    model = build_model("tiny")
    assert model.config.name == "tiny" and isinstance(model.visual.blocks[0], SASPBlock)
    assert math.isclose(model.logit_scale.item(), math.log(1 / 0.07), rel_tol=1e-6)
    pixels = torch.randn(2, 3, 64, 64)
    image, text, scale = model(pixels, tokenizer(["a cat", "a dog"]))
    assert image.shape == text.shape == (2, 128)
    assert torch.allclose(image.norm(dim=-1), torch.ones(2)) and torch.allclose(text.norm(dim=-1), torch.ones(2))
    (scale * image @ text.T).logsumexp(-1).sum().backward()
    assert all(p.grad is not None and p.grad.isfinite().all() for p in model.parameters())


def test_checkpoint_round_trip_keeps_outputs_and_sharing(tmp_path, tokenizer):
    torch.manual_seed(0)
    model = build_model("tiny").eval()
    with torch.no_grad():
        model.text.blocks[0].attn.q.weight.normal_()
    model.save_pretrained(tmp_path / "ckpt")
    loaded = SiCLIP.from_pretrained(tmp_path / "ckpt").eval()
    assert loaded.config == model.config
    assert loaded.text.blocks[0].attn is loaded.text.blocks[1].attn
    pixels, ids = torch.randn(2, 3, 64, 64), tokenizer(["a cat", "a dog"])
    assert torch.equal(loaded.encode_image(pixels), model.encode_image(pixels))
    assert torch.equal(loaded.encode_text(ids), model.encode_text(ids))


def test_every_preset_file_loads_and_the_vit_ones_build():
    assert {"tiny", "s0", "vit_b16_student"} <= set(list_presets())
    for name in list_presets():
        config = load_config(name)
        assert config.name == name
        if config.image.kind == "vit" and name.startswith("tiny"):
            build_model(config)


def test_s0_has_the_papers_shape():
    config = load_config("s0")
    assert config.image.kind == "mci0" and config.image.share_attention == [[1, 2]]
    assert (config.text.depth, config.text.width) == (6, 512)
    assert config.text.block == ["sasp"] * 4 + ["preln"] * 2
    assert config.text.share_attention == [[1, 2], [3, 4]]


def test_s0_without_timm_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "timm", None)  # makes `import timm` fail even where it is installed
    with pytest.raises(ImportError, match=r"siclip\[mobileclip\]"):
        build_model("s0")


def test_unknown_preset_keys_are_an_error_listing_the_valid_ones(tmp_path):
    (tmp_path / "bad.toml").write_text('name = "bad"\n[text]\nwidht = 64\n')
    with pytest.raises(ValueError, match=r"widht.*valid keys.*width"):
        load_config(tmp_path / "bad.toml")
    with pytest.raises(FileNotFoundError, match="tiny"):
        load_config("no_such_preset")


def test_overrides_change_a_preset(tmp_path):
    config = load_config("tiny", overrides={"text.depth": 2, "text.share_attention": [[1, 2]], "embed_dim": 64})
    assert config.text.depth == 2 and config.embed_dim == 64 and config.image.depth == 4


def test_a_tiny_sasp_clip_learns_to_match_fixed_pairs_with_clip_and_pm_losses(tokenizer):
    from training.losses import ClipLoss, PairMatchingLoss

    torch.manual_seed(0)
    model = build_model(load_config("tiny", overrides={"image.image_size": 32}))
    model.text.token_embed.weight.requires_grad_(False)  # 6M rows, irrelevant here, slow on CPU
    clip, pm = ClipLoss(), PairMatchingLoss(k=4)
    params = [p for p in [*model.parameters(), *pm.parameters()] if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-3)
    pixels, ids = torch.randn(16, 3, 32, 32), tokenizer([f"a photo of object number {i}" for i in range(16)])
    for _ in range(40):
        image, text, scale = model(pixels, ids)
        contrastive = clip(image, text, scale)
        optimizer.zero_grad()
        (contrastive + 0.1 * pm(image, text)).backward()
        optimizer.step()
    assert contrastive.item() < 0.5 < math.log(16)  # chance level is log 16 = 2.77
