"""docs/config.md is generated from the config classes (siclip/docs.py) and must match them: CI runs this."""

import dataclasses
from pathlib import Path

import pytest

from siclip import docs
from siclip.config import Field, config
from siclip.manifests.errors import SiclipError

REPO = Path(__file__).resolve().parents[2]


def test_config_reference_is_current():
    page = (REPO / "docs" / "config.md").read_text() if (REPO / "docs" / "config.md").is_file() else ""
    if page != docs.render():
        pytest.fail("docs/config.md differs from the config classes: run make docs", pytrace=False)


def test_every_key_of_every_config_has_a_row():
    page = docs.render()
    sections = docs.sections()
    covered = {s.cls.__name__ for s in sections}
    assert {"ShardsConfig", "CaptionsConfig", "TeacherConfig", "TrainConfig", "StageConfig", "LossWeights",
            "SiCLIPConfig", "ImageTowerConfig", "TextTowerConfig"} <= covered
    for s in sections:
        for f in dataclasses.fields(s.cls):
            if f.name not in s.skip:
                assert f"| `{s.prefix}{f.name}` |" in page, f"{s.cls.__name__}.{f.name} has no row"
    # the nested tables are documented by their own sections, not as opaque keys
    assert "| `stages` |" not in page and "| `stages.N.loss` |" not in page and "| `image` |" not in page


def test_the_shipped_defaults_and_comments_are_what_the_page_says():
    rows = {line.split(" | ")[0][2:]: line for line in docs.render().splitlines() if line.startswith("| `")}
    # pipeline/shards.toml's value, the flag, and the comment beside the key in pipeline/config.py
    assert rows["`reserve`"].startswith('| `reserve` | `str` | `"40%"` | `--reserve` |')
    assert "seconds per download try, wall clock" in rows["`timeout`"]
    assert "(one of: center_crop, border, keep_ratio, keep_ratio_largest, no)" in rows["`resize_mode`"]
    assert rows["`stages.N.loss.fd`"].startswith("| `stages.N.loss.fd` | `float` | `0.0` |")
    # a '|' inside a meaning is escaped, so the row keeps its columns
    assert rows["`stages.N.teacher`"].count(" | ") == 3 and "none \\| sidecar" in rows["`stages.N.teacher`"]


@config
class Base:
    a: int = 1  # the comment on a's line


@config
class Example(Base):
    # the comment lines
    # just above b
    b: str = "x"
    c: list = Field(default_factory=lambda: [1, 2], description="c's --help text")
    d: float = 0.5  # d's comment,
    # not e's: a comment above is read only when the line has none


@config
class Undocumented:
    documented: int = 0  # says what it is
    silent: int = 0


def test_a_meaning_is_the_help_else_the_comment_on_the_line_else_the_lines_above():
    assert docs.field_meanings(Example) == {"a": "the comment on a's line", "b": "the comment lines just above b",
                                            "c": "c's --help text", "d": "d's comment,"}


def test_a_key_without_a_meaning_is_an_error_naming_it():
    with pytest.raises(SiclipError, match=r"Undocumented\.silent has no meaning to document: add a '# \.\.\.' "
                                          r"comment on its line in .*test_docs\.py"):
        docs.field_meanings(Undocumented)
    assert docs.field_meanings(Undocumented, skip=("silent",)) == {"documented": "says what it is"}


def test_a_default_file_overrides_the_built_in_default(tmp_path):
    toml = tmp_path / "example.toml"
    toml.write_text('b = "from the file"\n')
    rows = docs.table(docs.Section("t", "", Example, prefix="p.", defaults_file=toml))
    assert rows[2] == "| `p.a` | `int` | `1` | the comment on a's line |"
    assert rows[3] == '| `p.b` | `str` | `"from the file"` | the comment lines just above b |'
    assert rows[4] == "| `p.c` | `list` | `[1, 2]` | c's --help text |"


def test_check_says_run_make_docs_and_writes_nothing_when_the_page_is_stale(tmp_path, capsys):
    page = tmp_path / "config.md"
    page.write_text("stale\n")
    assert docs.main(["--check", "--out", str(page)]) == 1
    assert page.read_text() == "stale\n"
    assert "out of date: run make docs" in capsys.readouterr().err
    assert docs.main(["--out", str(page)]) == 0
    assert page.read_text() == docs.render()
    assert docs.main(["--check", "--out", str(page)]) == 0
