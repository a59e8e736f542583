"""`siclip --version`: the version of the code that runs."""

from __future__ import annotations

from importlib.metadata import version as installed
from pathlib import Path

from siclip_testing import REPO, siclip

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib


def test_version_prints_the_checkouts_version():
    res = siclip("--version")
    expected = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]
    assert res.stdout.strip() == f"siclip {expected}" and res.returncode == 0


def test_a_checkout_gives_its_pyproject_version_and_an_install_its_metadata(tmp_path):
    from siclip.cli import version

    checkout = tmp_path / "checkout"
    (checkout / "siclip").mkdir(parents=True)
    (checkout / "siclip" / "cli.py").write_text("")
    (checkout / "pyproject.toml").write_text('[project]\nname = "siclip"\nversion = "9.8.7"\n')
    assert version(checkout) == "9.8.7"
    site = Path(tmp_path / "site-packages")  # no pyproject beside an installed package
    (site / "siclip").mkdir(parents=True)
    assert version(site) == installed("siclip")
