"""`siclip export`: a pre-LN siclip model as a transformers CLIPModel folder that embeds exactly as the model does,
with a CLIPTokenizer that gives siclip's ids and a CLIPImageProcessor with the run's statistics; recorded in the
train manifest inside a data root; a rerun skips; a SAS-P model is refused."""

import json

import pytest
import torch
from PIL import Image

from siclip.manifests.errors import SiclipError
from siclip.manifests.manifest import StageManifest
from siclip.images import Preprocess
from siclip.training.export import export_run
from siclip.training.model import build_model, load_config
from siclip.teachers import in_data_root

# ASCII and emoji: transformers' CLIP tokenizer skips the ftfy repairs (curly quotes, mojibake) siclip's applies
TEXTS = ["a small red circle above a large blue square", "A PURPLE STAR click to enlarge", "grinning face 😀 IMG_2041.jpg"]


def save_checkpoint(folder, preset="tiny_preln", seed=0, **overrides):
    torch.manual_seed(seed)
    model = build_model(load_config(preset, {"image.image_size": 32, "text.context_length": 24, **overrides}))
    with torch.no_grad():  # away from the initialisation, so every tensor matters
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    model.save_pretrained(folder)
    Preprocess(32, [0.5, 0.4, 0.3], [0.2, 0.25, 0.3]).save(folder)
    (folder / "state.json").write_text(json.dumps({"step": 7}))
    return model.eval()


def test_exported_clip_embeds_as_the_siclip_model(tmp_path):
    from transformers import AutoImageProcessor, AutoTokenizer, CLIPModel

    from siclip.training.tokenizer import ClipTokenizer

    model = save_checkpoint(tmp_path / "ckpt")
    out, written = export_run(tmp_path / "ckpt", tmp_path / "clip", log=lambda m: None)
    assert written
    clip = CLIPModel.from_pretrained(out).eval()
    tok = AutoTokenizer.from_pretrained(out)
    ours = ClipTokenizer(context_length=24)(TEXTS)
    theirs = tok(TEXTS, padding="max_length", max_length=24, truncation=True, return_tensors="pt")
    for row, mask, mine in zip(theirs["input_ids"], theirs["attention_mask"], ours):
        assert row[mask.bool()].tolist() == mine[mine != 0].tolist()  # same ids; padding differs (0 against 49407)
    pixels = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        image = clip.get_image_features(pixel_values=pixels)
        text = clip.get_text_features(input_ids=theirs["input_ids"], attention_mask=theirs["attention_mask"])
        image, text = (getattr(x, "pooler_output", x) for x in (image, text))
        norm = torch.nn.functional.normalize
        torch.testing.assert_close(norm(image, dim=-1), model.encode_image(pixels), atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(norm(text, dim=-1), model.encode_text(ours), atol=1e-5, rtol=1e-4)
        assert torch.allclose(clip.logit_scale, model.logit_scale)
    processor = AutoImageProcessor.from_pretrained(out)
    assert list(processor.image_mean) == [0.5, 0.4, 0.3] and list(processor.image_std) == [0.2, 0.25, 0.3]
    assert processor(images=[Image.new("RGB", (50, 40))], return_tensors="pt")["pixel_values"].shape[-2:] == (32, 32)


def test_export_inverts_inheritance(tmp_path):
    from siclip.training.inherit import inherit_weights

    model = save_checkpoint(tmp_path / "ckpt", seed=1)
    export_run(tmp_path / "ckpt", tmp_path / "clip", log=lambda m: None)
    fresh = build_model(load_config("tiny_preln", {"image.image_size": 32, "text.context_length": 24}))
    report = inherit_weights(fresh, str(tmp_path / "clip"))
    assert set(report.counts()) == {"copied"}
    for (name, a), b in zip(model.state_dict().items(), fresh.state_dict().values()):
        assert torch.equal(a, b), name


def test_export_in_a_data_root_is_recorded_and_a_rerun_skips(tmp_path):
    from train_helpers import make_root

    root = make_root(tmp_path / "data", [4])
    run = root.runs / "teacher"
    save_checkpoint(run / "final")
    out, written = export_run(run, log=lambda m: None)
    assert written and out == run / "clip"
    entry = StageManifest.load(root, "train").entries["runs/teacher/clip"]
    assert entry["kind"] == "export" and sum(f["bytes"] for f in entry["files"].values()) > 1_000_000
    assert in_data_root("runs/teacher/clip", root) == str(root.root / "runs/teacher/clip")
    assert in_data_root("openai/clip-vit-base-patch32", root) == "openai/clip-vit-base-patch32"
    before = (out / "model.safetensors").stat().st_mtime_ns
    messages = []
    assert export_run(run, log=messages.append) == (out, False)
    assert "skipped" in messages[0] and (out / "model.safetensors").stat().st_mtime_ns == before


def test_a_sasp_model_is_refused_naming_why(tmp_path):
    save_checkpoint(tmp_path / "ckpt", preset="tiny")
    with pytest.raises(SiclipError, match=r"does not export to a transformers CLIPModel: .*shares attention.*sasp"):
        export_run(tmp_path / "ckpt", tmp_path / "clip", log=lambda m: None)
    assert not (tmp_path / "clip").exists()
