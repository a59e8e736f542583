"""A data root's manifests cannot point outside it: a path that goes up with '..', an absolute path,
or a link out of the root is refused by `siclip manifest --verify`, by a rerun and by the cleanups,
and nothing outside the root is read into a result, changed or deleted."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from siclip_testing import SMALL, siclip, write_list

from siclip.manifests.errors import SiclipError
from siclip.manifests.layout import DataRoot
from siclip.manifests.manifest import StageManifest


def tree_state(folder: Path) -> dict[str, tuple[int, int]]:
    """{relative path: (size, mtime)} of every file and link under `folder`, links not followed."""
    out = {}
    for p in sorted(folder.rglob("*")):
        st = p.lstat()
        out[str(p.relative_to(folder))] = (st.st_size, st.st_mtime_ns)
    return out


@pytest.fixture
def outside(shards_root, tmp_path):
    """A folder beside the data root holding a copy of shard 00001's tar: the file a crafted
    manifest points at, with the size and sha256 the manifest records."""
    folder = tmp_path / "outside"
    folder.mkdir()
    shutil.copy2(shards_root.shards / "00001.tar", folder / "00001.tar")
    return folder


def _point_entry_at(root: DataRoot, rel: str) -> None:
    path = root.manifest_path("shards")
    d = json.loads(path.read_text())
    files = d["entries"]["00001"]["files"]
    files[rel] = files.pop("shards/00001.tar")
    path.write_text(json.dumps(d, indent=1))


def _refused_everywhere(root: DataRoot, outside: Path, good_rows, tmp_path, says: str) -> None:
    """`siclip manifest --verify` and a rerun of `siclip shards` both stop with one line that says
    `says`, and neither the data root nor the folder outside it changes."""
    before_root, before_out = tree_state(root.root), tree_state(outside)
    manifest = root.manifest_path("shards").read_bytes()
    res = siclip("manifest", root.root, "--verify", check=False)
    assert res.returncode == 2, res.stderr
    assert res.stderr.strip().splitlines()[-1].startswith("siclip manifest: error: ") and says in res.stderr
    urls = write_list(tmp_path / "urls.parquet", good_rows)
    res = siclip("shards", "--urls", urls, "--data", root.root, *SMALL, check=False)
    assert res.returncode == 2, res.stderr
    assert res.stderr.strip().splitlines()[-1].startswith("siclip shards: error: ") and says in res.stderr
    assert root.manifest_path("shards").read_bytes() == manifest
    assert tree_state(outside) == before_out
    after = tree_state(root.root)
    assert {k: v for k, v in after.items() if not k.startswith("manifests/.")} == \
        {k: v for k, v in before_root.items() if not k.startswith("manifests/.")}  # the stage lock aside


@pytest.mark.parametrize("how", ["dotdot", "absolute"])
def test_a_manifest_path_outside_the_root_is_refused_by_verify_and_rerun(shards_root, outside, good_rows, tmp_path,
                                                                         how):
    rel = "../outside/00001.tar" if how == "dotdot" else str(outside / "00001.tar")
    _point_entry_at(shards_root, rel)
    says = {"dotdot": f"file {rel!r} goes up with '..'", "absolute": f"file {rel!r} is absolute"}[how]
    _refused_everywhere(shards_root, outside, good_rows, tmp_path, f"entry '00001': {says}")


def test_a_link_out_of_the_root_is_refused_by_verify_and_rerun(shards_root, outside, good_rows, tmp_path):
    tar = shards_root.shards / "00001.tar"
    tar.unlink()
    tar.symlink_to(outside / "00001.tar")
    _refused_everywhere(shards_root, outside, good_rows, tmp_path,
                        f"{tar} leads to {outside / '00001.tar'}, outside the data root")


def test_a_rerun_never_cleans_through_a_planted_link(shards_root, good_rows, tmp_path):
    """Staging is emptied on every start: a `work` folder linked elsewhere must not make it delete there."""
    elsewhere = tmp_path / "elsewhere"
    (elsewhere / "shards" / "staging").mkdir(parents=True)
    (elsewhere / "shards" / "staging" / "precious.txt").write_text("keep me")
    shutil.rmtree(shards_root.work, ignore_errors=True)
    shards_root.work.symlink_to(elsewhere)
    urls = write_list(tmp_path / "urls.parquet", good_rows)
    res = siclip("shards", "--urls", urls, "--data", shards_root.root, *SMALL, check=False)
    assert res.returncode == 2
    assert "outside the data root" in res.stderr.strip().splitlines()[-1]
    assert (elsewhere / "shards" / "staging" / "precious.txt").read_text() == "keep me"


def test_captions_never_clean_temps_through_a_planted_link(shards_root, tmp_path):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    temp = elsewhere / ".00000.arrow.tmp-123"  # the name of a temp file a killed run leaves
    temp.write_text("not siclip's")
    shards_root.captions.symlink_to(elsewhere)
    res = siclip("captions", "--data", shards_root.root, "--model", "tiny", "--workers", "0", check=False)
    assert res.returncode == 2
    assert "outside the data root" in res.stderr.strip().splitlines()[-1]
    assert temp.read_text() == "not siclip's"


@pytest.mark.parametrize("stage, unit, files, says", [
    ("shards", "../../etc", {"shards/00000.tar": {"bytes": 1, "sha256": "0" * 64}}, "the unit name is not a shard name"),
    ("captions", "00000", {"/etc/passwd": {"bytes": 1, "sha256": "0" * 64}}, "file '/etc/passwd' is absolute"),
    ("train", "runs/../../x", {"runs/x/state.json": {"bytes": 1, "sha256": "0" * 64}},
     "the unit name goes up with '..'"),
    ("teacher", "00000", {"teacher/00000.arrow": {"bytes": "1"}},
     "field files['teacher/00000.arrow'].bytes: Input should be a valid integer"),
])
def test_loading_a_manifest_refuses_entries_that_leave_the_root(tmp_path, stage, unit, files, says):
    root = DataRoot(tmp_path / "data")
    root.manifests.mkdir(parents=True)
    path = root.manifest_path(stage)
    path.write_text(json.dumps({"stage": stage, "schema_version": 1, "entries": {unit: {"files": files, "samples": 1}}}))
    with pytest.raises(SiclipError) as e:
        StageManifest.load(root, stage)
    assert str(e.value).startswith(f"{path}: entry {unit!r}: ") and says in str(e.value)


def test_inside_follows_links_and_abs_refuses_paths_that_leave(tmp_path):
    root = DataRoot(tmp_path / "data")
    (root.root / "shards").mkdir(parents=True)
    (root.root / "shards" / "in.tar").write_bytes(b"x")
    (root.root / "shards" / "link-in.tar").symlink_to(root.root / "shards" / "in.tar")
    (root.root / "shards" / "link-out.tar").symlink_to(tmp_path)
    assert root.abs("shards/link-in.tar") == root.root / "shards" / "link-in.tar"
    for rel in ("shards/link-out.tar", "../x", "shards/../../x", str(tmp_path / "x"), ""):
        with pytest.raises(SiclipError):
            root.abs(rel)


@pytest.mark.parametrize("version", [None, 0, 2, "1"])
def test_a_manifest_of_another_schema_version_is_refused_in_one_line(tmp_path, version):
    root = DataRoot(tmp_path / "data")
    root.manifests.mkdir(parents=True)
    path = root.manifest_path("captions")
    body = {"stage": "captions", "entries": {}, **({} if version is None else {"schema_version": version})}
    path.write_text(json.dumps(body))
    with pytest.raises(SiclipError) as e:
        StageManifest.load(root, "captions")
    assert str(e.value).startswith(f"{path}: manifest schema version {version!r}, this siclip reads version 1")
    assert "\n" not in str(e.value)
    StageManifest("captions").save(root)  # what this siclip writes, it reads
    assert StageManifest.load(root, "captions").entries == {}
