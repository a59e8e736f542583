"""siclip captions: one complete Arrow sidecar per shard, N seeded captions per key, resumable."""

from __future__ import annotations

import json
import shutil


from siclip.cli import main
from siclip.manifests.io import sha256_file
from siclip.manifests.layout import DataRoot
from siclip.manifests.manifest import FileRecord, StageManifest
from siclip.manifests.samples import read_sidecar
from siclip.manifests.storage import write_storage

from siclip_testing import save_tiny
from captions_helpers import all_sidecars, captions, sidecar_rows, tar_keys


def test_dask_one_and_two_workers_give_the_same_complete_sidecars(shards_root, tmp_path, capsys):
    other = DataRoot(tmp_path / "other")
    shutil.copytree(shards_root.root, other.root)

    assert captions(shards_root, "--workers", "1") == 0
    assert captions(other, "--workers", "2") == 0
    one, two = all_sidecars(shards_root), all_sidecars(other)
    assert one == two

    shards = StageManifest.load(shards_root, "shards")
    assert sorted(one) == [f"{name}.arrow" for name in sorted(shards.entries)]
    for name in shards.entries:
        rows = one[f"{name}.arrow"]
        assert list(rows) == tar_keys(shards_root.shards / f"{name}.tar")  # every key, in tar order
        for caps, status in rows.values():
            assert status == "ok" and len(caps) == 3 and all(isinstance(c, str) and c for c in caps)
        # provenance in the schema metadata
        _, info = read_sidecar(shards_root.captions / f"{name}.arrow")
        assert info["model"] == "tiny(seed=0)" and info["shard"] == name
        assert info["params"]["top_p"] == 0.5 and info["params"]["temperature"] == 0.9 and info["params"]["num_captions"] == 3

    # the manifest lists each sidecar as it is on disk, and its totals add up
    m = StageManifest.load(shards_root, "captions")
    on_disk = sorted(shards_root.captions.glob("*.arrow"))
    assert m.total_files == len(on_disk) == len(shards.entries)
    assert m.total_bytes == sum(p.stat().st_size for p in on_disk)
    assert m.total_samples == sum(len(r) for r in one.values()) == shards.total_samples
    for p in on_disk:
        rec = m.entries[p.stem].files[f"captions/{p.name}"]
        assert rec.dump() == {"bytes": p.stat().st_size, "sha256": sha256_file(p)}
        assert m.entries[p.stem].params["max_new_tokens"] == 12
    # one worker process served the three shards and built its model once
    workers = {json.dumps(e.worker.dump(), sort_keys=True) for e in m.entries.values()}
    assert len(workers) == 1 and json.loads(workers.pop())["model_loaded_at"] is not None
    saved = json.loads(shards_root.manifest_path("captions").read_text())
    assert saved["totals"] == {"files": m.total_files, "samples": shards.total_samples, "bytes": m.total_bytes}
    assert (shards_root.captions / "_config.toml").read_text().count('model = "tiny"') == 1

    # siclip manifest shows the stage and --verify covers it
    capsys.readouterr()
    assert main(["manifest", str(shards_root.root), "--json", "--verify"]) == 0
    out = capsys.readouterr()
    assert json.loads(out.out)["stages"]["captions"] == {"files": m.total_files, "samples": m.total_samples, "bytes": m.total_bytes}
    n = shards.total_files + m.total_files
    assert f"{n}/{n} files ok" in out.err

    # a rerun finds everything done and rewrites nothing
    mtimes = {p: p.stat().st_mtime_ns for p in on_disk}
    assert captions(shards_root, "--workers", "0") == 0
    assert f"{len(shards.entries)} done already, 0 to do" in capsys.readouterr().err
    assert {p: p.stat().st_mtime_ns for p in on_disk} == mtimes


def test_same_seed_same_captions_other_seed_other_captions(shards_root, tmp_path, capsys):
    again = DataRoot(tmp_path / "again")
    shutil.copytree(shards_root.root, again.root)
    assert captions(shards_root, "--workers", "0", "--batch-size", "4") == 0
    assert captions(again, "--workers", "0", "--batch-size", "5") == 0  # other batches, same captions
    first = all_sidecars(shards_root)
    assert first == all_sidecars(again)

    # other parameters are refused without --overwrite, and nothing is touched
    before = {p: p.read_bytes() for p in again.captions.glob("*.arrow")}
    capsys.readouterr()
    assert captions(again, "--workers", "0", "--seed", "7") == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("siclip captions: error:")
    assert "other parameters" in err and "seed: 0 -> 7" in err and "--overwrite" in err
    assert {p: p.read_bytes() for p in again.captions.glob("*.arrow")} == before

    assert captions(again, "--workers", "0", "--seed", "7", "--overwrite") == 0
    reseeded = all_sidecars(again)
    assert reseeded.keys() == first.keys()
    assert reseeded != first
    assert StageManifest.load(again, "captions").params["seed"] == 7


def test_captioner_saved_with_save_pretrained_loads_by_path(shards_root, tmp_path):
    folder = save_tiny("captioner", tmp_path / "my-captioner", seed=3)
    assert (folder / "config.json").exists() and (folder / "model.safetensors").exists()
    by_path = DataRoot(tmp_path / "by-path")
    shutil.copytree(shards_root.root, by_path.root)

    assert main(["captions", "--data", str(by_path.root), "--model", str(folder), "--seed", "3",
                 "--max-new-tokens", "12", "--workers", "0"]) == 0
    assert captions(shards_root, "--seed", "3", "--workers", "0") == 0
    # the same weights through from_pretrained give exactly the captions of the in-memory model
    assert all_sidecars(by_path) == all_sidecars(shards_root)
    _, info = read_sidecar(by_path.captions / "00000.arrow")
    assert info["model"] == str(folder)


def _rewrite_shard(root: DataRoot, name: str, mutate) -> None:
    """Stage 1 wrote a shard with a problem: change its tar and its manifest record to match."""
    tar = root.shards / f"{name}.tar"
    mutate(tar)
    m = StageManifest.load(root, "shards")
    m.entries[name].files[f"shards/{name}.tar"] = FileRecord(bytes=tar.stat().st_size, sha256=sha256_file(tar))
    m.save(root)


def test_corrupt_shards_are_named_and_skipped_while_the_others_finish(shards_root, capsys):
    import io
    import tarfile

    bad_key = tar_keys(shards_root.shards / "00000.tar")[2]
    rows_00000 = StageManifest.load(shards_root, "shards").entries["00000"].samples

    def bad_jpeg(tar):  # one sample's image is not an image
        members = []
        with tarfile.open(tar) as tf:
            for m in tf.getmembers():
                members.append((m, tf.extractfile(m).read()))
        with tarfile.open(tar, "w") as tf:
            for m, data in members:
                if m.name == f"{bad_key}.jpg":
                    data = b"not a jpeg at all"
                    m.size = len(data)
                tf.addfile(m, io.BytesIO(data))

    def garbage_inside(tar):  # same size, headers overwritten: the tar breaks part-way
        data = bytearray(tar.read_bytes())
        data[3000:9000] = b"\xff" * 6000
        tar.write_bytes(bytes(data))

    _rewrite_shard(shards_root, "00000", bad_jpeg)
    _rewrite_shard(shards_root, "00002", garbage_inside)
    # and one shard truncated after stage 1 recorded it
    t1 = shards_root.shards / "00001.tar"
    t1.write_bytes(t1.read_bytes()[:5000])

    capsys.readouterr()
    assert captions(shards_root, "--workers", "0") == 1  # exit status: something was skipped
    err = capsys.readouterr().err
    assert "shard 00001 skipped" in err and "00001.tar" in err
    assert "shard 00002 skipped" in err and "00002.tar" in err
    assert "2 shard(s) skipped (00001, 00002)" in err

    assert sorted(p.name for p in shards_root.captions.glob("*.arrow")) == ["00000.arrow"]
    rows = sidecar_rows(shards_root.captions / "00000.arrow")
    assert len(rows) == rows_00000
    caps, status = rows[bad_key]
    assert caps == [] and status.startswith("cannot decode jpg")
    assert all(s == "ok" and len(c) == 3 for k, (c, s) in rows.items() if k != bad_key)
    m = StageManifest.load(shards_root, "captions")
    assert list(m.entries) == ["00000"]
    assert sum(m.entries["00000"].failed.values()) == 1


def test_budget_is_checked_before_anything_is_written(shards_root, capsys):
    used = StageManifest.load(shards_root, "shards").total_bytes
    write_storage(shards_root, budget_bytes=used + 1000)
    capsys.readouterr()
    assert captions(shards_root, "--workers", "0") == 2
    err = capsys.readouterr().err
    assert "budget" in err and "storage.json" in err and "nothing was written" in err
    assert not list(shards_root.captions.glob("*.arrow"))
    assert not shards_root.manifest_path("captions").exists()


def test_missing_open_clip_names_the_extra(shards_root, capsys):
    capsys.readouterr()
    assert captions(shards_root, "--workers", "0", "--model", "coca:coca_ViT-L-14:mscoco") == 2
    assert "siclip[mobileclip]" in capsys.readouterr().err


def test_unknown_model_folder_is_one_clear_line(shards_root, tmp_path, capsys):
    (tmp_path / "empty-model").mkdir()
    capsys.readouterr()
    assert captions(shards_root, "--workers", "0", "--model", str(tmp_path / "empty-model")) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("siclip captions: error: cannot load captioner") and "empty-model" in err


def test_existing_dask_cluster_through_scheduler_address(shards_root, tmp_path):
    from distributed import LocalCluster

    reference = DataRoot(tmp_path / "reference")
    shutil.copytree(shards_root.root, reference.root)
    assert captions(reference, "--workers", "0") == 0
    with LocalCluster(n_workers=1, threads_per_worker=1, processes=True, host="127.0.0.1",
                      dashboard_address=None) as cluster:
        assert captions(shards_root, "--scheduler", cluster.scheduler_address) == 0
        # the job leaves the cluster as it found it: its model plugin is gone from the workers
        from distributed import Client

        with Client(cluster) as client:
            plugins = client.run(lambda dask_worker: [p for p in dask_worker.plugins if p.startswith("siclip")])
            assert all(v == [] for v in plugins.values())
    assert all_sidecars(shards_root) == all_sidecars(reference)


def test_bad_scheduler_address_is_one_line(shards_root, capsys):
    capsys.readouterr()
    assert captions(shards_root, "--scheduler", "127.0.0.1:8786") == 2
    assert "is not a dask address" in capsys.readouterr().err.strip().splitlines()[-1]


def test_overwrite_with_a_model_that_does_not_load_keeps_every_entry(shards_root, tmp_path, capsys):
    assert captions(shards_root, "--workers", "0") == 0
    listed = StageManifest.load(shards_root, "captions").entries
    sidecars = all_sidecars(shards_root)
    assert len(listed) == len(sidecars) == 3
    broken = tmp_path / "not-a-model"
    broken.mkdir()
    for workers in ("0", "1"):  # the model fails in this process, and on a dask worker
        capsys.readouterr()
        assert captions(shards_root, "--workers", workers, "--model", str(broken), "--overwrite") == 2
        err = capsys.readouterr().err.strip().splitlines()[-1]
        assert err.startswith("siclip captions: error: cannot load captioner") and "not-a-model" in err
        assert StageManifest.load(shards_root, "captions").entries == listed
        assert all_sidecars(shards_root) == sidecars
        assert main(["manifest", str(shards_root.root), "--verify"]) == 0

    # an --overwrite that works replaces every entry and its sidecar
    assert captions(shards_root, "--workers", "0", "--seed", "7", "--overwrite") == 0
    m = StageManifest.load(shards_root, "captions")
    assert sorted(m.entries) == sorted(listed) and all(e.params["seed"] == 7 for e in m.entries.values())
    reseeded = all_sidecars(shards_root)
    assert reseeded.keys() == sidecars.keys() and all(reseeded[k] != sidecars[k] for k in sidecars)
    assert main(["manifest", str(shards_root.root), "--verify"]) == 0
