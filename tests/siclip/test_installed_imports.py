"""What installs is siclip alone: demo/ and bench/ run from a checkout, are not packaged, and nothing installed
imports them (docs/design.md), not even through the checkout's `siclip.demo` / `siclip.bench` names."""

from __future__ import annotations

import ast
from pathlib import Path

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

REPO = Path(__file__).resolve().parents[2]
OUTSIDE = ("demo", "bench")  # folders of the checkout that nothing installed may import


def installed_folders() -> dict[str, Path]:
    """Each package pyproject.toml installs -> the folder it is made from."""
    tool = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]
    mapping = tool.get("package-dir", {})
    return {name: REPO / mapping.get(name, name.replace(".", "/")) for name in tool["packages"]}


def imported_names(source: str, package: str) -> list[tuple[int, str]]:
    """(line, absolute module name) of every import in `source`, a module of `package` (relative ones resolved), and
    of importlib.import_module("...") with a constant name."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            parts = package.split(".")[:len(package.split(".")) - node.level + 1] if node.level else []
            module = ".".join(parts + ([node.module] if node.module else []))
            found += [(node.lineno, module)] + [(node.lineno, f"{module}.{a.name}") for a in node.names]
        elif isinstance(node, ast.Call) and getattr(node.func, "attr", getattr(node.func, "id", None)) == "import_module":
            name = node.args[0] if node.args else None
            if isinstance(name, ast.Constant) and isinstance(name.value, str):
                found.append((node.lineno, name.value))
    return found


def outside_imports(source: str, package: str = "siclip") -> list[tuple[int, str]]:
    """The imports in `source` that reach demo/ or bench/, by their own name or as siclip.demo / siclip.bench."""
    return [(line, name) for line, name in sorted(set(imported_names(source, package)))
            if any(name == top or name.startswith(f"{top}.") or name == f"siclip.{top}"
                   or name.startswith(f"siclip.{top}.") for top in OUTSIDE)]


def test_demo_and_bench_are_not_packaged():
    folders = installed_folders()
    assert {"siclip", "siclip.training", "siclip.pipeline"} <= set(folders)
    assert not any(name.split(".")[-1] in OUTSIDE for name in folders)
    assert not any(folder.name in OUTSIDE for folder in folders.values())


def test_no_installed_module_imports_demo_or_bench():
    modules = [(p, package) for package, folder in installed_folders().items() for p in sorted(folder.glob("*.py"))]
    assert len(modules) > 40 and (REPO / "training" / "loop.py", "siclip.training") in modules
    found = [f"{p.relative_to(REPO)}:{line}: {name}" for p, package in modules
             for line, name in outside_imports(p.read_text(), package)]
    assert found == []


def test_the_check_sees_every_way_of_importing_them():
    source = ("import demo.scenes\nfrom bench import real\nfrom siclip.bench.train import make_bench_root\n"
              "from siclip import demo\nimportlib.import_module('bench.shards')\n"
              "import benchmarks, demolition\nfrom siclip.training import bench_helpers\nfrom . import bench\n"
              "from .. import demo\n")
    assert outside_imports(source, "siclip.training") == [
        (1, "demo.scenes"), (2, "bench"), (2, "bench.real"), (3, "siclip.bench.train"),
        (3, "siclip.bench.train.make_bench_root"), (4, "siclip.demo"), (5, "bench.shards"), (9, "siclip.demo")]
    assert outside_imports("from . import bench\n", "siclip") == [(1, "siclip.bench")]
