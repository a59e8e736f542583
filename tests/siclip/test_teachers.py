"""siclip.teachers: a teacher name that is not there is a hub name only when it reads as one. A near miss of a
kind is refused with the kind it misses, a path with the folder that is not there, each as one line naming
where the name came from; loading a model leaves the hub's download bars on."""

from __future__ import annotations

import os

import pytest

from siclip.manifests.errors import SiclipError
from siclip.manifests.layout import DataRoot
from siclip.teachers import load_teacher, parse_teacher


def refusal(spec: str, root=None, what: str = "teacher") -> str:
    with pytest.raises(SiclipError) as e:
        parse_teacher(spec, root, what)
    assert "\n" not in str(e.value)
    return str(e.value)


@pytest.mark.parametrize("spec, meant", [
    ("sidcar", "sidecar"), ("Sidecar", "sidecar"), ("nnone", "none"), ("tinyy", "tiny"),
    ("open-clip:ViT-B-32/openai", "open_clip:ViT-B-32/openai"), ("timm.:fastvit_mci0", "timm:fastvit_mci0"),
    ("hf-hub:apple/MobileCLIP2-S0", "open_clip:hf-hub:apple/MobileCLIP2-S0"),
])
def test_a_near_miss_of_a_kind_names_the_kind_it_misses(spec, meant, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert refusal(spec, what="stages.0.teacher") == \
        f"stages.0.teacher {spec!r} is not a teacher name (did you mean {meant!r}?)"


def test_an_unknown_kind_is_refused_and_hub_names_still_go_to_the_hub(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert "no teacher kind 'coca:' (the kinds: open_clip:, timm:" in refusal("coca:coca_ViT-B-32:laion2b")
    for hub in ("openai/clip-vit-base-patch32", "google/siglip-base-patch16-224", "gpt2", "laion/CLIP-ViT-B-32"):
        spec = parse_teacher(hub, DataRoot(tmp_path / "data"))
        assert (spec.kind, spec.source) == ("transformers", hub)


@pytest.mark.parametrize("spec", ["./runs/nope", "../nope", "/abs/missing", "data/x/runs/y", "~/no/such/run",
                                  "runs/"])
def test_a_missing_folder_is_named_not_sent_to_the_hub(spec, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    message = refusal(spec, what="inherit_from")
    assert message.startswith(f"inherit_from {spec!r}: no such folder: ")
    assert os.path.expanduser(spec.rstrip("/").lstrip("./")) in message


def test_org_slash_name_is_a_folder_where_its_first_part_is_one_here_or_in_the_data_root(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    root = DataRoot(tmp_path / "data")
    (root.root / "runs").mkdir(parents=True)
    assert parse_teacher("runs/nope").kind == "transformers"  # ORG/NAME: the hub's
    message = refusal("runs/nope", root, "stages.1.teacher")
    assert message == (f"stages.1.teacher 'runs/nope': no such folder: {tmp_path / 'runs/nope'} "
                       f"nor {root.root / 'runs/nope'}")
    (tmp_path / "openai").mkdir()
    assert "no such folder" in refusal("openai/clip-vit-base-patch32")
    # a file is no folder
    (tmp_path / "weights.pt").write_bytes(b"")
    assert "'weights.pt' is a file" in refusal("weights.pt")


def test_hf_names_a_transformers_model_and_refuses_anything_else(tmp_path, monkeypatch):
    from siclip.training.model import build_model

    monkeypatch.chdir(tmp_path)
    (tmp_path / "clip").mkdir()
    (tmp_path / "clip" / "config.json").write_text("{}")
    spec = parse_teacher("hf:clip", what="--model")
    assert (spec.kind, spec.source, spec.given) == ("transformers", str(tmp_path / "clip"), "hf:clip")
    assert parse_teacher("hf:openai/clip-vit-base-patch32").source == "openai/clip-vit-base-patch32"  # the hub's
    build_model("tiny").save_pretrained(tmp_path / "run" / "final")
    assert refusal("hf:run", what="--model") == "--model 'hf:run': 'run' is a siclip name, not a transformers model " \
                                                "(drop the hf: prefix)"
    assert refusal("hf:sidecar") == "teacher 'hf:sidecar': 'sidecar' is a sidecar name, not a transformers model " \
                                    "(drop the hf: prefix)"
    assert refusal("hf:") == "teacher 'hf:' names no model: use hf:FOLDER or hf:ORG/NAME"
    assert refusal("hf:./nope").startswith("teacher './nope': no such folder: ")


def test_the_configs_and_inheritance_name_the_key(tmp_path, monkeypatch):
    from siclip.training.config import load_train_config
    from siclip.training.inherit import inherit_weights
    from siclip.training.model import build_model, load_config

    monkeypatch.chdir(tmp_path)
    with pytest.raises(SiclipError, match=r"^config: stage 1 \('b'\): teacher 'sidcar' is not a teacher name "
                                          r"\(did you mean 'sidecar'\?\)$"):
        load_train_config({"stages": [{"name": "a", "steps": 1},
                                      {"name": "b", "steps": 1, "teacher": "sidcar", "loss": {"crd": 1.0}}]})
    student = build_model(load_config("tiny_preln", {"image.image_size": 32, "text.context_length": 24}))
    with pytest.raises(SiclipError, match=r"^inherit_from './runs/nope': no such folder: "):
        inherit_weights(student, "./runs/nope")


def test_loading_or_writing_a_model_leaves_the_hubs_download_bars_on(tmp_path, monkeypatch):
    """transformers' own bars (loading and writing weights) go; the hub's download bars stay."""
    import torch
    from huggingface_hub.utils import are_progress_bars_disabled, enable_progress_bars
    from transformers.utils import logging

    from siclip.captioning.models import clip_embedding_width
    from siclip.images import Preprocess
    from siclip.training.export import export_model
    from siclip.training.model import build_model, load_config
    from siclip_testing import save_tiny

    monkeypatch.delenv("HF_HUB_DISABLE_PROGRESS_BARS", raising=False)
    if are_progress_bars_disabled():  # set at import from the environment: nothing to test then
        pytest.skip("HF_HUB_DISABLE_PROGRESS_BARS is set")
    folder = save_tiny("clip", tmp_path / "clip")
    steps = {
        "save_tiny": lambda: save_tiny("clip", tmp_path / "again"),
        "load_teacher": lambda: load_teacher(parse_teacher(str(folder))),
        "clip_embedding_width": lambda: clip_embedding_width(str(folder)),
        "export_model": lambda: export_model(build_model(load_config("tiny_preln", {"image.image_size": 32})),
                                             Preprocess(32, [0.5] * 3, [0.25] * 3), tmp_path / "export"),
    }
    for name, step in steps.items():
        enable_progress_bars()
        with torch.no_grad():
            step()
        assert not are_progress_bars_disabled(), f"{name} turned the hub's download bars off"
        assert not logging.is_progress_bar_enabled(), f"{name} left transformers' own bars on"
