"""The captions and teacher configs refuse every bad value before anything runs, in one line naming it."""

from __future__ import annotations

import pytest

from siclip.captioning.config import CAPTIONS_TOML, TEACHER_TOML, CaptionsConfig, TeacherConfig
from siclip.cli import main
from siclip.config import resolve
from siclip.manifests.errors import SiclipError

COMMON = [
    ("batch_size=0", "batch_size must be at least 1, got 0"),
    ("workers=-1", "workers must be 0 or more, got -1"),
    ("threads_per_worker=-2", "threads_per_worker must be 0 (the cores shared out) or more, got -2"),
    ("scheduler=127.0.0.1:8786", "--scheduler '127.0.0.1:8786' is not a dask address such as tcp://HOST:8786"),
]
CAPTIONS = COMMON + [
    ("num_captions=0", "num_captions must be at least 1, got 0"),
    ("top_p=0", "top_p must be in (0, 1], got 0.0"),
    ("top_p=1.5", "top_p must be in (0, 1], got 1.5"),
    ("temperature=0", "temperature must be positive, got 0.0"),
    ("max_new_tokens=0", "max_new_tokens must be at least 1, got 0"),
    ("dtype=float8", "dtype 'float8' is not one of auto, float32, bfloat16, float16"),
]
TEACHER = COMMON + [
    ("teacher= , ", "--teacher needs at least one model"),
    ("augmentations=-1", "augmentations must be 0 or more, got -1"),
    ("dtype=float32", "dtype 'float32' is not float16 or bfloat16"),
    ("crop_scale=[0, 1]", "crop_scale [0, 1] must be two fractions 0 < lo <= hi <= 1"),
    ("crop_scale=[0.8, 0.5]", "crop_scale [0.8, 0.5] must be two fractions 0 < lo <= hi <= 1"),
    ("crop_scale=[0.5, 1.5]", "crop_scale [0.5, 1.5] must be two fractions 0 < lo <= hi <= 1"),
    ("crop_scale=[0.5]", "crop_scale [0.5] must be two fractions 0 < lo <= hi <= 1"),
    ("crop_scale=['a', 'b']", "crop_scale ['a', 'b'] must be two fractions 0 < lo <= hi <= 1"),
]


def _refused(cls, toml, where: str, item: str, says: str) -> None:
    with pytest.raises(SiclipError) as e:
        resolve(cls, toml, [item], {"data": "DATA"})
    assert str(e.value) == f"{where}: {says}"


@pytest.mark.parametrize("item, says", CAPTIONS)
def test_every_captions_refusal(item, says):
    _refused(CaptionsConfig, CAPTIONS_TOML, "siclip captions", item, says)


@pytest.mark.parametrize("item, says", TEACHER)
def test_every_teacher_refusal(item, says):
    _refused(TeacherConfig, TEACHER_TOML, "siclip teacher", item, says)


@pytest.mark.parametrize("cls, toml, where", [(CaptionsConfig, CAPTIONS_TOML, "siclip captions"),
                                              (TeacherConfig, TEACHER_TOML, "siclip teacher")])
def test_data_is_required(cls, toml, where):
    with pytest.raises(SiclipError, match=f"^{where}: --data DATA is required$"):
        resolve(cls, toml, [], {})


def test_the_defaults_pass():
    assert resolve(CaptionsConfig, CAPTIONS_TOML, [], {"data": "D"}).num_captions == 3
    assert resolve(TeacherConfig, TEACHER_TOML, [], {"data": "D"}).teachers() == ["openai/clip-vit-large-patch14"]


def test_a_refusal_from_the_command_line_is_one_line_and_writes_nothing(shards_root, capsys):
    before = sorted(p.relative_to(shards_root.root) for p in shards_root.root.rglob("*"))
    capsys.readouterr()
    assert main(["teacher", "--data", str(shards_root.root), "--teacher", "tiny", "--set", "crop_scale=[0.9, 0.1]"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["siclip teacher: error: siclip teacher: crop_scale [0.9, 0.1] must be two fractions 0 < lo <= hi <= 1"]
    assert sorted(p.relative_to(shards_root.root) for p in shards_root.root.rglob("*")) == before
