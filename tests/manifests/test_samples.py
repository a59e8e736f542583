"""siclip.manifests.samples: a shard's samples joined by key with their sidecars, or a clear error."""

from __future__ import annotations

import io
import tarfile

import numpy as np
import pyarrow as pa
import pyarrow.ipc as ipc
import pytest

from siclip.manifests.layout import DataRoot
from siclip.manifests.manifest import StageManifest
from siclip.manifests.samples import (CorruptShardError, SidecarMismatchError, embeddings, finished_shards,
                               iter_samples, iter_shard, read_sidecar)
from siclip.manifests.errors import SiclipError
from siclip_testing import write_tar

KEYS = ["000000000", "000000001", "000000003"]


def _shard(root: DataRoot, name: str = "00000", keys=KEYS):
    root.shards.mkdir(parents=True, exist_ok=True)
    tar = root.shards / f"{name}.tar"
    with tarfile.open(tar, "w") as tf:
        for k in keys:
            for ext, data in (("jpg", b"\xff\xd8fake" + k.encode()), ("txt", f"caption {k}".encode()), ("json", b"{}")):
                info = tarfile.TarInfo(f"{k}.{ext}")
                info.size = len(data)
                tf.addfile(info, io.BytesIO(data))
    m = StageManifest.load(root, "shards")
    m.add(root, name, [tar], len(keys), rows=len(keys), failures={})
    m.save(root)
    return tar


def _sidecar(root: DataRoot, stage: str, keys, name: str = "00000", **columns):
    """A sidecar, listed in its stage's manifest as a finished one is."""
    folder = getattr(root, stage)
    folder.mkdir(parents=True, exist_ok=True)
    table = pa.table({"key": keys, **columns})
    path = folder / f"{name}.arrow"
    with pa.OSFile(str(path), "wb") as sink, ipc.new_file(sink, table.schema) as w:
        w.write_table(table)
    m = StageManifest.load(root, stage)
    m.add(root, name, [path], len(keys), params={}, model="made-up", failed={}, inputs={})
    m.save(root)
    return path


def test_iter_shard_groups_members_by_key(tmp_path):
    root = DataRoot(tmp_path)
    samples = list(iter_shard(_shard(root)))
    assert [s["__key__"] for s in samples] == KEYS
    assert samples[2]["txt"] == b"caption 000000003" and set(samples[0]) == {"__key__", "__url__", "jpg", "txt", "json"}
    assert [s.name for s in finished_shards(root)] == ["00000"]


def test_a_key_whose_members_are_not_together_is_a_corrupt_shard(tmp_path):
    tar = write_tar(tmp_path / "00000.tar", [("a.jpg", b"1"), ("a.txt", b"x"), ("b.jpg", b"2"), ("a.json", b"{}")])
    got = iter_shard(tar)
    assert next(got)["__key__"] == "a" and next(got)["__key__"] == "b"
    with pytest.raises(CorruptShardError, match=f"{tar}: key a appears twice"):
        next(got)


def test_a_member_twice_in_a_row_is_a_corrupt_shard_not_a_silently_replaced_image(tmp_path):
    tar = write_tar(tmp_path / "00000.tar", [("a.jpg", b"1"), ("a.jpg", b"2"), ("a.txt", b"x")])
    with pytest.raises(CorruptShardError, match=f"{tar}: member a.jpg appears twice"):
        list(iter_shard(tar))


def test_samples_joined_with_captions_by_key(tmp_path):
    root = DataRoot(tmp_path)
    _shard(root)
    # sidecar rows in another order: the join is by key, not by position
    _sidecar(root, "captions", list(reversed(KEYS)), captions=[[f"c {k}", "x"] for k in reversed(KEYS)],
             status=["ok"] * 3)
    got = list(iter_samples(root, "00000", ("captions",)))
    assert [s["__key__"] for s in got] == KEYS
    assert [s["captions"]["captions"][0] for s in got] == [f"c {k}" for k in KEYS]
    # the data root may be given as a path, as everywhere else
    assert [s["__key__"] for s in iter_samples(str(tmp_path), "00000", ("captions",))] == KEYS
    assert [r.name for r in finished_shards(str(tmp_path))] == ["00000"]


def test_missing_key_names_shard_sidecar_and_first_missing_key(tmp_path):
    root = DataRoot(tmp_path)
    _shard(root)
    path = _sidecar(root, "captions", [KEYS[0], KEYS[2]], captions=[["a"], ["b"]], status=["ok", "ok"])
    with pytest.raises(SidecarMismatchError) as e:
        list(iter_samples(root, "00000", ("captions",)))
    msg = str(e.value)
    assert "shard 00000" in msg and KEYS[1] in msg and str(path) in msg and "\n" not in msg


def test_extra_key_in_sidecar_is_an_error_too(tmp_path):
    root = DataRoot(tmp_path)
    _shard(root)
    _sidecar(root, "captions", KEYS + ["000000009"], captions=[["a"]] * 4, status=["ok"] * 4)
    with pytest.raises(SidecarMismatchError, match="000000009"):
        list(iter_samples(root, "00000", ("captions",)))


def test_a_key_twice_in_a_sidecar_is_an_error(tmp_path):
    root = DataRoot(tmp_path)
    _shard(root)
    path = _sidecar(root, "captions", KEYS + [KEYS[1]], captions=[["a"]] * 4, status=["ok"] * 4)
    with pytest.raises(SidecarMismatchError, match=f"shard 00000: captions sidecar {path} has key {KEYS[1]} twice"):
        next(iter_samples(root, "00000", ("captions",)))


def test_verify_names_a_listed_sidecar_that_is_missing(tmp_path):
    from siclip.manifests.inspect import verify

    root = DataRoot(tmp_path)
    _shard(root)
    path = _sidecar(root, "teacher", KEYS)
    assert verify(root) == []
    path.unlink()
    assert verify(root) == [f"teacher: {path}: missing"]
    with pytest.raises(SidecarMismatchError, match=f"shard 00000: no teacher sidecar at {path}"):
        next(iter_samples(root, "00000", ("teacher",)))


def test_missing_sidecar_and_unreadable_files_are_clear_errors(tmp_path):
    root = DataRoot(tmp_path)
    tar = _shard(root)
    with pytest.raises(SidecarMismatchError, match="shard 00000: no teacher sidecar"):
        list(iter_samples(root, "00000", ("teacher",)))
    root.captions.mkdir()
    (root.captions / "00000.arrow").write_bytes(b"not arrow")
    with pytest.raises(SiclipError, match="not a readable Arrow IPC file"):
        read_sidecar(root.captions / "00000.arrow")
    tar.write_bytes(tar.read_bytes()[:700])
    with pytest.raises(CorruptShardError, match="00000.tar"):
        list(iter_shard(tar))


def test_embeddings_decode_float16_and_bfloat16(tmp_path):
    import torch

    root = DataRoot(tmp_path)
    x = torch.randn(3, 2, 4)
    half = pa.FixedSizeListArray.from_arrays(pa.FixedSizeListArray.from_arrays(pa.array(x.half().numpy().ravel()), 4), 2)
    bits = x.bfloat16().view(torch.int16).numpy().view(np.uint16).ravel()
    bf = pa.FixedSizeListArray.from_arrays(pa.FixedSizeListArray.from_arrays(pa.array(bits), 4), 2)
    path = _sidecar(root, "teacher", KEYS, a=half, b=bf)
    table, _ = read_sidecar(path)
    np.testing.assert_allclose(embeddings(table, "a"), x.numpy(), atol=1e-2)
    np.testing.assert_allclose(embeddings(table, "b"), x.bfloat16().float().numpy(), atol=0)
