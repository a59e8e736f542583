"""Sidecar files as written: one row per sample, the embeddings back as stored (float16 or bfloat16 bits),
provenance in the schema, and only a whole file, made with the same parameters, counted as complete."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from siclip.captioning.sidecar import complete_sidecar, storage_array, write_caption_sidecar, write_teacher_sidecar
from siclip.manifests.samples import embeddings, read_sidecar

KEYS = ["000000000", "000000001", "000000002"]


def test_caption_sidecar_round_trip(tmp_path):
    path = tmp_path / "00000.arrow"
    write_caption_sidecar(path, KEYS, [["a", "b"], [], ["c", "d"]], ["ok", "cannot decode jpg", "ok"],
                          {"params": {"seed": 1}, "model": "tiny"})
    table, info = read_sidecar(path)
    assert table.to_pylist() == [{"key": KEYS[0], "captions": ["a", "b"], "status": "ok"},
                                 {"key": KEYS[1], "captions": [], "status": "cannot decode jpg"},
                                 {"key": KEYS[2], "captions": ["c", "d"], "status": "ok"}]
    assert info == {"params": {"seed": 1}, "model": "tiny"}
    assert [p.name for p in tmp_path.iterdir()] == ["00000.arrow"]  # no temp file left
    assert complete_sidecar(path, {"seed": 1}) == 3
    assert complete_sidecar(path, {"seed": 2}) is None  # made with other parameters
    path.write_bytes(path.read_bytes()[:100])
    assert complete_sidecar(path, {"seed": 1}) is None  # not whole


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_teacher_sidecar_round_trip(tmp_path, dtype):
    g = torch.Generator().manual_seed(0)
    image = torch.randn(3, 1 + 2, 8, generator=g)  # plain image and 2 augmentations
    texts = [torch.randn(n, 8, generator=g) for n in (1, 3, 2)]  # the web caption, then synthetic ones
    aug = np.random.default_rng(0).random((3, 2, 5)).astype(np.float32)
    path = tmp_path / "00000.arrow"
    write_teacher_sidecar(path, KEYS, storage_array(image, dtype), [storage_array(t, dtype) for t in texts], aug,
                          ["ok", "ok", "no image"], dtype, {"dim": 8})
    table, info = read_sidecar(path)
    assert info == {"dim": 8} and table.column("key").to_pylist() == KEYS
    assert table.column("status").to_pylist() == ["ok", "ok", "no image"]
    stored = image.to(getattr(torch, dtype)).float().numpy()
    np.testing.assert_array_equal(embeddings(table, "image_emb"), stored)
    for i, t in enumerate(texts):
        np.testing.assert_array_equal(embeddings(table, "text_emb", i), t.to(getattr(torch, dtype)).float().numpy())
    np.testing.assert_array_equal(embeddings(table, "aug_params", 1), aug[1])
    assert table.schema.field("image_emb").metadata == {b"dtype": dtype.encode()}


def test_no_augmentations_no_aug_column(tmp_path):
    path = tmp_path / "00000.arrow"
    write_teacher_sidecar(path, KEYS[:1], storage_array(torch.ones(1, 1, 4), "float16"),
                          [storage_array(torch.ones(1, 4), "float16")], np.zeros((1, 0, 5), np.float32), ["ok"],
                          "float16", {})
    table, _ = read_sidecar(path)
    assert "aug_params" not in table.column_names and embeddings(table, "image_emb").shape == (1, 1, 4)
