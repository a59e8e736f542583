"""The config layer (siclip/config.py): a config is a declaration; `resolve` fills it from defaults < TOML file <
--set (dotted keys reach [[tables]] and their tables) < flags, and every mistake is one line naming the key and where
it came from, an unknown key with the valid ones and the likeliest."""

from __future__ import annotations

import dataclasses
import json
from typing import Literal

import pytest
from pydantic import model_validator

from siclip.config import Field, bounded, build, config, from_text, resolve, to_toml, tomllib
from siclip.manifests.errors import SiclipError


@pytest.mark.parametrize("value, typ, expected", [
    ("none", int | None, None), ("NULL", float | None, None), ("5", int | None, 5),
    ("yes", bool, True), ("ON", bool, True), ("no", bool, False), ("Off", bool, False), ("true", bool, True),
    ("3", float, 3), ("2.5", float, 2.5), ("[1, 2]", list[int], [1, 2]), ("abc", str, "abc"), ("none", str, "none"),
    ("sasp", str | list[str], "sasp"), ("['sasp']", str | list[str], ["sasp"]), ("a,b", list[str], "a,b"),
])
def test_command_line_strings_become_the_values_they_spell_for_the_fields_type(value, typ, expected):
    got = from_text(value, typ)
    assert got == expected and type(got) is type(expected)


@config
class Loss:
    """A nested table."""

    web: float = bounded(1.0, ge=0)  # a weight
    pm: float = 0.0  # another


@config
class Stage:
    name: str = "stage"  # its name
    steps: int = bounded(0, ge=0)  # how long
    kind: Literal["cosine", "constant"] = "cosine"  # a choice
    loss: Loss = Field(default_factory=Loss)  # a nested table


@config
class Run:
    batch_size: int = bounded(8, ge=1)  # a count
    fit: bool = False  # a switch
    size: int | None = None  # optional
    timeout: float = bounded(10.0, gt=0, unit="seconds")  # with a unit
    workers: int = bounded(0, ge=0, zero="in this process")  # 0 means something
    top_p: float = bounded(0.5, gt=0, le=1)  # a range
    stages: list[Stage] = Field(default_factory=list)  # [[stages]]

    @model_validator(mode="after")
    def _names_differ(self) -> "Run":
        names = [s.name for s in self.stages]
        if len(set(names)) != len(names):
            raise ValueError(f"stage names must differ, got {names}")
        return self


@pytest.mark.parametrize("value, typ", [("none", int), ("maybe", bool), ("true", int), ("1", bool), ("x", float),
                                        ("7", list[int]), ("2.5", int)])
def test_strings_that_are_not_of_the_fields_type_are_one_line_errors_naming_key_and_place(value, typ):
    One = config(dataclasses.make_dataclass("One", [("batch_size", typ, None)]))
    with pytest.raises(SiclipError) as e:
        resolve(One, None, [f"batch_size={value}"])
    assert str(e.value).startswith(f"--set batch_size={value}: batch_size = ") and "is not a valid" in str(e.value)


RUN = """batch_size = 4
[[stages]]
name = "a"
steps = 2
[stages.loss]
pm = 0.5

[[stages]]
name = "b"
steps = 3
"""


def test_dotted_sets_reach_the_stages_and_their_tables(tmp_path):
    f = tmp_path / "run.toml"
    f.write_text(RUN)
    run = resolve(Run, f, ["stages.1.steps=5", "stages.0.loss.pm=0.1", "stages.1.kind=constant", "size=none"])
    assert [(s.name, s.steps, s.kind, s.loss.pm) for s in run.stages] == [("a", 2, "cosine", 0.1),
                                                                           ("b", 5, "constant", 0.0)]
    assert run.size is None and isinstance(run.stages[0].loss, Loss)


@pytest.mark.parametrize("sets, says", [
    (["stages.0.stpes=3"], "--set stages.0.stpes=3: stages.0: unknown key 'stpes' (did you mean 'steps'?); "
                           "valid keys: name, steps, kind, loss"),
    (["stages.1.loss.pmm=3"], "--set stages.1.loss.pmm=3: stages.1.loss: unknown key 'pmm' (did you mean 'pm'?); "
                             "valid keys: web, pm"),
    (["stages.2.steps=3"], "--set stages.2.steps=3: stages has 2 entries; no index '2'"),
    (["stages.1.steps=many"], "--set stages.1.steps=many: stages.1.steps = 'many' is not a valid int"),
    (["stages.0.steps=-1"], "{f}: stages.0.steps must be 0 or more, got -1"),
    (["stages.0.loss.web=-1"], "{f}: stages.0.loss.web must be 0 or more, got -1.0"),
    (["stages.0.kind=linear"], "{f}: stages.0.kind 'linear' is not cosine or constant"),
    (["stages.1.name=a"], "{f}: stage names must differ, got ['a', 'a']"),
    (["timeout=0"], "{f}: timeout must be more than 0 seconds, got 0.0"),
    (["workers=-1"], "{f}: workers must be 0 (in this process) or more, got -1"),
    (["top_p=1.5"], "{f}: top_p must be in (0, 1], got 1.5"),
    (["batch_size=0"], "{f}: batch_size must be at least 1, got 0"),
    (["fit=1"], "--set fit=1: fit = 1 is not a valid bool"),
])
def test_every_mistake_is_one_line_naming_the_key_and_where(tmp_path, sets, says):
    f = tmp_path / "run.toml"
    f.write_text(RUN)
    with pytest.raises(SiclipError) as e:
        resolve(Run, f, sets, where=str(f))
    assert str(e.value) == says.format(f=f)


def test_a_mistake_in_the_file_names_the_file(tmp_path):
    f = tmp_path / "run.toml"
    f.write_text(RUN + "[stages.loss]\nclip = 1.0\n")
    with pytest.raises(SiclipError, match=rf"^{f}: stages.1.loss: unknown key 'clip'; valid keys: web, pm$"):
        resolve(Run, f)
    f.write_text("batch_size = [")
    with pytest.raises(SiclipError, match=rf"^{f}: not valid TOML"):
        resolve(Run, f)
    with pytest.raises(SiclipError, match=r"^config file /no/such.toml does not exist$"):
        resolve(Run, "/no/such.toml")


def test_a_config_round_trips_through_toml_and_json(tmp_path):
    f = tmp_path / "run.toml"
    f.write_text(RUN)
    run = resolve(Run, f, ["stages.0.loss.web=2"])
    assert resolve(Run, tomllib.loads(to_toml(run))) == run
    assert resolve(Run, json.loads(json.dumps(dataclasses.asdict(run)))) == run
    assert to_toml(run).splitlines()[:3] == ["batch_size = 4", "fit = false", "# size = (unset)"]
    assert "[[stages]]\nname = \"a\"" in to_toml(run) and "[stages.loss]\nweb = 2.0" in to_toml(run)


def test_a_table_where_a_value_belongs_and_a_value_where_a_table_belongs_are_refused():
    with pytest.raises(SiclipError, match=r"^config: stages must be a list of \[\[stages\]\] tables$"):
        build(Run, {"stages": 3})
    with pytest.raises(SiclipError, match=r"^config: stages.0.loss: expected a table, got 1$"):
        build(Run, {"stages": [{"loss": 1}]})


def test_command_line_text_is_typed_by_its_field_and_a_files_values_are_taken_as_typed(tmp_path):
    f = tmp_path / "run.toml"
    f.write_text('batch_size = "4"\n')
    with pytest.raises(SiclipError, match=rf"^{f}: batch_size = '4' is not a valid int$"):
        resolve(Run, f)
    run = resolve(Run, None, ["batch_size=4"], {"fit": "on"})
    assert (run.batch_size, run.fit) == (4, True)
    assert resolve(Run, {"stages": [{"name": "7"}]}, ["stages.0.name=8"]).stages[0].name == "8"  # text stays text
