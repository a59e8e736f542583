"""A data root damaged in place: `--verify` names the files, the readers refuse them, and
`siclip manifest DATA --verify --repair` plus each stage's rerun bring the root back to whole,
redoing only what was damaged and what was made from it."""

from __future__ import annotations

import tarfile

import pytest
from siclip_testing import SMALL, siclip, write_list

from siclip.cli import main
from siclip.manifests.io import sha256_file
from siclip.manifests.layout import DataRoot
from siclip.manifests.manifest import StageManifest
from siclip.manifests.samples import CorruptShardError, iter_samples, read_sidecar

STAGE2 = ["--workers", "0"]


def overwrite(path, offset: int, n: int = 50) -> None:
    """Overwrite n bytes in place: same size, so only a hash can tell."""
    with open(path, "r+b") as f:
        f.seek(offset)
        old = f.read(n)
        f.seek(offset)
        f.write(bytes(b ^ 0x5A for b in old))


def caption_offset(path) -> int:
    """Where the first caption's text lies in a captions sidecar: a data buffer, which Arrow reads
    back without complaint whatever it holds."""
    table, _ = read_sidecar(path)
    text = table.column("captions")[0].as_py()[0].encode()
    return path.read_bytes().index(text)


def image_offset(tar_path) -> int:
    """Where the second image's bytes lie in a shard tar (not a header: the tar still reads)."""
    with tarfile.open(tar_path) as tar:
        return [m for m in tar if m.name.endswith(".jpg")][1].offset_data + 100


def files_state(root: DataRoot) -> dict[str, tuple[int, str]]:
    """{relative path: (mtime, sha256)} of every shard, sidecar and manifest-listed file."""
    out = {}
    for folder in (root.shards, root.captions, root.teacher):
        for p in sorted(folder.glob("0*")):
            out[root.rel(p)] = (p.stat().st_mtime_ns, sha256_file(p))
    return out


@pytest.fixture
def whole_root(shards_root):
    """Shards, captions and teacher sidecars of the three shards, all whole."""
    assert main(["captions", "--data", str(shards_root.root), "--model", "tiny", "--max-new-tokens", "12", *STAGE2]) == 0
    assert main(["teacher", "--data", str(shards_root.root), "--teacher", "tiny", *STAGE2]) == 0
    return shards_root


def test_damage_in_place_is_found_refused_and_repaired_redoing_only_what_it_touched(whole_root, good_rows, tmp_path,
                                                                                     capsys):
    root = whole_root
    data = root.root
    before = files_state(root)
    sidecar, tar = root.captions / "00001.arrow", root.shards / "00002.tar"
    overwrite(sidecar, caption_offset(sidecar))
    overwrite(tar, image_offset(tar))
    assert read_sidecar(sidecar)[0].num_rows == 8  # still a readable sidecar: the damage is silent to Arrow

    res = siclip("manifest", data, "--verify", check=False)
    assert res.returncode == 1
    bad = [line for line in res.stderr.splitlines() if "sha256 mismatch" in line]
    assert bad == [f"verify: shards: {tar}: sha256 mismatch", f"verify: captions: {sidecar}: sha256 mismatch"]

    # the readers refuse the damaged files before handing out a sample, naming them and the repair
    with pytest.raises(CorruptShardError, match=f"captions sidecar {sidecar} changed since its manifest recorded it"):
        next(iter_samples(data, "00001", ("captions",)))
    with pytest.raises(CorruptShardError, match=rf"shard {tar} changed since .*--verify --repair"):
        next(iter_samples(data, "00002", ()))
    assert len(list(iter_samples(data, "00000", ("captions", "teacher")))) == 8

    res = siclip("manifest", data, "--verify", "--repair", check=False)
    assert res.returncode == 0, res.stderr
    repaired = [line for line in res.stderr.splitlines() if line.startswith("repair: ")]
    assert repaired[0].startswith("repair: shards 00002: dropped (shards/00002.tar: sha256 mismatch); deleted "
                                  "shards/00002.parquet, shards/00002.tar, shards/00002_stats.json; siclip shards")
    assert repaired[1].startswith("repair: captions 00001: dropped (captions/00001.arrow: sha256 mismatch); "
                                  "deleted captions/00001.arrow; siclip captions makes it again")
    assert repaired[2].startswith("repair: 2 unit(s) dropped (shards 1, captions 1)")
    assert not tar.exists() and not sidecar.exists()
    assert "00002" not in StageManifest.load(root, "shards").entries
    assert siclip("manifest", data, "--verify").returncode == 0  # what is listed now is whole

    # the stages' reruns, in order: each redoes what was dropped, and what was made from it
    siclip("shards", "--urls", write_list(tmp_path / "urls.parquet", good_rows), "--data", data, *SMALL)
    capsys.readouterr()
    assert main(["captions", "--data", str(data), "--model", "tiny", "--max-new-tokens", "12", *STAGE2]) == 0
    assert "1 done already, 2 to do" in capsys.readouterr().err  # 00001 (dropped) and 00002 (its shard redone)
    assert main(["teacher", "--data", str(data), "--teacher", "tiny", *STAGE2]) == 0
    after = files_state(root)
    assert siclip("manifest", data, "--verify").returncode == 0
    for stage in ("captions", "teacher"):  # each sidecar records the files it was made from, as they are now
        for name, entry in StageManifest.load(root, stage).entries.items():
            assert entry.inputs["shards/" + name + ".tar"] == sha256_file(root.shards / f"{name}.tar")

    # nothing else was redone: shard 00000 and its sidecars, shard 00001, and 00001's teacher sidecar, whose
    # input came back byte for byte (captions are seeded by key)
    same = [rel for rel in before if after[rel] == before[rel]]
    assert sorted(same) == ["captions/00000.arrow", "shards/00000.parquet", "shards/00000.tar",
                            "shards/00000_stats.json", "shards/00001.parquet", "shards/00001.tar",
                            "shards/00001_stats.json", "teacher/00000.arrow", "teacher/00001.arrow"]
    assert after["captions/00001.arrow"][1] == before["captions/00001.arrow"][1]  # made again, the same
    assert after["captions/00002.arrow"][0] != before["captions/00002.arrow"][0]  # made again from the new tar
    assert after["teacher/00002.arrow"][0] != before["teacher/00002.arrow"][0]
    for name in ("00000", "00001", "00002"):
        assert len(list(iter_samples(data, name, ("captions", "teacher")))) == 8


def test_stage_2_refuses_a_shard_changed_in_place_and_goes_on_with_the_others(shards_root, capsys):
    tar = shards_root.shards / "00001.tar"
    overwrite(tar, image_offset(tar))
    capsys.readouterr()
    assert main(["captions", "--data", str(shards_root.root), "--model", "tiny", "--max-new-tokens", "12", *STAGE2]) == 1
    err = capsys.readouterr().err
    assert f"captions: shard 00001 skipped: shard {tar} changed since its manifest recorded it (sha256 differs; " \
           "siclip manifest DATA --verify --repair drops it" in err
    assert sorted(StageManifest.load(shards_root, "captions").entries) == ["00000", "00002"]


def test_training_refuses_a_sidecar_made_from_a_shard_since_redone(whole_root):
    from siclip.training.data import all_shards, check_sidecars

    root = whole_root
    shards = StageManifest.load(root, "shards")
    # stage 1 redid shard 00001 (as after a repair): its tar is another file now
    tar = root.shards / "00001.tar"
    overwrite(tar, image_offset(tar))
    shards.add(root, "00001", [tar, root.shards / "00001.parquet", root.shards / "00001_stats.json"], samples=8,
                rows=8, failures={})
    shards.save(root)
    with pytest.raises(Exception, match="the captions sidecar of shard 00001 was made from another shards/00001.tar "
                                        "than the one there now"):
        check_sidecars(root, "captions", all_shards(root), "clip_synthetic > 0")


def test_a_sidecar_not_listed_in_its_manifest_is_not_read(whole_root):
    m = StageManifest.load(whole_root, "teacher")
    del m.entries["00001"]
    m.save(whole_root)
    with pytest.raises(Exception, match=r"teacher sidecar .*00001.arrow is not listed in .*teacher.json"):
        next(iter_samples(whole_root, "00001", ("captions", "teacher")))


def test_repair_deletes_a_damaged_checkpoint_folder_so_resume_goes_back_to_the_one_before(shards_root, capsys):
    """A train unit is a checkpoint folder: dropping only its entry would have the next run record it again."""
    root = shards_root
    m = StageManifest.load(root, "train")
    for step in (10, 20):
        folder = root.runs / "r" / "checkpoints" / f"step-{step:06d}"
        folder.mkdir(parents=True)
        (folder / "model.safetensors").write_bytes(bytes(range(256)) * 4)
        (folder / "state.json").write_text('{"step": %d}' % step)
        m.add(root, root.rel(folder), sorted(folder.iterdir()), samples=0, kind="checkpoint")
    m.save(root)
    overwrite(root.runs / "r" / "checkpoints" / "step-000020" / "model.safetensors", 300)
    capsys.readouterr()
    assert main(["manifest", str(root.root), "--verify", "--repair"]) == 0
    err = capsys.readouterr().err
    assert "repair: train runs/r/checkpoints/step-000020: dropped" in err and "--resume goes on" in err
    assert sorted(p.name for p in (root.runs / "r" / "checkpoints").iterdir()) == ["step-000010"]
    assert sorted(StageManifest.load(root, "train").entries) == ["runs/r/checkpoints/step-000010"]


def test_repair_needs_verify(shards_root, capsys):
    assert main(["manifest", str(shards_root.root), "--repair"]) == 2
    assert "--repair drops what --verify finds damaged: pass both" in capsys.readouterr().err
