"""`siclip eval --templates FILE`: a file that is missing, unreadable, empty, or holds a prompt that does not take the
class name is one line naming the file, exit 2; a good one gives the prompts."""

from __future__ import annotations

import pytest
from siclip_testing import siclip

from siclip.manifests.errors import SiclipError
from siclip.training.evaluate import TEMPLATES, read_templates
from siclip.training.model import build_model


def test_a_missing_templates_file_is_one_line_naming_it_and_exit_2(tmp_path):
    folder = tmp_path / "classes"
    for name in ("red", "blue"):
        (folder / name).mkdir(parents=True)
    build_model("tiny").save_pretrained(tmp_path / "run" / "final")
    missing = tmp_path / "missing.txt"
    res = siclip("eval", "--run", tmp_path / "run", "--imagefolder", folder, "--templates", missing, check=False)
    assert res.returncode == 2 and "Traceback" not in res.stderr
    assert res.stderr.strip().splitlines()[-1] == f"siclip eval: error: templates {missing}: no such file, nor a shipped set (openai, simple)"


@pytest.mark.parametrize("content, says", [
    (b"", "(it has no prompt)"),
    (b"# only a comment\n\n", "(it has no prompt)"),
    (b"a photo of a {}.\na photo of a cat.\n", "(not so: 'a photo of a cat.')"),
    (b"a {} of {size}\n", "(not so: 'a {} of {size}')"),
    (b"a {} next to a {}\n", "(not so: 'a {} next to a {}')"),
    (b"a {} in braces }\n", "(not so: 'a {} in braces }')"),
])
def test_a_templates_file_without_one_class_placeholder_per_prompt_is_one_line(tmp_path, content, says):
    path = tmp_path / "templates.txt"
    path.write_bytes(content)
    with pytest.raises(SiclipError) as e:
        read_templates(path)
    assert str(e.value) == (f"templates {path}: one prompt per line, each with {{}} for the class name and no other "
                            f"braces {says}")


@pytest.mark.parametrize("make, says", [
    (lambda p: p.mkdir(), "cannot read it (Is a directory)"),
    (lambda p: p.write_bytes(b"\xff\xfe a {}\n"), "not UTF-8 text (UnicodeDecodeError: "),
])
def test_a_templates_path_that_is_no_text_file_is_one_line_naming_it(tmp_path, make, says):
    path = tmp_path / "templates.txt"
    make(path)
    with pytest.raises(SiclipError, match=rf"^templates {path}: ") as e:
        read_templates(path)
    assert says in str(e.value) and "\n" not in str(e.value)


def test_good_templates_are_read_and_a_folder_without_its_own_gets_the_photo_prompts(tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_text("# prompts for clip art\na drawing of a {}.\n\n  {} clip art  \na {0} icon\n")
    assert read_templates(path) == ["a drawing of a {}.", "{} clip art", "a {0} icon"]
    assert read_templates(None, tmp_path) == TEMPLATES
    (tmp_path / "templates.txt").write_text("an emoji of a {}\n")
    assert read_templates(None, tmp_path) == ["an emoji of a {}"]
