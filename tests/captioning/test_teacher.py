"""siclip teacher: image (plain + recorded augmentations) and text (web + synthetic) embeddings."""

from __future__ import annotations

import io
import re

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from siclip.captioning.config import TeacherConfig
from siclip.captioning.embed import build_teachers
from siclip.images import apply_view
from siclip.captioning.models import build_tiny_clip
from siclip.captioning.sidecar import storage_array
from siclip.captioning.teacher_cli import sidecar_size
from siclip.cli import main
from siclip.manifests.manifest import StageManifest
from siclip.manifests.samples import embeddings, iter_samples, read_sidecar
from siclip.manifests.storage import format_size

from siclip_testing import save_tiny
from captions_helpers import captions, teacher as _teacher, text_embeddings as _text_embeddings


class OwnTeachers:
    """The teachers run the way their authors' code runs them (transformers, each with its own processor and
    tokenizer), then combined as the mean-cosine ensemble: each unit length, concatenated, unit length again."""

    def __init__(self, folders_or_tiny: list[str]):
        from transformers import AutoImageProcessor, AutoTokenizer, CLIPModel

        self.parts = []
        for name in folders_or_tiny:
            if name == "tiny":
                model, (ip, tok) = build_tiny_clip(seed=0)
            else:
                model = CLIPModel.from_pretrained(name).eval()
                ip, tok = AutoImageProcessor.from_pretrained(name), AutoTokenizer.from_pretrained(name)
            self.parts.append((model, ip, tok))

    @staticmethod
    def _combine(outs):
        outs = [o if isinstance(o, torch.Tensor) else o.pooler_output for o in outs]
        return F.normalize(torch.cat([F.normalize(o, dim=-1) for o in outs], dim=-1), dim=-1).numpy()

    @torch.no_grad()
    def images(self, images) -> np.ndarray:
        return self._combine([m.get_image_features(pixel_values=ip(images=images, return_tensors="pt")["pixel_values"])
                              for m, ip, _ in self.parts])

    @torch.no_grad()
    def texts(self, texts) -> np.ndarray:
        outs = []
        for m, _, tok in self.parts:
            enc = tok(texts, padding=True, truncation=True, return_tensors="pt",
                      max_length=m.config.text_config.max_position_embeddings)
            outs.append(m.get_text_features(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]))
        return self._combine(outs)


def _check_estimate(root, capsys_err: str, cfg: TeacherConfig) -> None:
    """The a-priori sidecar estimate is within a factor of 2 of what the stage wrote."""
    m = StageManifest.load(root, "teacher")
    per_row, per_file, assumed = sidecar_size(cfg)
    estimate = m.total_samples * per_row + m.total_files * per_file
    assert assumed == [] and 0.5 < m.total_bytes / estimate < 2, (m.total_bytes, estimate)
    printed = re.search(r"teacher: estimated (.+?) of sidecars", capsys_err).group(1)
    assert printed == format_size(estimate + 4096)


def test_teacher_sidecar_shapes_dtypes_unit_embeddings_and_replayable_augmentations(shards_root, tmp_path, capsys):
    assert captions(shards_root, "--workers", "0") == 0
    folder = save_tiny("clip", tmp_path / "clip-by-path", seed=5)
    teachers = f"tiny,{folder}"  # an ensemble of two, one loaded by path
    capsys.readouterr()
    assert _teacher(shards_root, "--teacher", teachers, "--augmentations", "3", "--dtype", "bfloat16") == 0
    _check_estimate(shards_root, capsys.readouterr().err,
                    TeacherConfig(data=str(shards_root.root), teacher=teachers, augmentations=3, dtype="bfloat16"))

    shards = StageManifest.load(shards_root, "shards")
    rows = shards.entries["00000"].samples
    table, info = read_sidecar(shards_root.teacher / "00000.arrow")
    assert [t["dim"] for t in info["teachers"]] == [24, 24] and info["dim"] == 48
    assert info["teachers"][1]["id"] == str(folder) and info["dtype"] == "bfloat16"
    assert table.schema.field("image_emb").metadata[b"dtype"] == b"bfloat16"
    assert str(table.schema.field("image_emb").type) == "fixed_size_list<item: fixed_size_list<item: uint16>[48]>[4]"
    img = embeddings(table, "image_emb")
    assert img.shape == (rows, 4, 48) and img.dtype == np.float32
    # unit length as a whole (the distillation losses' scale); each teacher contributes 1/√2 of it
    np.testing.assert_allclose(np.linalg.norm(img, axis=-1), 1, atol=1e-2)
    np.testing.assert_allclose(np.linalg.norm(img[..., :24], axis=-1), 2 ** -0.5, atol=1e-2)

    # the stored vectors are the teachers' own embeddings of the same inputs, ensembled
    samples = list(iter_samples(shards_root, "00000", ("captions", "teacher")))
    images = [Image.open(io.BytesIO(s["jpg"])).convert("RGB") for s in samples]
    own = OwnTeachers(["tiny", str(folder)])
    np.testing.assert_allclose(img[:, 0], own.images(images), atol=1e-2)
    texts = _text_embeddings(table)
    assert [len(t) for t in texts] == [4] * rows  # the web caption, then the 3 synthetic ones
    for s, stored in zip(samples, texts):
        wanted = own.texts([s["txt"].decode(), *s["captions"]["captions"]])
        np.testing.assert_allclose(stored, wanted, atol=1e-2)

    # K distinct recorded crops per sample, different from sample to sample, none of them the whole image
    aug = np.asarray(table.column("aug_params").to_pylist(), np.float32)
    assert aug.shape == (rows, 3, 5) and (aug[..., :4] >= 0).all() and (aug[..., :2] + aug[..., 2:4] <= 1 + 1e-6).all()
    assert len({tuple(p) for p in aug.reshape(-1, 5).round(6).tolist()}) == rows * 3
    assert (aug[..., 2] * aug[..., 3] < 0.999).all()
    # replaying each crop gives an embedding nearest its own slot, for every sample and every k (rounded to
    # bfloat16 as stored, so that two similar crops are not confused by the rounding alone)
    ens = build_teachers(["tiny", str(folder)], "cpu", 0, False)
    for r, image in enumerate(images):
        replayed = ens.embed_images(ens.prepare([apply_view(image, p.tolist()) for p in aug[r]]))
        np.testing.assert_allclose(replayed.numpy(), img[r, 1:], atol=1e-2)
        as_stored = (storage_array(replayed, "bfloat16").astype(np.uint32) << 16).view(np.float32)
        distances = np.linalg.norm(as_stored[:, None, :] - img[r][None, :, :], axis=-1)  # (K, 1 + K slots)
        assert distances.argmin(axis=1).tolist() == [1, 2, 3], (r, distances)

    m = StageManifest.load(shards_root, "teacher")
    assert m.total_files == len(shards.entries) and m.total_samples == shards.total_samples
    assert m.total_bytes == sum(p.stat().st_size for p in shards_root.teacher.glob("*.arrow"))
    assert "captions/00000.arrow" in m.entries["00000"].inputs  # which caption sidecar it embedded

    # rerun: nothing to do
    assert _teacher(shards_root, "--teacher", teachers, "--augmentations", "3", "--dtype", "bfloat16") == 0
    assert f"{len(shards.entries)} done already, 0 to do" in capsys.readouterr().err


def test_teacher_float16_web_captions_only(shards_root, capsys):
    assert _teacher(shards_root, "--teacher", "tiny", "--set", "captions=false") == 0
    _check_estimate(shards_root, capsys.readouterr().err, TeacherConfig(data=str(shards_root.root), teacher="tiny",
                                                                        captions=False))
    table, info = read_sidecar(shards_root.teacher / "00001.arrow")
    assert str(table.schema.field("image_emb").type) == "fixed_size_list<item: fixed_size_list<item: halffloat>[24]>[1]"
    assert "aug_params" not in table.column_names
    rows = StageManifest.load(shards_root, "shards").entries["00001"].samples
    img = embeddings(table, "image_emb")
    assert img.shape == (rows, 1, 24)
    texts = _text_embeddings(table)
    assert [len(t) for t in texts] == [1] * rows
    # float16 holds the teacher's own embedding (unit length, so not zeros), to float16 precision
    samples = list(iter_samples(shards_root, "00001", ("teacher",)))
    own = OwnTeachers(["tiny"])
    np.testing.assert_allclose(img[:, 0], own.images([Image.open(io.BytesIO(s["jpg"])).convert("RGB") for s in samples]),
                               atol=2e-3)
    np.testing.assert_allclose(np.concatenate(texts), own.texts([s["txt"].decode() for s in samples]), atol=2e-3)


def test_a_recaptioned_shard_is_re_embedded_and_the_others_are_not(shards_root, capsys):
    assert captions(shards_root, "--workers", "0") == 0
    assert _teacher(shards_root, "--teacher", "tiny") == 0
    before = {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in shards_root.teacher.glob("*.arrow")}
    old_texts = _text_embeddings(read_sidecar(shards_root.teacher / "00001.arrow")[0])

    # new synthetic captions for one shard only
    assert captions(shards_root, "--workers", "0", "--seed", "7", "--overwrite", "--set", 'shards=["00001"]') == 0
    capsys.readouterr()
    assert _teacher(shards_root, "--teacher", "tiny") == 0
    assert "2 done already, 1 to do" in capsys.readouterr().err
    after = {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in shards_root.teacher.glob("*.arrow")}
    assert after["00000.arrow"] == before["00000.arrow"] and after["00002.arrow"] == before["00002.arrow"]
    assert after["00001.arrow"][1] != before["00001.arrow"][1]

    table, _ = read_sidecar(shards_root.teacher / "00001.arrow")
    new_texts = _text_embeddings(table)
    samples = list(iter_samples(shards_root, "00001", ("captions",)))
    own = OwnTeachers(["tiny"])
    for s, old, new in zip(samples, old_texts, new_texts):
        np.testing.assert_allclose(new, own.texts([s["txt"].decode(), *s["captions"]["captions"]]), atol=2e-3)
        np.testing.assert_array_equal(new[0], old[0])  # the web caption is the same ...
        assert not np.allclose(new[1:], old[1:], atol=1e-2)  # ... the synthetic ones are the new captions'
    assert StageManifest.load(shards_root, "teacher").entry_ok(shards_root, "00001")


def test_teacher_overwrite_with_a_teacher_that_does_not_load_keeps_every_entry(shards_root, tmp_path, capsys):
    web_only = ("--set", "captions=false")
    assert _teacher(shards_root, "--teacher", "tiny", *web_only) == 0
    listed = StageManifest.load(shards_root, "teacher").entries
    sidecars = {p.name: p.read_bytes() for p in shards_root.teacher.glob("*.arrow")}
    assert len(listed) == len(sidecars) == 3
    broken = tmp_path / "not-a-clip"  # passes the name check (a model folder) and fails when the model loads
    broken.mkdir()
    (broken / "config.json").write_text('{"model_type": "clip"}')
    capsys.readouterr()
    assert _teacher(shards_root, "--teacher", str(broken), "--overwrite", *web_only) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("siclip teacher: error:") and "not-a-clip" in err[-1]
    assert "3 to do" in "\n".join(err)  # it got as far as the model, with every shard to replace
    assert StageManifest.load(shards_root, "teacher").entries == listed
    assert {p.name: p.read_bytes() for p in shards_root.teacher.glob("*.arrow")} == sidecars
    assert main(["manifest", str(shards_root.root), "--verify"]) == 0

    # an --overwrite that works replaces every entry and its sidecar
    assert _teacher(shards_root, "--teacher", "tiny", "--augmentations", "1", "--overwrite", *web_only) == 0
    m = StageManifest.load(shards_root, "teacher")
    assert sorted(m.entries) == sorted(listed) and all(e.params["augmentations"] == 1 for e in m.entries.values())
    assert all(read_sidecar(shards_root.teacher / name)[1]["augmentations"] == 1 for name in sidecars)
    assert main(["manifest", str(shards_root.root), "--verify"]) == 0


def test_teacher_needs_caption_sidecars_and_names_the_shard(shards_root, capsys):
    assert main(["captions", "--data", str(shards_root.root), "--model", "tiny", "--max-new-tokens", "8",
                 "--workers", "0", "--set", 'shards=["00000"]']) == 0
    capsys.readouterr()
    assert _teacher(shards_root, "--teacher", "tiny") == 1
    err = capsys.readouterr().err
    assert "shard 00001 skipped: no captions sidecar" in err and "shard 00002 skipped" in err
    assert sorted(p.name for p in shards_root.teacher.glob("*.arrow")) == ["00000.arrow"]


def test_flip_false_records_the_same_crops_without_flips():
    import random

    from siclip.images import draw_view

    with_flips = [draw_view(random.Random(f"{i}:{k}"), (0.35, 1.0)) for i in range(40) for k in range(2)]
    without = [draw_view(random.Random(f"{i}:{k}"), (0.35, 1.0), flip=False) for i in range(40) for k in range(2)]
    assert any(p[4] == 1.0 for p in with_flips) and all(p[4] == 0.0 for p in without)
    assert [p[:4] for p in with_flips] == [p[:4] for p in without]
    # off by default, as training's flip; absent from the parameters where it changes nothing, so sidecars made
    # before the option (flips on) or without augmentations keep their parameters
    assert not TeacherConfig(data="d").flip and "flip" not in TeacherConfig(data="d").params()
    assert "flip" not in TeacherConfig(data="d", augmentations=2, flip=True).params()
    assert TeacherConfig(data="d", augmentations=2).params()["flip"] is False


def test_a_siclip_run_is_a_teacher_as_its_final_model_or_a_checkpoint(shards_root, tmp_path, capsys):
    """A run trained here embeds the images and captions with its own model, as `siclip.training.load` gives it."""
    from siclip.training import load
    from siclip_testing import siclip

    config = tmp_path / "run.toml"
    config.write_text(
        'model_set = ["image.image_size=16", "image.patch_size=8", "image.width=32", "image.depth=2", '
        '"image.heads=2", "image.share_attention=[[1, 2]]", "text.width=32", "text.depth=2", "text.heads=2", '
        '"text.share_attention=[[1, 2]]", "text.context_length=16", "embed_dim=16"]\n'
        "batch_size = 8\nworkers = 0\nsynthetic_captions = 0\nval_shards = 0\neval_every = 0\n"
        "checkpoint_every = 1\nkeep_checkpoints = 1\n[[stages]]\nname = 'a'\nsteps = 2\n[stages.loss]\nclip_synthetic = 0.0\n")
    siclip("train", "--data", shards_root.root, "--config", config, "--out", "own")
    run = shards_root.runs / "own"
    checkpoint = next((run / "checkpoints").glob("step-*"))
    capsys.readouterr()
    # named as a stage's teacher names it: relative to the data root
    assert _teacher(shards_root, "--teacher", "runs/own", "--set", "captions=false") == 0
    _check_estimate(shards_root, capsys.readouterr().err,
                    TeacherConfig(data=str(shards_root.root), teacher="runs/own", captions=False))

    model, tokenizer, preprocess = load(run)
    for shard in StageManifest.load(shards_root, "shards").entries:
        table, info = read_sidecar(shards_root.teacher / f"{shard}.arrow")
        assert info["dim"] == 16 and info["teachers"][0]["id"] == str(run / "final")
        samples = list(iter_samples(shards_root, shard, ("teacher",)))
        with torch.no_grad():
            images = model.encode_image(torch.stack([preprocess(s["jpg"]) for s in samples]))
            texts = model.encode_text(tokenizer([s["txt"].decode() for s in samples]))
        np.testing.assert_allclose(embeddings(table, "image_emb")[:, 0], images.numpy(), atol=2e-3)
        np.testing.assert_allclose(np.concatenate(_text_embeddings(table)), texts.numpy(), atol=2e-3)

    # its final/ folder and a checkpoint are teachers too, each its own model
    ensemble = build_teachers([str(run / "final"), str(checkpoint)], "cpu", 0, False)
    assert ensemble.describe() == [{"id": str(run / "final"), "revision": None, "dim": 16},
                                   {"id": str(checkpoint), "revision": None, "dim": 16}]


def test_a_misspelt_or_missing_teacher_is_named_before_anything_runs(shards_root, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for teacher, message in [("tiny,sidcar", "teacher 'sidcar' is not a teacher name (did you mean 'sidecar'?)"),
                             ("./runs/nope", f"teacher './runs/nope': no such folder: {tmp_path / 'runs/nope'}"),
                             (str(shards_root.runs / "nope"), f"no such folder: {shards_root.runs / 'nope'}")]:
        assert _teacher(shards_root, "--teacher", teacher, "--set", "captions=false") == 2
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1, err
    assert not list(shards_root.teacher.glob("*.arrow"))
