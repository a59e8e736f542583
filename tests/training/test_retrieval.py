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
    from siclip_testing import siclip

    root = make_root(tmp_path / "data", [16, 16, 16])
    cfg = tmp_path / "diverge.toml"
    cfg.write_text("""
model_set = ["image.image_size=16", "image.patch_size=8", "image.width=32", "image.depth=2", "image.heads=2",
             "image.share_attention=[[1, 2]]", "text.width=32", "text.depth=2", "text.heads=2",
             "text.share_attention=[[1, 2]]", "text.context_length=16", "embed_dim=16"]
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
    from siclip.training.evaluate import zeroshot
    from siclip.training.model import build_model, load_config

    folder = tmp_path / "classes"
    for name, colour in (("red", (255, 0, 0)), ("blue", (0, 0, 255))):
        (folder / name).mkdir(parents=True)
        Image.new("RGB", (20, 20), colour).save(folder / name / "0.png")
    model = build_model(load_config("tiny", {"image.image_size": 16, "text.context_length": 16}))
    with torch.no_grad():
        next(p for n, p in model.named_parameters() if n.startswith("visual.")).fill_(float("nan"))
    with pytest.raises(SiclipError, match=rf"^zero-shot {folder}: 2 of 2 image embeddings are not finite"):
        zeroshot(model, shared_tokenizer(), Preprocess(16, [0.5] * 3, [0.25] * 3), folder, ["a {}."])
