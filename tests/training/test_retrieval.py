"""siclip.training.evaluate's retrieval figures: a candidate that ties with the match ranks above it, and an embedding
that is not finite (a diverged model) is an error naming where, never a score."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from siclip.manifests.errors import SiclipError
from siclip.training.data import all_shards
from siclip.images import Preprocess
from siclip.training.evaluate import recall_at, retrieval, retrieval_metrics
from train_helpers import make_root


def test_a_candidate_tying_with_the_match_ranks_above_it():
    similarity = torch.tensor([[0.9, 0.9, 0.1],   # the match ties with candidate 1: rank 2
                               [0.2, 0.8, 0.1],   # the match is strictly best: rank 1
                               [0.7, 0.7, 0.7]])  # ties with both others: rank 3
    assert recall_at(similarity, ks=(1, 2, 3)) == pytest.approx({1: 1 / 3, 2: 2 / 3, 3: 1.0})


def test_collapsed_embeddings_score_no_hit_until_k_covers_every_candidate():
    same = F.normalize(torch.ones(12, 4), dim=-1)  # every input, one embedding: every score ties
    m = retrieval_metrics(same, same.clone())
    assert m["i2t_r1"] == m["t2i_r1"] == m["i2t_r10"] == m["t2i_r10"] == 0.0


def test_a_nan_in_a_similarity_is_never_a_hit():
    similarity = torch.eye(3)
    similarity[0, 0] = similarity[1, 2] = float("nan")
    assert recall_at(similarity, ks=(1, 2)) == pytest.approx({1: 1 / 3, 2: 2 / 3})  # row 0 never; row 1 behind NaN


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_a_non_finite_embedding_is_a_one_line_error_naming_where(bad):
    image, text = F.normalize(torch.randn(8, 4), dim=-1), F.normalize(torch.randn(8, 4), dim=-1)
    image[3, 1] = bad
    with pytest.raises(SiclipError, match=r"^runs/x at step 40: 1 of 8 image embeddings are not finite") as e:
        retrieval_metrics(image, text, where="runs/x at step 40")
    assert "\n" not in str(e.value)


def test_a_diverged_model_stops_retrieval_on_real_shards(tmp_path):
    from siclip.training.model import build_model, load_config

    root = make_root(tmp_path, [6, 5])
    model = build_model(load_config("tiny", {"image.image_size": 16, "text.context_length": 16}))
    with torch.no_grad():
        next(p for n, p in model.named_parameters() if n.startswith("text.")).fill_(float("nan"))
    preprocess = Preprocess(16, [0.5] * 3, [0.25] * 3)
    with pytest.raises(SiclipError, match=r"^my-run: 11 of 11 text embeddings are not finite"):
        retrieval(model, root, all_shards(root), preprocess, 16, where="my-run")


def test_a_run_that_diverges_stops_at_its_evaluation_with_one_line_naming_it(tmp_path):
    from siclip_testing import TINY_MODEL_SET, siclip

    root = make_root(tmp_path / "data", [16, 16, 16])
    cfg = tmp_path / "diverge.toml"
    cfg.write_text(TINY_MODEL_SET + """
batch_size = 8
workers = 0
val_shards = 1
synthetic_captions = 0
[[stages]]
name = "a"
steps = 2
lr = 1e30
[stages.loss]
clip_web = 1.0
clip_synthetic = 0.0
""")
    res = siclip("train", "--data", root.root, "--config", cfg, "--out", "diverged", check=False)
    last = res.stderr.strip().splitlines()[-1]
    assert res.returncode == 2 and "Traceback" not in res.stderr, res.stderr[-2000:]
    assert last.startswith(f"siclip train: error: {root.runs / 'diverged'} at step 2: ") and "not finite" in last


def test_a_diverged_model_stops_zero_shot_with_one_line_naming_the_folder(tmp_path):
    from PIL import Image

    from siclip.training.data import shared_tokenizer
    from siclip.training.evaluate import ModelEncoder, zeroshot, zeroshot_set
    from siclip.training.model import build_model, load_config

    folder = tmp_path / "classes"
    for name, colour in (("red", (255, 0, 0)), ("blue", (0, 0, 255))):
        (folder / name).mkdir(parents=True)
        Image.new("RGB", (20, 20), colour).save(folder / name / "0.png")
    model = build_model(load_config("tiny", {"image.image_size": 16, "text.context_length": 16}))
    with torch.no_grad():
        next(p for n, p in model.named_parameters() if n.startswith("visual.")).fill_(float("nan"))
    with pytest.raises(SiclipError, match=rf"^zero-shot {folder}: 2 of 2 image embeddings are not finite"):
        zeroshot(ModelEncoder(model, shared_tokenizer(), Preprocess(16, [0.5] * 3, [0.25] * 3)),
                 zeroshot_set(folder, templates=["a {}."]))


def break_image(root, shard: int, i: int, data: bytes = b"not a JPEG, whatever its name says") -> str:
    """Replace sample i of shard `shard`'s jpg member with `data`, re-recorded in the shards manifest (as a shard that
    stage 1 wrote so would be): the key of the broken sample."""
    import io
    import tarfile

    from siclip.manifests.layout import shard_name
    from siclip.manifests.manifest import StageManifest
    from train_helpers import key_of

    name, key = shard_name(shard), key_of(shard, i)
    tar = root.shards / f"{name}.tar"
    with tarfile.open(tar) as tf:
        members = [(m, tf.extractfile(m).read()) for m in tf.getmembers()]
    with tarfile.open(tar, "w") as tf:
        for m, content in members:
            content = data if m.name == f"{key}.jpg" else content
            m.size = len(content)
            tf.addfile(m, io.BytesIO(content))
    manifest = StageManifest.load(root, "shards")
    old = manifest.entries[name]
    manifest.add(root, name, [tar], old.samples, rows=old.rows, failures=old.failures)
    manifest.save(root)
    return key


def test_retrieval_skips_a_sample_whose_image_does_not_decode_counts_it_and_names_it(tmp_path, capsys):
    from siclip.training.model import build_model, load_config

    root = make_root(tmp_path, [6, 5])
    key = break_image(root, 1, 2)
    torch.manual_seed(0)
    model = build_model(load_config("tiny", {"image.image_size": 16, "text.context_length": 16}))
    out = retrieval(model, root, all_shards(root), Preprocess(16, [0.5] * 3, [0.25] * 3), 16, where="my-run")
    said = capsys.readouterr().err.splitlines()
    assert out["samples"] == 10 and out["unreadable"] == 1 and out["chance_r1"] == pytest.approx(1 / 10)
    assert len(said) == 1 and said[0].startswith(
        f"my-run: retrieval skipped 1 unreadable image of 11: {root.shards / '00001.tar'}: sample {key}: "
        f"not a readable image (UnidentifiedImageError: cannot identify image file"), said


def test_retrieval_with_no_readable_image_is_a_one_line_error(tmp_path):
    from siclip.training.model import build_model, load_config

    root = make_root(tmp_path, [2])
    for i in range(2):
        break_image(root, 0, i, b"\xff\xd8\xff\xe0 a truncated JPEG")
    model = build_model(load_config("tiny", {"image.image_size": 16, "text.context_length": 16}))
    with pytest.raises(SiclipError, match=r"^nothing to evaluate: none of the 2 held-out samples has a readable image "
                                          r"\(.*00000\.tar: sample 000000000: not a readable image"):
        retrieval(model, root, all_shards(root), Preprocess(16, [0.5] * 3, [0.25] * 3), 16)


def test_siclip_eval_retrieval_shows_progress_and_counts_an_unreadable_sample_in_its_json(tmp_path):
    """Retrieval over shards: a progress line (count, rate, ETA, skipped) on stderr, the result JSON alone on
    stdout with the skipped sample counted, and the table says so too."""
    import json
    import re

    from siclip_testing import siclip

    from siclip.training.model import build_model

    root = make_root(tmp_path / "data", [6, 5])
    key = break_image(root, 0, 4)
    torch.manual_seed(0)
    build_model("tiny").save_pretrained(tmp_path / "run" / "final")
    res = siclip("eval", "--run", tmp_path / "run", "--retrieval", root.root, "--json")
    out = json.loads(res.stdout)
    assert set(out) == {"retrieval"} and out["retrieval"]["samples"] == 10 and out["retrieval"]["unreadable"] == 1
    assert "Traceback" not in res.stderr and f"00000.tar: sample {key}: not a readable image" in res.stderr
    last = [ln for ln in res.stderr.splitlines() if ln.startswith("eval: retrieval: ")][-1]
    assert re.fullmatch(r"eval: retrieval: 11/11 samples \(100%\) \| [\d.,]+ samples/s \| ETA \w+ \| "
                        r"1 unreadable, skipped", last), last
    table = siclip("eval", "--run", tmp_path / "run", "--retrieval", root.root).stdout
    assert "(1 held-out sample with an unreadable image, skipped)" in table
