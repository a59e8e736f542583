"""A manifest's entries are typed: what this release writes reads back into them and is written again byte
for byte, and a field they do not know, one they need that is missing, or one of another type, is refused in
one line naming the file and the entry. Nothing older than this release is read: no shim guesses at it."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from siclip.manifests.errors import SiclipError
from siclip.manifests.layout import DataRoot
from siclip.manifests.manifest import (CheckpointEntry, FileRecord, PlanRecord, RetryRecord, ShardEntry, SidecarEntry,
                                       StageManifest)

# The manifests of two data roots that this release (0.1.0, before typed entries) wrote: one downloaded with a
# failing row and --retry-failed, captioned, embedded by a teacher, trained with checkpoints and exported; one
# adopted from that root's tars.
RELEASE = Path(__file__).parent / "release"
STAGE_OF = {"shards.json": "shards", "adopted-shards.json": "shards", "captions.json": "captions",
            "teacher.json": "teacher", "train.json": "train"}


def _root_with(tmp_path, name: str, body: dict | None = None) -> tuple[DataRoot, Path]:
    root = DataRoot(tmp_path / "data")
    root.manifests.mkdir(parents=True, exist_ok=True)
    path = root.manifest_path(STAGE_OF[name])
    if body is None:
        shutil.copyfile(RELEASE / name, path)
    else:
        path.write_text(json.dumps(body, indent=1, sort_keys=True) + "\n")
    return root, path


def _release(name: str) -> dict:
    return json.loads((RELEASE / name).read_text())


@pytest.mark.parametrize("name", sorted(STAGE_OF))
def test_a_manifest_this_release_wrote_reads_into_typed_entries_and_saves_byte_for_byte(tmp_path, name):
    root, path = _root_with(tmp_path, name)
    m = StageManifest.load(root, STAGE_OF[name])
    kind = {"shards": ShardEntry, "captions": SidecarEntry, "teacher": SidecarEntry, "train": CheckpointEntry}
    assert m.entries and all(type(e) is kind[m.stage] for e in m.entries.values())
    assert all(isinstance(r, FileRecord) for e in m.entries.values() for r in e.files.values())
    m.save(root)
    assert path.read_bytes() == (RELEASE / name).read_bytes()


def test_the_typed_records_hold_what_stage_1_and_its_retries_wrote(tmp_path):
    root, _ = _root_with(tmp_path, "shards.json")
    m = StageManifest.load(root, "shards")
    assert isinstance(m.info.plan, PlanRecord) and m.info.plan.shards == 2 and m.info.plan.fitted.dump() == {}
    assert isinstance(m.info.retry, RetryRecord) and m.info.retry.harvested == ["00000", "00001"]
    assert "http_5xx" in m.info.retry.reasons["00000"] and m.info.retry.shards == {"00002": 1}
    assert m.entries["00000"].seconds is not None and m.entries["00000"].source is None and m.info.adopt is None
    adopted = StageManifest.load(_root_with(tmp_path / "a", "adopted-shards.json")[0], "shards")
    assert adopted.info.plan is None and all(e.source and e.seconds is None for e in adopted.entries.values())


def _refused(tmp_path, name: str, body: dict) -> str:
    root, path = _root_with(tmp_path, name, body)
    with pytest.raises(SiclipError) as e:
        StageManifest.load(root, STAGE_OF[name])
    message = str(e.value)
    assert "\n" not in message and message.startswith(f"{path}: ")
    return message.removeprefix(f"{path}: ")


@pytest.mark.parametrize("name, unit, change, says", [
    ("shards.json", "00001", lambda e: e.pop("rows"), "field rows: missing"),
    ("shards.json", "00000", lambda e: e.update(retried=True), "field retried: unknown"),
    ("adopted-shards.json", "00002", lambda e: e.update(samples="4"), "field samples: Input should be a valid integer"),
    # a sidecar entry without the sha256 of what it was made from: entries before inputs were recorded
    ("captions.json", "00001", lambda e: e.pop("inputs"), "field inputs: missing"),
    ("teacher.json", "00000", lambda e: e["files"]["teacher/00000.arrow"].pop("sha256"),
     "field files['teacher/00000.arrow'].sha256: missing"),
    ("train.json", "runs/r/final", lambda e: e.update(kind="best"), "field kind: Input should be 'checkpoint', "),
])
def test_an_entry_with_a_field_unknown_missing_or_mistyped_is_refused_in_one_line(tmp_path, name, unit, change,
                                                                                  says):
    body = _release(name)
    change(body["entries"][unit])
    message = _refused(tmp_path, name, body)
    assert message.startswith(f"entry {unit!r}: {says}"), message
    assert message.endswith("restore the manifest, or delete it and rerun the stage to rebuild")


@pytest.mark.parametrize("change, says", [
    # a retry record from before the reasons each harvested shard retried were recorded
    (lambda d: d["info"]["retry"].pop("reasons"), "field info.retry: harvested shard '00000' has no recorded reasons"),
    (lambda d: d["info"]["retry"]["shards"].update({"../x": 3}), "field info.retry: retry shard '../x' is not a shard"),
    (lambda d: d["info"]["plan"].pop("list_sha256"), "field info.plan.list_sha256: missing"),
    (lambda d: d["info"]["plan"]["fitted"].update(threads=4), "field info.plan.fitted.threads: unknown"),
    (lambda d: d["info"].update(pilot={}), "field info.pilot: unknown"),
    (lambda d: d.pop("params"), "field params: missing"),
])
def test_a_plan_or_retry_record_or_a_manifest_not_as_this_release_writes_it_is_refused(tmp_path, change, says):
    body = _release("shards.json")
    change(body)
    assert _refused(tmp_path, "shards.json", body).startswith(says)


def test_an_empty_retry_record_as_the_release_writes_it_before_any_harvest_reads_and_saves_unchanged(tmp_path):
    body = _release("shards.json")
    body["info"]["retry"] = {"harvested": [], "shards": {}}
    root, path = _root_with(tmp_path, "shards.json", body)
    m = StageManifest.load(root, "shards")
    assert m.info.retry.reasons == {}
    m.save(root)
    assert json.loads(path.read_text())["info"]["retry"] == {"harvested": [], "reasons": {}, "shards": {}}
