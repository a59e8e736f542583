"""Stage 2 with the paper's own models (extra siclip[mobileclip]; `make test-mobileclip`): an open_clip teacher and
the CoCa captioner, each an open_clip architecture built with random weights, saved, and loaded back by name."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from siclip.manifests.manifest import StageManifest
from siclip.manifests.samples import embeddings, iter_samples, read_sidecar
from siclip_testing import save_open_clip

from captions_helpers import all_sidecars, captions, teacher, text_embeddings

pytestmark = pytest.mark.mobileclip

COCA = "coca_ViT-B-32"


@pytest.fixture(scope="module")
def coca_weights(tmp_path_factory):
    """coca_ViT-B-32 with random weights: the weights file that `coca:ARCH:PRETRAINED` names."""
    return save_open_clip(COCA, tmp_path_factory.mktemp("coca") / COCA) / "open_clip_model.safetensors"


def test_open_clip_teacher_sidecars_hold_open_clips_own_embeddings(shards_root, tmp_path, capsys):
    import open_clip

    folder = save_open_clip("ViT-B-32", tmp_path / "vit-b-32", seed=3)
    assert captions(shards_root, "--workers", "0", "--num-captions", "2") == 0
    spec = f"open_clip:{folder}"
    assert teacher(shards_root, "--teacher", spec, "--augmentations", "1") == 0
    assert "assumes" not in capsys.readouterr().err  # the width came from the folder's config, before loading

    model, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{folder}")
    model.eval()
    tokenizer = open_clip.get_tokenizer(f"local-dir:{folder}")
    for shard in sorted(StageManifest.load(shards_root, "shards").entries):
        table, info = read_sidecar(shards_root.teacher / f"{shard}.arrow")
        assert info["teachers"] == [{"id": spec, "revision": None, "dim": 512}]
        samples = list(iter_samples(shards_root, shard, ("captions",)))
        images = [Image.open(io.BytesIO(s["jpg"])).convert("RGB") for s in samples]
        with torch.no_grad():
            own_images = model.encode_image(torch.stack([preprocess(im) for im in images]), normalize=True)
            stored = embeddings(table, "image_emb")
            np.testing.assert_allclose(stored[:, 0], own_images.numpy(), atol=2e-3)
            for s, texts in zip(samples, text_embeddings(table)):
                own = model.encode_text(tokenizer([s["txt"].decode(), *s["captions"]["captions"]]), normalize=True)
                np.testing.assert_allclose(texts, own.numpy(), atol=2e-3)
        assert not np.allclose(stored[:, 0], stored[:, 1], atol=1e-2)  # the recorded crop is another view


def test_open_clip_names_without_weights_or_config_are_one_line_errors(shards_root, tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    for spec, message in [("open_clip:ViT-B-32", "names no weights"),
                          (f"open_clip:{tmp_path / 'empty'}", "has no open_clip_config.json"),
                          ("open_clip:ViT-B-32/no_such_tag", "does not load through open_clip")]:
        capsys.readouterr()
        assert teacher(shards_root, "--teacher", spec, "--set", "captions=false") == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert message in err[-1] and "Traceback" not in "".join(err), err
    assert not list(shards_root.teacher.glob("*.arrow"))


def test_coca_captions_with_the_seeds_sampling_are_reproducible_whatever_the_batch(shards_root, tmp_path, coca_weights):
    import shutil

    from siclip.manifests.layout import DataRoot

    spec = f"coca:{COCA}:{coca_weights}"
    other = DataRoot(tmp_path / "other")
    shutil.copytree(shards_root.root, other.root)
    args = ["--model", spec, "--max-new-tokens", "8", "--set", 'shards=["00000"]']
    assert captions(shards_root, "--workers", "0", "--batch-size", "8", *args) == 0
    assert captions(other, "--workers", "1", "--batch-size", "3", *args) == 0
    sidecars = all_sidecars(shards_root)
    assert sidecars == all_sidecars(other)  # per-caption seeds: batch and worker do not matter
    rows = sidecars["00000.arrow"]
    assert len(rows) == StageManifest.load(shards_root, "shards").entries["00000"].samples
    for caps, status in rows.values():
        assert status == "ok" and len(caps) == 3 and all(caps) and len(set(caps)) == 3, caps
    _, info = read_sidecar(shards_root.captions / "00000.arrow")
    assert info["model"] == spec
    assert (info["params"]["top_p"], info["params"]["temperature"], info["params"]["num_captions"]) == (0.5, 0.9, 3)


def test_coca_greedy_captions_equal_open_clips_own_generate(coca_weights, monkeypatch):
    """With top-p so small that only the likeliest token stays, the sampler is greedy decoding, which open_clip's
    own `generate` can do too. open_clip 3.3 switches `generate` off under transformers 5 (it imports a beam-search
    class that moved); the test hands it the names it needs for top-p sampling, which did not move."""
    import transformers
    from open_clip import coca_model

    from siclip.captioning.generate import CocaCaptioner

    for name in ("LogitsProcessorList", "MinLengthLogitsProcessor", "RepetitionPenaltyLogitsProcessor",
                 "MaxLengthCriteria", "StoppingCriteriaList"):
        monkeypatch.setattr(coca_model, name, getattr(transformers, name), raising=False)
    monkeypatch.setattr(coca_model, "_has_transformers", True)
    monkeypatch.setitem(coca_model.GENERATION_TYPES, "top_p", transformers.TopPLogitsWarper)

    captioner = CocaCaptioner(f"coca:{COCA}:{coca_weights}", "cpu", "float32", num_captions=2, top_p=1e-9,
                              temperature=0.9, max_new_tokens=10, seed=0)
    images = [Image.new("RGB", (90, 60), c) for c in ("red", "navy")]
    pixels = captioner.prepare(images)
    def until_end(ids) -> list[int]:
        ids = ids.tolist()
        return ids[:ids.index(CocaCaptioner.EOT)] if CocaCaptioner.EOT in ids else ids

    ours = captioner.sample(pixels, seeds=[1, 2, 3, 4])
    for i, image in enumerate(pixels):
        # open_clip's seq_len counts the start token and an end token it forces at the last place
        theirs = until_end(captioner.model.generate(image[None], generation_type="top_p", top_p=1e-9, seq_len=12)[0])
        assert len(theirs) > 5  # its minimum length held, and something was generated
        assert [until_end(row) for row in ours[2 * i:2 * i + 2]] == [theirs, theirs]
