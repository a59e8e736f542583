"""make bench-peer's side-by-side parts, run for real (extra siclip[mobileclip]; `make test-mobileclip`): open_clip's
copy of the tiny_preln shape, open_clip_train reading siclip's shards, and its log read back as the bench reads it."""

from __future__ import annotations

import pytest
import torch

from siclip.training.model import build_model, count_parameters

pytestmark = pytest.mark.mobileclip



def test_the_open_clip_config_is_tiny_preln_tensor_for_tensor_in_count():
    import open_clip
    from bench.open_clip_peer import register_models
    from bench.peer import OPEN_CLIP_MODEL

    register_models()
    theirs, ours = open_clip.create_model(OPEN_CLIP_MODEL), build_model("tiny_preln")
    assert count_parameters(theirs) == count_parameters(ours) == 7_986_817
    assert count_parameters(theirs.visual) == count_parameters(ours.visual)
    pixels, ids = torch.zeros(2, 3, 64, 64), torch.zeros(2, 77, dtype=torch.long)
    with torch.no_grad():
        assert theirs.encode_image(pixels).shape == ours.encode_image(pixels).shape == (2, 128)
        assert theirs.encode_text(ids).shape == ours.encode_text(ids).shape == (2, 128)


def test_open_clip_train_reads_siclip_shards_once_the_end_of_shard_marker_is_left_out(shards_data, monkeypatch):
    import open_clip_train.data as data
    from bench.open_clip_peer import shard_ends_unmarked

    from siclip.manifests.layout import DataRoot
    from siclip.manifests.samples import finished_shards

    shards = list(finished_shards(DataRoot(shards_data)))
    sources = lambda: iter([{"url": str(s.tar)} for s in shards])  # noqa: E731
    monkeypatch.setattr(data, "tar_file_expander", data.tar_file_expander)  # restored after the test
    with pytest.raises(KeyError, match="fname"):  # webdataset >= 0.2.87's marker, read as a file
        list(data.tarfile_to_samples_nothrow(sources()))
    shard_ends_unmarked()
    samples = list(data.tarfile_to_samples_nothrow(sources()))
    assert len(samples) == sum(s.samples for s in shards) > 0
    assert all({"jpg", "txt"} <= set(s) for s in samples)
