"""Weight inheritance from a transformers CLIP teacher saved to disk, and from siclip checkpoints."""

import json

import pytest
import torch

from siclip.training.inherit import config_from_transformers, from_open_clip_state, inherit_weights
from siclip.training.model import SiCLIP, build_model, config_from_dict

CAPTIONS = ["a photo of a cat", "two dogs playing in the snow", "a red car parked at night"]


def teacher_embeddings(teacher, pixels, ids):
    with torch.no_grad():
        image = teacher.get_image_features(pixel_values=pixels)
        text = teacher.get_text_features(input_ids=ids)
    # transformers 5 returns an output object whose pooler_output holds the projected features
    return getattr(image, "pooler_output", image), getattr(text, "pooler_output", text)


def student_config(**changes):
    """A student of the tiny teacher's family (teacher: 4 layers, width 64, 4 heads, 32 px, patch 8)."""
    base = {"name": "student", "embed_dim": 32,
            "image": {"image_size": 32, "patch_size": 8, "width": 64, "depth": 4, "heads": 4, "mlp_ratio": 2.0,
                      "act": "quick_gelu"},
            "text": {"width": 64, "depth": 4, "heads": 4, "mlp_ratio": 2.0, "act": "quick_gelu"}}
    for key, value in changes.items():
        tower, field = key.split("__")
        base[tower][field] = value
    return config_from_dict(base)


def test_student_of_the_teachers_shape_reproduces_its_embeddings_exactly(hf_teacher_dir, hf_teacher, tokenizer):
    student = SiCLIP(config_from_transformers(hf_teacher.config)).eval()
    report = inherit_weights(student, str(hf_teacher_dir))
    assert set(report.counts()) == {"copied"}
    torch.manual_seed(0)
    pixels, ids = torch.randn(3, 3, 32, 32), tokenizer(CAPTIONS)
    image, text = teacher_embeddings(hf_teacher, pixels, ids)
    with torch.no_grad():
        assert torch.allclose(student.encode_image(pixels, normalize=False), image, atol=1e-6)
        assert torch.allclose(student.encode_text(ids, normalize=False), text, atol=1e-6)
    assert student.logit_scale.item() == pytest.approx(hf_teacher.logit_scale.item())


def test_a_fresh_student_does_not_reproduce_the_teacher(hf_teacher, tokenizer):
    student = SiCLIP(config_from_transformers(hf_teacher.config)).eval()
    pixels = torch.randn(2, 3, 32, 32)
    image, _ = teacher_embeddings(hf_teacher, pixels, tokenizer(CAPTIONS[:2]))
    with torch.no_grad():
        assert not torch.allclose(student.encode_image(pixels, normalize=False), image, atol=1e-3)


def test_a_narrower_shallower_student_takes_every_other_layer_and_the_first_channels(hf_teacher_dir, hf_teacher,
                                                                                      tmp_path):
    student = SiCLIP(student_config(image__width=32, image__heads=2, image__depth=2,
                                    text__width=32, text__heads=2, text__depth=2))
    report = inherit_weights(student, hf_teacher_dir, report_path=tmp_path / "report.json")
    teacher = hf_teacher.state_dict()

    entry = report["visual.blocks.1.attn.q.weight"]  # student layer 1 <- teacher layer 1 * (4 // 2) = 2
    assert (entry.how, entry.source) == ("sliced", "visual.blocks.2.attn.q.weight")
    assert entry.shape == [32, 32] and entry.source_shape == [64, 64]
    assert torch.equal(student.visual.blocks[1].attn.q.weight,
                       teacher["vision_model.encoder.layers.2.self_attn.q_proj.weight"][:32, :32])
    assert torch.equal(student.text.blocks[1].mlp.fc1.weight,
                       teacher["text_model.encoder.layers.2.mlp.fc1.weight"][:64, :32])
    assert report["text.blocks.0.ln_1.weight"].source == "text.blocks.0.ln_1.weight"
    assert report["logit_scale"].how == "copied"
    assert report["text.token_embed.weight"].how == "sliced"
    assert "fresh" not in report.counts()

    saved = json.loads((tmp_path / "report.json").read_text())
    assert saved["counts"] == report.counts()
    assert {t["name"] for t in saved["tensors"]} == set(student.state_dict())


def test_sasp_blocks_start_fresh_and_keep_identity_attention(hf_teacher_dir):
    student = SiCLIP(student_config(text__block=["preln", "preln", "sasp", "sasp"], text__share_attention=[[3, 4]]))
    report = inherit_weights(student, hf_teacher_dir)
    assert report["text.blocks.1.attn.v.weight"].how == "copied"
    for name in ("text.blocks.2.attn.q.weight", "text.blocks.2.attn.k.weight", "text.blocks.2.mlp.fc1.weight",
                 "text.blocks.2.ln.weight", "text.blocks.3.attn.alpha", "text.blocks.3.gain_mlp"):
        assert report[name].how == "fresh", name
    assert "SAS-P" in report["text.blocks.2.mlp.fc1.weight"].note
    assert report["text.blocks.3.attn.q.weight"].note == "shares text.blocks.2.attn.q.weight"
    assert student.text.blocks[2].attn.q.weight.eq(0).all()
    assert report["visual.blocks.3.mlp.fc2.weight"].how == "copied"


def test_sasp_blocks_can_be_seeded_from_the_teachers_norm_keys_and_mlp(hf_teacher_dir, hf_teacher):
    student = SiCLIP(student_config(text__block="sasp", text__share_attention=[[1, 2], [3, 4]]))
    report = inherit_weights(student, hf_teacher_dir, sasp_from_teacher=True)
    teacher = hf_teacher.state_dict()
    assert report["text.blocks.2.mlp.fc1.weight"].source == "text.blocks.2.mlp.fc1.weight"
    # the norm the teacher's MLP was trained behind
    assert report["text.blocks.2.ln.weight"].source == "text.blocks.2.ln_2.weight"
    assert torch.equal(student.text.blocks[2].ln.bias, teacher["text_model.encoder.layers.2.layer_norm2.bias"])
    assert report["text.blocks.2.attn.k.weight"].how == "copied"
    teacher_key = teacher["text_model.encoder.layers.2.self_attn.k_proj.weight"]
    assert torch.equal(student.text.blocks[2].attn.k.weight, teacher_key)
    assert report["text.blocks.2.attn.q.weight"].how == "fresh" and student.text.blocks[2].attn.q.weight.eq(0).all()
    assert report["text.blocks.0.attn.alpha"].how == "fresh"
    assert report["text.blocks.0.attn.value.weight"].how == "fresh" and student.text.blocks[0].attn.value.weight.eq(0).all()

    student = SiCLIP(student_config(text__block="sasp"))
    report = inherit_weights(student, hf_teacher_dir, sasp_from_teacher=True, sasp_norm="ln_1")
    assert report["text.blocks.2.ln.weight"].source == "text.blocks.2.ln_1.weight"
    with pytest.raises(ValueError, match="sasp_norm"):
        inherit_weights(student, hf_teacher_dir, sasp_norm="ln_3")


def test_freezing_stops_gradients_to_inherited_tensors_only(hf_teacher_dir):
    student = SiCLIP(student_config(text__block=["preln", "preln", "sasp", "sasp"]))
    report = inherit_weights(student, hf_teacher_dir, freeze=True)
    params = dict(student.named_parameters())
    assert not params["visual.blocks.0.attn.q.weight"].requires_grad
    assert not params["text.token_embed.weight"].requires_grad
    assert params["text.blocks.2.attn.q.weight"].requires_grad
    assert params["logit_scale"].requires_grad and report["logit_scale"].how == "copied"
    frozen = {n for n, p in params.items() if not p.requires_grad}
    assert frozen == set(report.frozen_names()) & set(params)
    assert frozen == set(report.inherited_names()) & set(params) - {"logit_scale"}


def test_freezing_leaves_sasp_blocks_seeded_from_the_teacher_trainable(hf_teacher_dir):
    student = SiCLIP(student_config(text__block=["preln", "preln", "sasp", "sasp"], text__share_attention=[[3, 4]]))
    report = inherit_weights(student, hf_teacher_dir, freeze=True, sasp_from_teacher=True)
    params = dict(student.named_parameters())
    seeded = ["text.blocks.2.ln.weight", "text.blocks.2.attn.k.weight", "text.blocks.2.mlp.fc1.weight",
              "text.blocks.3.mlp.fc2.bias"]
    assert all(report[n].how == "copied" for n in seeded)  # inherited values ...
    assert all(params[n].requires_grad and not report[n].frozen for n in seeded)  # ... in a new module that trains
    assert params["logit_scale"].requires_grad
    assert not params["text.blocks.1.mlp.fc1.weight"].requires_grad and report["text.blocks.1.mlp.fc1.weight"].frozen
    assert "frozen" in report.summary() and "new modules train" in report.summary()


def test_a_different_image_size_interpolates_the_position_table():
    """Teacher channels that are the patch's row, its column, or a constant keep that meaning on the new grid."""
    teacher = SiCLIP(student_config())  # 32 px, patch 8: a 4 x 4 grid
    rows, cols = torch.meshgrid(torch.arange(4.0), torch.arange(4.0), indexing="ij")
    with torch.no_grad():
        teacher.visual.pos_embed[1:, 0::3] = rows.reshape(16, 1)
        teacher.visual.pos_embed[1:, 1::3] = cols.reshape(16, 1)
        teacher.visual.pos_embed[1:, 2::3] = 0.5
    student = SiCLIP(student_config(image__image_size=48))  # a 6 x 6 grid
    report = inherit_weights(student, teacher)
    entry = report["visual.pos_embed"]
    assert (entry.how, entry.shape, entry.source_shape) == ("interpolated", [37, 64], [17, 64])

    table = student.visual.pos_embed.detach()
    assert torch.equal(table[0], teacher.visual.pos_embed[0].detach())  # the class position is no grid cell
    grid = table[1:].reshape(6, 6, 64)
    row, col, const = grid[..., 0], grid[..., 1], grid[..., 2]
    torch.testing.assert_close(const, torch.full((6, 6), 0.5))
    # the row channel varies down the rows only, rising with them; the column channel across the columns only
    torch.testing.assert_close(row, row[:, :1].expand(6, 6))
    torch.testing.assert_close(col, col[:1, :].expand(6, 6))
    torch.testing.assert_close(col, row.T)
    assert (row[1:, 0] > row[:-1, 0]).all()
    # student cell i lies at teacher coordinate (i + 0.5) * 4/6 - 0.5; bicubic stays near it inside the grid
    at = torch.tensor([(i + 0.5) * 4 / 6 - 0.5 for i in range(6)])
    assert (row[1:5, 0] - at[1:5]).abs().max() < 0.1
    assert row.min() > -0.3 and row.max() < 3.3
    assert all(torch.equal(grid[..., c], grid[..., c % 3]) for c in range(64))  # every copy of a channel alike


def test_narrower_heads_are_sliced_per_head_not_across_heads(hf_teacher_dir, hf_teacher):
    """Teacher: 4 heads of 16 channels. Student: 4 heads of 8: each keeps the first 8 channels of its teacher head."""
    student = SiCLIP(student_config(text__width=32, text__heads=4))
    report = inherit_weights(student, hf_teacher_dir)
    teacher = hf_teacher.state_dict()
    layer = "text_model.encoder.layers.0.self_attn"
    for part in "qkv":
        weight = teacher[f"{layer}.{part}_proj.weight"].view(4, 16, 64)[:, :8, :32].reshape(32, 32)
        assert torch.equal(getattr(student.text.blocks[0].attn, part).weight, weight)
        bias = teacher[f"{layer}.{part}_proj.bias"].view(4, 16)[:, :8].reshape(32)
        assert torch.equal(getattr(student.text.blocks[0].attn, part).bias, bias)
    out = teacher[f"{layer}.out_proj.weight"].view(64, 4, 16)[:32, :, :8].reshape(32, 32)
    assert torch.equal(student.text.blocks[0].attn.out.weight, out)
    assert report["text.blocks.0.attn.q.weight"].how == "sliced" and "per head" in report["text.blocks.0.attn.q.weight"].note
    assert report.warnings == []


def test_heads_that_do_not_fit_start_fresh_with_a_warning(hf_teacher_dir):
    """8 heads of 8 channels cannot come from 4 heads of 16 without splitting heads: refused, and said so."""
    student = SiCLIP(student_config(text__heads=8))
    fresh_q = student.text.blocks[0].attn.q.weight.clone()
    with pytest.warns(UserWarning, match="start fresh although the teacher has them"):
        report = inherit_weights(student, hf_teacher_dir)
    entry = report["text.blocks.0.attn.q.weight"]
    assert entry.how == "fresh" and "8 heads of 8 channels do not fit" in entry.note
    assert torch.equal(student.text.blocks[0].attn.q.weight, fresh_q)
    assert report["text.blocks.0.mlp.fc1.weight"].how == "copied"  # head-free tensors still inherit
    # q, k, v (weights and biases) and the output weight of each of 4 layers; the output bias is head-free
    assert len(report.warnings) == 4 * 7 and "28 warning(s)" in report.summary()


def test_a_wider_student_with_another_patch_grid_falls_back_to_fresh_instead_of_crashing(hf_teacher_dir, tmp_path):
    student = SiCLIP(student_config(image__width=96, image__heads=6, image__image_size=48))
    with pytest.warns(UserWarning):
        report = inherit_weights(student, hf_teacher_dir, report_path=tmp_path / "report.json")
    entry = report["visual.pos_embed"]
    assert entry.how == "fresh" and "wider student" in entry.note
    assert any(w.startswith("visual.pos_embed:") for w in report.warnings)
    assert report["text.blocks.0.attn.q.weight"].how == "copied"
    saved = json.loads((tmp_path / "report.json").read_text())
    assert saved["warnings"] == report.warnings and len(saved["warnings"]) > 0


def test_a_siclip_checkpoint_is_a_teacher_too(tmp_path, tokenizer):
    torch.manual_seed(0)
    teacher = build_model("tiny").eval()
    teacher.save_pretrained(tmp_path / "teacher")
    torch.manual_seed(1)
    student = build_model("tiny").eval()
    report = inherit_weights(student, tmp_path / "teacher")
    assert set(report.counts()) == {"copied"}
    pixels, ids = torch.randn(2, 3, 64, 64), tokenizer(CAPTIONS[:2])
    with torch.no_grad():
        assert torch.equal(student.encode_image(pixels), teacher.encode_image(pixels))
        assert torch.equal(student.encode_text(ids), teacher.encode_text(ids))


def test_open_clip_names_split_the_fused_qkv_and_transpose_projections():
    qkv = torch.arange(12.0).reshape(6, 2)
    block = "transformer.resblocks.0"
    state = {f"{block}.attn.in_proj_weight": qkv, f"{block}.attn.in_proj_bias": torch.arange(6.0),
             f"{block}.mlp.c_fc.weight": torch.zeros(8, 2), "text_projection": torch.ones(2, 3),
             "visual.proj": torch.ones(4, 3), "positional_embedding": torch.zeros(77, 2),
             "ln_final.weight": torch.ones(2)}
    out = from_open_clip_state(state)
    assert torch.equal(out["text.blocks.0.attn.k.weight"], qkv[2:4])
    assert torch.equal(out["text.blocks.0.attn.v.bias"], torch.arange(4.0, 6.0))
    assert out["text.proj.weight"].shape == (3, 2) and out["visual.proj.weight"].shape == (3, 4)
    assert {"text.blocks.0.mlp.fc1.weight", "text.pos_embed", "text.ln_final.weight"} <= set(out)


def test_an_in_memory_transformers_model_is_a_teacher_too(hf_teacher):
    student = SiCLIP(config_from_transformers(hf_teacher.config))
    report = inherit_weights(student, hf_teacher)
    assert set(report.counts()) == {"copied"} and "transformers CLIPModel" in report.teacher
    assert torch.equal(student.text.blocks[3].attn.out.weight,
                       hf_teacher.state_dict()["text_model.encoder.layers.3.self_attn.out_proj.weight"])
