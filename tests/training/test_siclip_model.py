"""The SiCLIP towers: SAS-P blocks with shaped attention, weight sharing, presets and checkpoints."""

import copy
import math
import sys

import pytest
import torch
import torch.nn.functional as F

from siclip.manifests.errors import SiclipError
from siclip.training.model import (
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
    """(α·I + β·softmax(QKᵀ/√d + mask) − γ·C) V, with every matrix written out; V = x, or x + W_V x."""
    B, N, D = x.shape
    H, Dh = attn.heads, D // attn.heads
    heads = lambda t: t.view(B, N, H, Dh).transpose(1, 2)
    values = x if attn.value is None else x + x @ attn.value.weight.T
    q, k, v = heads(attn.q(x)), heads(attn.k(x)), heads(values)
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


@pytest.mark.parametrize("value", [False, True], ids=["no_value", "value"])
@pytest.mark.parametrize("mode", ["bidirectional", "causal", "padded"])
def test_shaped_attention_is_the_identity_at_init(mode, value):
    torch.manual_seed(0)
    attn = ShapedAttention(WIDTH, HEADS, value=value)
    x = torch.randn(3, 7, WIDTH)
    valid = torch.arange(7) < torch.tensor([[7], [4], [1]]) if mode == "padded" else None
    y = attn(x, causal=mode == "causal", valid=valid)
    assert torch.allclose(y, x, atol=1e-5)
    assert attn.q.weight.eq(0).all() and attn.alpha.eq(1).all() and attn.beta.eq(1).all() and attn.gamma.eq(1).all()
    assert (attn.value is None) != value and (not value or attn.value.weight.eq(0).all())


@pytest.mark.parametrize("value", [False, True], ids=["no_value", "value"])
@pytest.mark.parametrize("mode", ["bidirectional", "causal", "padded"])
def test_shaped_attention_matches_its_formula_after_training_moves_it(mode, value):
    torch.manual_seed(1)
    attn = ShapedAttention(WIDTH, HEADS, value=value)
    with torch.no_grad():
        attn.q.weight.normal_(std=0.3)
        if value:
            attn.value.weight.normal_(std=0.3)
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


@pytest.mark.parametrize("value", [False, True], ids=["no_value", "value"])
def test_a_fresh_sasp_block_is_the_identity_plus_a_small_mlp_branch(value):
    """He & Hofmann's skipless-parallel init: g_a = 1, g_m = 0.1, attention (with or without V) the identity."""
    torch.manual_seed(0)
    block = SASPBlock(WIDTH, HEADS, 4.0, "gelu", 1e-5, value=value)
    x = torch.randn(2, 5, WIDTH)
    h = F.layer_norm(x, (WIDTH,), eps=1e-5)
    assert block.gain_attn.item() == 1 and block.gain_mlp.item() == pytest.approx(0.1)
    assert torch.allclose(block(x), h + 0.1 * block.mlp(h), atol=1e-6)


def test_tower_config_sets_the_mlp_gain_and_the_first_layers_value_projection():
    cfg = tiny_text("sasp", share=[(1, 2)])
    cfg.gain_mlp_init = 0.25
    tower = TextTransformer(cfg, 16)
    assert [b.gain_mlp.item() for b in tower.blocks] == [0.25] * 4
    values = [b.attn.value for b in tower.blocks]
    assert values[0] is not None and values[1] is values[0] and values[2] is None and values[3] is None
    assert values[0].weight.eq(0).all() and tower.blocks[0].attn.q.weight.eq(0).all()  # after the tower's init
    cfg.first_layer_value = False
    assert all(b.attn.value is None for b in TextTransformer(cfg, 16).blocks)
    # layer 1 standard: it has its own value projection, and no SAS-P layer gets one
    mixed = TextTransformer(tiny_text(["preln", "sasp", "sasp", "sasp"]), 16)
    assert all(b.attn.value is None for b in mixed.blocks[1:])


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
    first_layer_value = D * D  # shared by layer 2 with the rest of layer 1's attention
    preln = TextTransformer(tiny_text("preln"), 16)
    sasp = TextTransformer(tiny_text("sasp", share=[(1, 2), (3, 4)]), 16)
    assert count_parameters(preln.blocks) == 4 * preln_block
    assert count_parameters(sasp.blocks) == 4 * sasp_block_without_attention + 2 * shaped_attention + first_layer_value
    assert count_parameters(sasp.blocks) / count_parameters(preln.blocks) < 0.85
    vit = dict(image_size=32, patch_size=8, width=D, depth=4, heads=H)
    image_preln = VisionTransformer(ImageTowerConfig(**vit, block="preln"), 16)
    image_sasp = VisionTransformer(ImageTowerConfig(**vit, block="sasp", share_attention=[[1, 2], [3, 4]]), 16)
    assert count_parameters(image_sasp.blocks) / count_parameters(image_preln.blocks) < 0.85


def test_layers_can_mix_block_types():
    text = TextTransformer(tiny_text(["sasp", "sasp", "preln", "preln"], share=[(1, 2)]), 16)
    assert [type(b) for b in text.blocks] == [SASPBlock, SASPBlock, Block, Block]


@pytest.mark.parametrize("share, message", [([(1, 2), (2, 3)], "overlap"), ([(1, 5)], "between 1 and 4"),
                                            ([(2, 3)], "mixes block types"), ([(2, 1)], "increasing order"),
                                            ([(1, 1)], "distinct layers")])
def test_invalid_sharing_groups_are_refused(share, message):
    with pytest.raises(ValueError, match=message):
        TextTransformer(tiny_text(["sasp", "sasp", "preln", "preln"], share=share), 16)


@pytest.mark.parametrize("group", [[2, 1], [1, 1]])
def test_a_sharing_group_out_of_order_is_refused_when_the_config_loads(group, tmp_path):
    with pytest.raises(SiclipError, match=r"tiny.toml: text: share_attention group .* distinct layers in increasing "
                                          r"order"):
        load_config("tiny", overrides={"text.share_attention": [group]})
    (tmp_path / "bad.toml").write_text(f'name = "bad"\n[image]\nblock = "sasp"\nshare_attention = [{group}]\n')
    with pytest.raises(SiclipError, match=r"bad.toml: image: .*increasing order"):
        load_config(tmp_path / "bad.toml")


@pytest.mark.parametrize("key, value", [("first_layer_value", "yes"), ("mask_padding", 1), ("gain_mlp_init", "0.1"),
                                        ("gain_mlp_init", float("nan")), ("query_init", float("inf"))])
def test_sasp_switches_of_the_wrong_type_are_refused(key, value):
    with pytest.raises(SiclipError, match=rf"^model override text.{key}=.*: text.{key} = .* is not a valid"):
        load_config("tiny", overrides={f"text.{key}": value})


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


class OpenClipStyleText(torch.nn.Module):
    """open_clip's text tower with no_causal_mask (MobileCLIP's): pre-LN blocks around torch's
    MultiheadAttention, no padding mask, pooled at the largest id (the end token); open_clip's tensor names."""

    def __init__(self, vocab, context, width, heads, depth, embed_dim):
        super().__init__()
        self.token_embedding = torch.nn.Embedding(vocab, width)
        self.positional_embedding = torch.nn.Parameter(0.1 * torch.randn(context, width))
        self.transformer = torch.nn.Module()
        self.transformer.resblocks = torch.nn.ModuleList()
        for _ in range(depth):
            block = torch.nn.Module()
            block.ln_1, block.ln_2 = torch.nn.LayerNorm(width), torch.nn.LayerNorm(width)
            block.attn = torch.nn.MultiheadAttention(width, heads, batch_first=True)
            block.mlp = torch.nn.Module()
            block.mlp.c_fc, block.mlp.c_proj = torch.nn.Linear(width, 4 * width), torch.nn.Linear(4 * width, width)
            self.transformer.resblocks.append(block)
        self.ln_final = torch.nn.LayerNorm(width)
        self.text_projection = torch.nn.Parameter(torch.randn(width, embed_dim) / width**0.5)

    def forward(self, ids):
        x = self.token_embedding(ids) + self.positional_embedding[: ids.shape[1]]
        for b in self.transformer.resblocks:
            h = b.ln_1(x)
            x = x + b.attn(h, h, h, need_weights=False)[0]
            x = x + b.mlp.c_proj(F.gelu(b.mlp.c_fc(b.ln_2(x))))
        return self.ln_final(x)[torch.arange(len(ids)), ids.argmax(-1)] @ self.text_projection


@pytest.mark.parametrize("mask_padding", [False, True])
def test_mask_padding_is_its_own_switch_so_a_tower_can_compute_what_its_open_clip_teacher_did(mask_padding):
    from siclip.training.inherit import from_open_clip_state
    from siclip.training.model import TextTowerConfig

    torch.manual_seed(0)
    teacher = OpenClipStyleText(100, 16, WIDTH, HEADS, 2, 16).eval()
    cfg = TextTowerConfig(vocab_size=100, context_length=16, width=WIDTH, depth=2, heads=HEADS, block="preln",
                          causal=False, mask_padding=mask_padding, eot_token_id=99)
    student = TextTransformer(cfg, 16).eval()
    state = {k.removeprefix("text."): v for k, v in from_open_clip_state(teacher.state_dict()).items()}
    assert student.load_state_dict(state, strict=True)
    ids = torch.randint(1, 98, (3, 16))
    ids[:, 5] = 99  # the end token; zeros (padding) after it
    ids[:, 6:] = 0
    with torch.no_grad():
        same = torch.allclose(student(ids), teacher(ids), atol=1e-5)
    # the teacher attends to the padding: only the unmasked student reproduces it
    assert same == (not mask_padding)


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


def test_keys_missing_from_a_preset_or_config_file_mean_the_papers_defaults():
    assert load_config("tiny_preln").text.first_layer_value is True and load_config("tiny_preln").text.gain_mlp_init == 0.1
    assert load_config("tiny_preln").image.query_init == 0 == load_config("s0").text.query_init


def test_a_negative_query_init_is_refused_naming_the_key():
    with pytest.raises(SiclipError, match=r"text.query_init must be 0 \(W_Q = 0, attention the identity at init\) "
                                          r"or more, got -0.5"):
        load_config("tiny", overrides={"text.query_init": -0.5})


@pytest.mark.parametrize("query_init", [0.0, 0.5, 1.0])
def test_query_init_draws_w_q_at_that_many_times_w_ks_std(query_init):
    """0 keeps the paper's start (W_Q = 0, attention the identity); above 0, W_Q is drawn at query_init·width^-1/2,
    for every attention module of a sharing group, and pre-LN blocks are left as CLIP's init makes them."""
    width = 256
    torch.manual_seed(0)
    cfg = TextTowerConfig(vocab_size=64, context_length=8, width=width, depth=4, heads=4, query_init=query_init,
                          block=["sasp", "sasp", "sasp", "preln"], share_attention=[[1, 2]])
    tower = TextTransformer(cfg, embed_dim=64)
    for block in tower.blocks[:3]:
        std = float(block.attn.q.weight.detach().std())
        if query_init:
            assert abs(std - query_init * width**-0.5) < 0.05 * query_init * width**-0.5
        else:
            assert block.attn.q.weight.abs().max() == 0
    assert abs(float(tower.blocks[3].attn.q.weight.detach().std()) - width**-0.5) < 0.05 * width**-0.5


def test_the_tiny_preset_tells_inputs_apart_from_its_first_step(tokenizer):
    """tiny starts with W_Q at W_K's std (query_init = 1), so its class and end tokens already see the other tokens:
    different images (and texts of one length) get different embeddings at init. With the paper's W_Q = 0 they all
    get one embedding, and the loss sat at ln(batch) for ~12 steps longer than tiny_preln's (make bench-fit)."""
    torch.manual_seed(0)
    pixels, ids = torch.randn(4, 3, 64, 64), tokenizer(["a red cat", "a blue dog", "one green car", "two big hats"])
    spread = lambda e: float((e @ e.T).masked_fill(torch.eye(len(e), dtype=torch.bool), -1).max())  # nearest pair
    for query_init, apart in ((1.0, True), (0.0, False)):
        overrides = {"image.query_init": query_init, "text.query_init": query_init}
        model = build_model(load_config("tiny", overrides)).eval()
        with torch.no_grad():
            image, text = model.encode_image(pixels), model.encode_text(ids)
        assert (spread(image) < 0.999 and spread(text) < 0.999) == apart, (query_init, spread(image), spread(text))
    assert load_config("tiny").image.query_init == 1.0 == load_config("tiny").text.query_init


def _check_tower(tower, cfg, embed_dim):
    """The built tower is the one its config describes: layer types, sharing, gains, value projection, width."""
    types = [cfg.block] * cfg.depth if isinstance(cfg.block, str) else cfg.block
    assert [type(b) for b in tower.blocks] == [SASPBlock if t == "sasp" else Block for t in types]
    for i, block in enumerate(tower.blocks):
        group = next((g for g in cfg.share_attention if i + 1 in g), [i + 1])  # layers count from 1 in configs
        assert [j + 1 for j, other in enumerate(tower.blocks) if other.attn is block.attn] == group
        assert block.attn.heads == cfg.heads and block.attn.q.in_features == cfg.width
        if isinstance(block, SASPBlock):
            assert block.gain_mlp.item() == pytest.approx(cfg.gain_mlp_init)
            assert (block.attn.value is not None) == (1 in group and cfg.first_layer_value)
    assert tower.proj.out_features == embed_dim


def test_every_preset_builds_the_towers_its_file_describes():
    presets = list_presets()
    assert {"tiny", "tiny_preln", "s0", "vit_b16_student", "vit_b16_student_sasp"} <= set(presets)
    for name in presets:
        config = load_config(name)
        assert config.name == name
        text = TextTransformer(config.text, config.embed_dim)  # every text tower builds without extras
        _check_tower(text, config.text, config.embed_dim)
        assert text.causal == config.text.causal
        assert text.mask_padding == (config.text.mask_padding and not config.text.causal)
        ids = torch.zeros(1, config.text.context_length, dtype=torch.long)
        ids[0, :3] = torch.tensor([49406, 320, 49407])
        with torch.no_grad():
            assert text(ids).shape == (1, config.embed_dim)
        if config.image.kind == "vit":
            image = VisionTransformer(config.image, config.embed_dim)
            _check_tower(image, config.image, config.embed_dim)
            assert image.pos_embed.shape == ((config.image.image_size // config.image.patch_size) ** 2 + 1,
                                             config.image.width)
    # what the files say in words
    assert load_config("tiny_preln").text.block == "preln" and load_config("tiny").image.share_attention == [[1, 2], [3, 4]]
    assert not load_config("s0").text.mask_padding and not load_config("s0").text.causal
    assert load_config("vit_b16_student_sasp").text.first_layer_value is False


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
    with pytest.raises(SiclipError, match=r"bad.toml: text: unknown key 'widht' \(did you mean 'width'\?\); valid keys: "):
        load_config(tmp_path / "bad.toml")
    with pytest.raises(FileNotFoundError, match="tiny"):
        load_config("no_such_preset")


def test_overrides_change_a_preset(tmp_path):
    config = load_config("tiny", overrides={"text.depth": 2, "text.share_attention": [[1, 2]], "embed_dim": 64})
    assert config.text.depth == 2 and config.embed_dim == 64 and config.image.depth == 4


def test_a_tiny_sasp_clip_learns_to_match_fixed_pairs_with_clip_and_pm_losses(tokenizer):
    from siclip.training.losses import ClipLoss, PairMatchingLoss

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


@pytest.mark.parametrize("block", ["preln", "sasp"])
def test_blocks_start_as_clip_does_scaled_by_width_and_depth(block):
    """OpenAI CLIP's init (open_clip's text tower): a flat 0.02 left attention of a narrow tower learning slowly."""
    width, depth = 256, 8
    torch.manual_seed(0)
    tower = TextTransformer(TextTowerConfig(vocab_size=64, context_length=8, width=width, depth=depth, heads=4,
                                            block=block), embed_dim=64)
    std = lambda w: float(w.detach().std())
    near = lambda w, want: abs(std(w) - want) < 0.05 * want
    attn_std, out_std, fc_std = width**-0.5, width**-0.5 * (2 * depth) ** -0.5, (2 * width) ** -0.5
    for b in tower.blocks:
        assert near(b.attn.k.weight, attn_std)
        if block == "preln":
            assert near(b.attn.q.weight, attn_std) and near(b.attn.v.weight, attn_std)
            assert near(b.attn.out.weight, out_std)
        else:  # the identity at init, and W_K ready to move W_Q from the first step
            assert b.attn.q.weight.abs().max() == 0
        assert near(b.mlp.fc1.weight, fc_std) and near(b.mlp.fc2.weight, out_std)
    assert near(tower.proj.weight, attn_std)
