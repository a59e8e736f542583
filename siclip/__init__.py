"""siclip: every part of the toolkit under one import name.

`siclip.manifests` (the data root's contract), the shared core in this folder (`siclip.images`, …), the
stages `siclip.pipeline`, `siclip.captioning`, `siclip.training`. docs/design.md draws the layers.

An install puts the four stage folders inside this package. In a source checkout they sit beside it at the top
of the repository, where users look for them: the checkout's root joins this package's search path, so the
same names import from both and a user's own `training.py` or `pipeline/` shadows nothing of ours.
"""

from pathlib import Path as _Path

_checkout = _Path(__file__).resolve().parent.parent
if (_checkout / "pyproject.toml").is_file() and (_checkout / "manifests" / "__init__.py").is_file():
    __path__.append(str(_checkout))  # noqa: F821 (a package's own __path__)
