"""Weight inheritance from a transformers CLIP teacher saved to disk, and from siclip checkpoints."""

import json

import pytest
import torch

from training.inherit import config_from_transformers, from_open_clip_state, inherit_weights
from training.model import SiCLIP, build_model, config_from_dict

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
    assert report["text.blocks.2.ln.weight"].source == "text.blocks.2.ln_1.weight"
    assert report["text.blocks.2.attn.k.weight"].how == "copied"
    teacher_key = teacher["text_model.encoder.layers.2.self_attn.k_proj.weight"]
    assert torch.equal(student.text.blocks[2].attn.k.weight, teacher_key)
    assert report["text.blocks.2.attn.q.weight"].how == "fresh" and student.text.blocks[2].attn.q.weight.eq(0).all()
    assert report["text.blocks.0.attn.alpha"].how == "fresh"


def test_freezing_stops_gradients_to_inherited_tensors_only(hf_teacher_dir):
    student = SiCLIP(student_config(text__block=["preln", "preln", "sasp", "sasp"]))
    report = inherit_weights(student, hf_teacher_dir, freeze=True)
    params = dict(student.named_parameters())
    assert not params["visual.blocks.0.attn.q.weight"].requires_grad
    assert not params["text.token_embed.weight"].requires_grad
    assert params["text.blocks.2.attn.q.weight"].requires_grad
    assert {n for n, p in params.items() if not p.requires_grad} == set(report.inherited_names()) & set(params)


def test_a_different_image_size_interpolates_the_position_table(hf_teacher_dir):
    student = SiCLIP(student_config(image__image_size=48))
    report = inherit_weights(student, hf_teacher_dir)
    entry = report["visual.pos_embed"]
    assert (entry.how, entry.shape, entry.source_shape) == ("interpolated", [37, 64], [17, 64])


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
