"""siclip teacher: image (plain + recorded augmentations) and text (web + synthetic) embeddings."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

from captioning.embed import build_teachers
from captioning.jobs import apply_crop
from captioning.models import save_tiny
from manifests.cli import main
from manifests.manifest import StageManifest
from manifests.samples import embeddings, iter_samples, read_sidecar

from captions_helpers import captions


def _teacher(root, *extra: str) -> int:
    return main(["teacher", "--data", str(root.root), "--workers", "0", *extra])


def test_teacher_sidecar_shapes_dtypes_and_replayable_augmentations(shards_root, tmp_path, capsys):
    assert captions(shards_root, "--workers", "0") == 0
    folder = save_tiny("clip", tmp_path / "clip-by-path", seed=5)
    teachers = f"tiny,{folder}"  # an ensemble of two, one loaded by path
    assert _teacher(shards_root, "--teacher", teachers, "--augmentations", "2", "--dtype", "bfloat16") == 0

    shards = StageManifest.load(shards_root, "shards")
    rows = shards.entries["00000"]["samples"]
    table, info = read_sidecar(shards_root.teacher / "00000.arrow")
    assert [t["dim"] for t in info["teachers"]] == [24, 24] and info["dim"] == 48
    assert info["teachers"][1]["id"] == str(folder) and info["dtype"] == "bfloat16"
    assert table.schema.field("image_emb").metadata[b"dtype"] == b"bfloat16"
    assert str(table.schema.field("image_emb").type) == "fixed_size_list<item: fixed_size_list<item: uint16>[48]>[3]"
    img = embeddings(table, "image_emb")
    assert img.shape == (rows, 3, 48) and img.dtype == np.float32
    # L2-normalised per teacher, then concatenated
    np.testing.assert_allclose(np.linalg.norm(img[..., :24], axis=-1), 1, atol=1e-2)
    np.testing.assert_allclose(np.linalg.norm(img[..., 24:], axis=-1), 1, atol=1e-2)
    aug = np.asarray(table.column("aug_params").to_pylist(), np.float32)
    assert aug.shape == (rows, 2, 5) and (aug[..., :4] >= 0).all() and (aug[..., :2] + aug[..., 2:4] <= 1 + 1e-6).all()

    # text_emb: the web caption, then the 3 synthetic ones
    samples = list(iter_samples(shards_root, "00000", ("captions", "teacher")))
    assert [len(s["teacher"]["text_emb"]) for s in samples] == [4] * rows

    # training can replay an augmentation from its recorded parameters and meet the stored embedding
    ens = build_teachers(["tiny", str(folder)], "cpu", 0, False)
    s = samples[1]
    image = Image.open(io.BytesIO(s["jpg"])).convert("RGB")
    replay = ens.embed_images(ens.prepare([apply_crop(image, aug[1, 1].tolist())]))[0]
    np.testing.assert_allclose(replay.numpy(), img[1, 2], atol=2e-2)
    web = ens.embed_texts([s["txt"].decode()])[0]
    stored_web = (np.asarray(s["teacher"]["text_emb"][0], np.uint16).astype(np.uint32) << 16).view(np.float32)
    np.testing.assert_allclose(web.numpy(), stored_web, atol=2e-2)

    m = StageManifest.load(shards_root, "teacher")
    assert m.total_files == len(shards.entries) and m.total_samples == shards.total_samples
    assert m.total_bytes == sum(p.stat().st_size for p in shards_root.teacher.glob("*.arrow"))
    assert "inputs" in m.entries["00000"]  # which caption sidecar it embedded

    # rerun: nothing to do
    capsys.readouterr()
    assert _teacher(shards_root, "--teacher", teachers, "--augmentations", "2", "--dtype", "bfloat16") == 0
    assert f"{len(shards.entries)} done already, 0 to do" in capsys.readouterr().err


def test_teacher_float16_web_captions_only(shards_root, capsys):
    assert _teacher(shards_root, "--teacher", "tiny", "--set", "captions=false") == 0
    table, info = read_sidecar(shards_root.teacher / "00001.arrow")
    assert str(table.schema.field("image_emb").type) == "fixed_size_list<item: fixed_size_list<item: halffloat>[24]>[1]"
    assert "aug_params" not in table.column_names
    rows = StageManifest.load(shards_root, "shards").entries["00001"]["samples"]
    assert embeddings(table, "image_emb").shape == (rows, 1, 24)
    assert [len(t) for t in table.column("text_emb").to_pylist()] == [1] * rows


def test_teacher_needs_caption_sidecars_and_names_the_shard(shards_root, capsys):
    assert main(["captions", "--data", str(shards_root.root), "--model", "tiny", "--max-new-tokens", "8",
                 "--workers", "0", "--set", 'shards=["00000"]']) == 0
    capsys.readouterr()
    assert _teacher(shards_root, "--teacher", "tiny") == 1
    err = capsys.readouterr().err
    assert "shard 00001 skipped: no captions sidecar" in err and "shard 00002 skipped" in err
    assert sorted(p.name for p in shards_root.teacher.glob("*.arrow")) == ["00000.arrow"]
