"""bench-real's and the ablations' student runs are named by a digest of their config, overrides and siclip's
code, so a rerun after a code change trains anew instead of resuming a result of older code; and a stage-1
refusal inside the benchmark exits in one line, not a traceback."""

import pytest

from bench import real


@pytest.fixture
def code(tmp_path, monkeypatch):
    """A stand-in for siclip's code and the bench configs, in files this test may change."""
    configs = tmp_path / "configs"
    configs.mkdir()
    (configs / "abl_web.toml").write_text('model = "tiny"\n')
    src = tmp_path / "loop.py"
    src.write_text("x = 1\n")
    monkeypatch.setattr(real, "CONFIGS", configs)
    monkeypatch.setattr(real, "siclip_code", lambda: [src])
    return configs / "abl_web.toml", src


def test_a_run_name_changes_with_the_code_the_config_and_the_seed(code):
    config, src = code
    name = real.run_name("abl_web", 0)
    assert name.startswith("abl_web-s0-") and len(name) == len("abl_web-s0-") + 8
    assert real.run_name("abl_web", 0) == name  # the same code and config: the same run, resumed
    assert real.run_name("abl_web", 1).startswith("abl_web-s1-")
    src.write_text("x = 2\n")
    changed = real.run_name("abl_web", 0)
    assert changed != name and changed.startswith("abl_web-s0-")
    config.write_text('model = "tiny_preln"\n')
    assert real.run_name("abl_web", 0) not in (name, changed)


def test_the_repo_code_is_in_the_digest():
    files = real.siclip_code()
    names = {f.relative_to(real.REPO).as_posix() for f in files}
    assert "training/loop.py" in names and "training/presets/tiny.toml" in names
    assert any(n.startswith("manifests/") for n in names)
    assert files == sorted(files)


def test_a_stage_1_refusal_exits_in_one_line(tmp_path):
    with pytest.raises(SystemExit) as exit_:
        real.download(tmp_path / "data", ({}, []))  # an empty URL list: siclip shards refuses it
    message = str(exit_.value)
    assert message.startswith("bench-real: ") and "no downloadable" in message and "\n" not in message
    assert f"remove {tmp_path / 'data'} to start over" in message
