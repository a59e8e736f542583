"""`siclip export`: a pre-LN siclip model as a transformers CLIPModel folder that embeds exactly as the model does,
with a CLIPTokenizer that gives siclip's ids and a CLIPImageProcessor with the run's statistics; every other model
(SAS-P, shared attention, bidirectional text, MCi0) as a remote-code folder that loads in a fresh interpreter where
siclip cannot be imported and embeds images and texts as siclip does; recorded in the train manifest inside a data
root; a rerun skips."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image
from siclip_testing import REPO

from siclip.manifests.errors import SiclipError
from siclip.manifests.manifest import StageManifest
from siclip.images import Preprocess
from siclip.training.export import export_run
from siclip.training.model import build_model, load_config
from siclip.teachers import in_data_root

# ASCII and emoji: transformers' CLIP tokenizer skips the ftfy repairs (curly quotes, mojibake) siclip's applies
TEXTS = ["a small red circle above a large blue square", "A PURPLE STAR click to enlarge", "grinning face 😀 IMG_2041.jpg"]


SMALL = {"image.image_size": 32, "text.context_length": 24}


def save_checkpoint(folder, preset="tiny_preln", seed=0, overrides=SMALL):
    """A model of `preset` with `overrides` (default: 32 px, a 24-token context) and weights moved off their init,
    saved as a checkpoint with its preprocessing."""
    torch.manual_seed(seed)
    model = build_model(load_config(preset, overrides))
    with torch.no_grad():  # away from the initialisation, so every tensor matters
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    model.save_pretrained(folder)
    Preprocess(model.config.image.image_size, [0.5, 0.4, 0.3], [0.2, 0.25, 0.3]).save(folder)
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
    assert entry.kind == "export" and sum(f.bytes for f in entry.files.values()) > 1_000_000
    assert in_data_root("runs/teacher/clip", root) == str(root.root / "runs/teacher/clip")
    assert in_data_root("openai/clip-vit-base-patch32", root) == "openai/clip-vit-base-patch32"
    before = (out / "model.safetensors").stat().st_mtime_ns
    messages = []
    assert export_run(run, log=messages.append) == (out, False)
    assert "skipped" in messages[0] and (out / "model.safetensors").stat().st_mtime_ns == before


def test_a_model_a_clipmodel_cannot_hold_is_refused_by_the_clipmodel_route_naming_why():
    from siclip.training.export import clip_config

    with pytest.raises(SiclipError, match=r"does not export to a transformers CLIPModel: .*shares attention.*sasp"):
        clip_config(load_config("tiny"))


# ----------------------------------------------------------------------------- the remote-code export

# The models that need it: the presets as they are and as the demo trains them, a tower of mixed blocks with
# sharing, a bidirectional text tower that attends to its padding, and a pre-LN model exported with --remote-code.
REMOTE_CASES = {
    "tiny": ("tiny", {}),  # the preset as it is: 64 px, a 77-token context
    "demo": ("tiny", {"image.image_size": 48, "text.context_length": 24}),  # training/configs/demo.toml's model_set
    "mixed": ("tiny", {**SMALL, "image.act": "quick_gelu",
                       "image.block": ["preln", "sasp", "sasp", "preln"], "image.share_attention": [[2, 3]],
                       "image.first_layer_value": False, "text.block": ["sasp", "sasp", "preln", "preln"],
                       "text.share_attention": [[1, 2], [3, 4]], "text.causal": False, "text.mask_padding": False}),
    "preln": ("tiny_preln", SMALL),
}
LONG = "a long caption about nothing in particular " * 8  # more tokens than a 24-token context: cut, end token kept

# Run in a fresh interpreter: every siclip package is made unimportable before anything loads, and neither the
# working folder nor sys.path holds the checkout. Prints nothing; writes what it embedded to argv[1].
WITHOUT_SICLIP = r"""
import importlib.abc, json, sys

class NoSiclip(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("siclip", "training", "manifests", "pipeline", "captioning"):
            raise ImportError(f"{name}: siclip is not installed here")

sys.meta_path.insert(0, NoSiclip())
try:
    import siclip
    raise SystemExit("siclip imported")
except ImportError:
    pass

import torch
from transformers import AutoModel, AutoProcessor, AutoTokenizer

out, folders, images, texts = sys.argv[1], json.loads(sys.argv[2]), json.loads(sys.argv[3]), json.loads(sys.argv[4])
results = {}
for name, folder in folders.items():
    model, info = AutoModel.from_pretrained(folder, trust_remote_code=True, output_loading_info=True)
    processor = AutoProcessor.from_pretrained(folder, trust_remote_code=True)
    tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=True)
    inputs = processor(text=texts, images=images, return_tensors="pt")
    with torch.no_grad():
        results[name] = {"ids": inputs["input_ids"], "pixels": inputs["pixel_values"],
                         "image": model.encode_image(inputs["pixel_values"]),
                         "text": model.encode_text(inputs["input_ids"]),
                         "features": model.get_text_features(input_ids=inputs["input_ids"]),
                         "logits": model(**inputs).logits_per_image,
                         "tokenizer_ids": tokenizer(texts, padding="max_length", truncation=True, return_tensors="pt",
                                                    max_length=inputs["input_ids"].shape[1])["input_ids"],
                         "missing": sorted(info["missing_keys"]) + sorted(info["unexpected_keys"]),
                         "model_file": sys.modules[type(model).__module__].__file__}
results["siclip_modules"] = sorted(m for m in sys.modules if m.split(".")[0] == "siclip")
results["path"] = sys.path
torch.save(results, out)
"""


def sample_images(folder: Path) -> list[Path]:
    """Images of the modes and shapes preprocessing treats differently: wide and tall (the centered square),
    alpha (onto white), grey, a palette with a transparent entry, 16-bit grey, one smaller than the input."""
    import numpy as np

    folder.mkdir()
    rng = np.random.default_rng(0)
    noise = lambda h, w, c: rng.integers(0, 256, (h, w, c), dtype=np.uint8)  # noqa: E731
    palette = Image.fromarray(noise(40, 30, 3)).convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    palette.info["transparency"] = 3
    images = {"wide.png": Image.fromarray(noise(37, 81, 3)), "tall.jpg": Image.fromarray(noise(90, 52, 3)),
              "alpha.png": Image.fromarray(noise(64, 64, 4), "RGBA"),
              "grey.png": Image.fromarray(noise(45, 50, 1)[..., 0]),
              "palette.png": palette, "small.png": Image.fromarray(noise(12, 20, 3)),
              "deep.png": Image.fromarray(rng.integers(0, 65536, (50, 40), dtype=np.uint16))}
    for name, image in images.items():
        image.save(folder / name)
    return sorted(folder.iterdir())


def embed_without_siclip(folders: dict[str, Path], images: list[Path], texts: list[str], work: Path) -> dict:
    """What the exported folders give in a fresh interpreter that cannot import siclip (WITHOUT_SICLIP)."""
    work.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(HF_HOME=str(work / "hf"), HF_HUB_OFFLINE="1", TRANSFORMERS_VERBOSITY="error")
    args = [json.dumps({k: str(v) for k, v in folders.items()}), json.dumps([str(p) for p in images]), json.dumps(texts)]
    res = subprocess.run([sys.executable, "-c", WITHOUT_SICLIP, str(work / "out.pt"), *args], cwd=work, env=env,
                         capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    return torch.load(work / "out.pt")


def assert_embeds_as_siclip(run: Path, got: dict, images: list[Path], texts: list[str]) -> None:
    from siclip.training.evaluate import load

    model, tokenizer, preprocess = load(run)
    ids = tokenizer(texts)
    pixels = torch.stack([preprocess(p) for p in images])
    assert got["missing"] == []
    assert torch.equal(got["ids"], ids) and torch.equal(got["tokenizer_ids"], ids)  # padding (0) included
    torch.testing.assert_close(got["pixels"], pixels, atol=1e-6, rtol=0)
    with torch.no_grad():
        image, text = model.encode_image(pixels), model.encode_text(ids)
        torch.testing.assert_close(got["image"], image, atol=1e-4, rtol=0)
        torch.testing.assert_close(got["text"], text, atol=1e-4, rtol=0)
        torch.testing.assert_close(got["features"], model.text(ids), atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(got["logits"], model.scale() * image @ text.T, atol=1e-3, rtol=1e-4)
    spread = (image[:, None] - image[None]).abs().amax()
    assert spread > 1e-3, spread  # the images embed apart by more than the tolerance: the comparison has teeth


@pytest.fixture(scope="module")
def remote_exports(tmp_path_factory):
    """REMOTE_CASES saved as runs, exported, and embedded once in an interpreter without siclip."""
    root = tmp_path_factory.mktemp("remote")
    runs, folders = {}, {}
    for name, (preset, overrides) in REMOTE_CASES.items():
        runs[name] = root / "runs" / name
        save_checkpoint(runs[name] / "final", preset, seed=len(runs), overrides=overrides)
        folders[name], written = export_run(runs[name], log=lambda m: None, remote_code=name == "preln")
        assert written
    images = sample_images(root / "images")
    texts = [*TEXTS, LONG]
    return runs, folders, images, texts, embed_without_siclip(folders, images, texts, root / "fresh")


@pytest.mark.parametrize("case", list(REMOTE_CASES))
def test_the_remote_code_export_embeds_as_siclip_in_an_interpreter_without_siclip(remote_exports, case):
    runs, folders, images, texts, got = remote_exports
    assert got["siclip_modules"] == [] and str(REPO) not in got["path"]
    assert Path(got[case]["model_file"]).name == "modeling_siclip.py"
    assert_embeds_as_siclip(runs[case], got[case], images, texts)


def test_the_remote_code_folder_holds_its_modeling_file_and_records_its_form(remote_exports):
    runs, folders, *_ = remote_exports
    folder = folders["demo"]
    config = json.loads((folder / "config.json").read_text())
    assert config["auto_map"] == {"AutoConfig": "modeling_siclip.SiCLIPConfig",
                                  "AutoModel": "modeling_siclip.SiCLIPModel"}
    assert "format" not in config  # siclip does not take it for one of its own checkpoints
    source = (folder / "modeling_siclip.py").read_text()
    imports = {line.split()[1].split(".")[0] for line in source.splitlines() if line.startswith(("import ", "from "))}
    assert imports == {"__future__", "io", "math", "dataclasses", "types", "numpy", "torch", "transformers"}, imports
    assert json.loads((folder / "state.json").read_text())["format"] == "remote-code"
    from safetensors import safe_open

    with safe_open(folder / "model.safetensors", "pt") as f:
        names = set(f.keys())
    assert "visual.blocks.0.attn.q.weight" in names and not any(n.startswith("visual.blocks.1.attn") for n in names)


def test_siclip_export_remote_code_turns_a_preln_runs_clipmodel_export_into_the_remote_code_folder(tmp_path):
    from siclip_testing import siclip

    run = tmp_path / "runs" / "teacher"
    save_checkpoint(run / "final")
    export_run(run, log=lambda m: None)
    assert json.loads((run / "clip" / "config.json").read_text())["model_type"] == "clip"
    res = siclip("export", "--run", run, "--remote-code")
    assert "remote code: load it with trust_remote_code=True" in res.stdout, res.stdout
    assert json.loads((run / "clip" / "config.json").read_text())["model_type"] == "siclip"
    assert (run / "clip" / "modeling_siclip.py").is_file()
    assert "skipped" in siclip("export", "--run", run, "--remote-code").stdout  # the same form again: skipped


def test_a_model_the_modeling_file_does_not_hold_is_refused_naming_the_tensor(tmp_path):
    from siclip.training.export import export_model

    model = build_model(load_config("tiny", SMALL))
    model.text.blocks[2].extra = torch.nn.Parameter(torch.zeros(3))  # what a model.py change adds, unmirrored
    with pytest.raises(SiclipError, match=r"modeling_siclip.py does not hold model 'tiny' .*text.blocks.2.extra"):
        export_model(model, Preprocess(32, [0.5] * 3, [0.25] * 3), tmp_path / "out")


@pytest.mark.mobileclip
def test_the_s0_preset_exports_and_embeds_as_siclip_in_an_interpreter_without_siclip(tmp_path):
    """s0's MCi0 image tower is timm's: the exported folder needs timm (not siclip) where it loads."""
    run = tmp_path / "runs" / "s0"
    save_checkpoint(run / "final", "s0", overrides={"text.context_length": 24})
    folder, _ = export_run(run, log=lambda m: None)
    images, texts = sample_images(tmp_path / "images"), [*TEXTS, LONG]
    got = embed_without_siclip({"s0": folder}, images, texts, tmp_path / "fresh")
    assert_embeds_as_siclip(run, got["s0"], images, texts)
