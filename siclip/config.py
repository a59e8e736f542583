"""One config layer for every stage: a config is a declaration, a pydantic dataclass (`@config`) of typed fields
with defaults and constraints (`Field(ge=1)`, `Literal[...]`), and validators only for rules across fields.

`resolve` fills one from its defaults < a TOML file < `--set key=value` (dotted: `stages.1.epochs=3`,
`stages.0.loss.pm=0.1`) < command-line flags. Every mistake is one `SiclipError` line: an unknown key names the
valid ones (and the likeliest, "did you mean"), a value of the wrong type names the key and where it came from
(the file, the `--set` or the flag), a value out of range names the key and its range.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import json
import sys
import types
import typing
from pathlib import Path
from typing import Annotated, Any, Literal

import pydantic
from pydantic import ConfigDict, Field, ValidationError

from siclip.manifests.errors import SiclipError

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

# strict: `1` is not true and `2.5` is not an int (an int is a float, as in TOML); no key the class does not declare
STRICT = ConfigDict(strict=True, extra="forbid")


def config(cls):
    """Make `cls` a config: a pydantic dataclass, strictly typed, refusing unknown keys."""
    return pydantic.dataclasses.dataclass(cls, config=STRICT)


def flag(default, help: str, *, metavar: str | None = None, switch: bool = False, **constraints):
    """A field that the command also takes as `--name` (`switch`: `--name` alone sets it true); `help` is what
    `--help` and docs/config.md say of it."""
    extra = {"flag": True, "metavar": metavar, "switch": switch}
    return bounded(default, description=help, extra=extra, **constraints)


def bounded(default, *, zero: str = "", unit: str = "", extra: dict | None = None, **constraints):
    """A field with constraints (`ge`, `gt`, `le`); `zero` says what 0 means and `unit` names the unit, for the
    message that refuses a value out of range ("processes must be 0 (one per core) or more, got -1")."""
    return Field(default=default, json_schema_extra={"zero": zero, "unit": unit, **(extra or {})}, **constraints)


def _fraction_range(value: list, info: pydantic.ValidationInfo) -> list[float]:
    if not (len(value) == 2 and all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in value)
            and 0 < value[0] <= value[1] <= 1):
        raise ValueError(f"{info.field_name} {value} must be two fractions 0 < lo <= hi <= 1")
    return [float(x) for x in value]


# a crop's range of area fractions [lo, hi], as stage 2's recorded crops and training's crops both take it
FractionRange = Annotated[list, pydantic.AfterValidator(_fraction_range)]


# ----------------------------------------------------------------------------- what a config class declares


def fields(cls) -> dict[str, pydantic.fields.FieldInfo]:
    """The fields of a config class by name, in declaration order (parents' first)."""
    return dict(cls.__pydantic_fields__)


def default(info: pydantic.fields.FieldInfo) -> Any:
    return info.get_default(call_default_factory=True)


def notes(info: pydantic.fields.FieldInfo) -> dict:
    """What `flag` and `bounded` declared beside the constraints: flag, metavar, switch, zero, unit."""
    return info.json_schema_extra if isinstance(info.json_schema_extra, dict) else {}


def _plain(typ: Any) -> Any:
    """`typ` without its Annotated wrapper."""
    while typing.get_origin(typ) is Annotated:
        typ = typing.get_args(typ)[0]
    return typ


def _union(typ: Any) -> list:
    typ = _plain(typ)
    if typing.get_origin(typ) in (typing.Union, types.UnionType):
        return [_plain(a) for a in typing.get_args(typ)]
    return [typ]


def choices(typ: Any) -> list[str] | None:
    """The values a `Literal[...]` field takes, else None."""
    typ = _plain(typ)
    return [str(a) for a in typing.get_args(typ)] if typing.get_origin(typ) is Literal else None


def type_name(typ: Any) -> str:
    """A field's type as a user reads it: `int`, `str | None`, `list[str]`; a Literal is its values' type."""
    names = []
    for t in _union(typ):
        if typing.get_origin(t) is Literal:
            name = type(typing.get_args(t)[0]).__name__
        elif t is type(None):
            name = "None"
        elif t is Any:
            name = "any"
        elif typing.get_origin(t) is not None:
            name = f"{typing.get_origin(t).__name__}[{', '.join(type_name(a) for a in typing.get_args(t))}]"
        else:
            name = getattr(t, "__name__", str(t))
        names.append(name)
    return " | ".join(dict.fromkeys(names))


def _is_config(typ: Any) -> bool:
    return isinstance(typ, type) and hasattr(typ, "__pydantic_fields__") and dataclasses.is_dataclass(typ)


def _nested(typ: Any) -> tuple[type | None, bool]:
    """(the config class a field holds, whether it holds a list of them), or (None, False) for a plain value."""
    typ = _plain(typ)
    if _is_config(typ):
        return typ, False
    if typing.get_origin(typ) is list and typing.get_args(typ) and _is_config(typing.get_args(typ)[0]):
        return typing.get_args(typ)[0], True
    return None, False


# ----------------------------------------------------------------------------- building, and its errors


class Text(str):
    """A value written on the command line (`--set`, a flag, a `model_set` entry): typed by its field when the
    config is built. A file's values are typed already (TOML and JSON have types) and stay as they are."""


def from_text(text: str, typ: Any) -> Any:
    """Command-line text as the field's type has it: the TOML value it spells (`3`, `true`, `[1, 2]`), none/null
    for an optional field, yes/no/on/off for a switch; text stays text for a text field."""
    text = str(text)
    kinds = _union(typ)
    if type(None) in kinds and text.lower() in ("none", "null"):
        return None
    if all(k is str or choices(k) for k in kinds if k is not type(None)):
        return text
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        if bool in kinds and text.lower() in ("yes", "no", "on", "off"):
            return text.lower() in ("yes", "on")
        return text


def unknown_key(key: str, valid: list[str], where: str) -> SiclipError:
    close = difflib.get_close_matches(key, valid, n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    return SiclipError(f"{where}: unknown key {key!r}{hint}; valid keys: {', '.join(valid)}")


class _Where:
    """Where each value came from: the longest dotted prefix of a key that a source set, else the fallback."""

    def __init__(self, sources: dict[tuple, str], fallback: str):
        self.sources, self.fallback = sources, fallback

    def __call__(self, path: tuple) -> str:
        for n in range(len(path), -1, -1):
            if tuple(path[:n]) in self.sources:
                return self.sources[tuple(path[:n])]
        return self.fallback


def _dotted(path) -> str:
    return ".".join(str(p) for p in path)


def build(cls, data: Any, where: str = "config", sources: dict[tuple, str] | None = None, path: tuple = ()):
    """A `cls` from nested dicts (inner configs and lists of them too), or one SiclipError naming the key: its
    source (from `sources`, dotted key prefix -> file or --set) for an unknown key or a wrong type, `where` for a
    value out of range or a rule across fields."""
    source = _Where(sources or {}, where)
    at = source(path) + (f": {_dotted(path)}" if path else "")
    if not isinstance(data, dict):
        raise SiclipError(f"{at}: expected a table, got {data!r}")
    infos = fields(cls)
    values = {}
    for key, value in data.items():
        if key not in infos:
            raise unknown_key(key, list(infos), source(path + (key,)) + (f": {_dotted(path)}" if path else ""))
        inner, many = _nested(infos[key].annotation)
        if inner and many:
            if not isinstance(value, list):
                raise SiclipError(f"{source(path + (key,))}: {_dotted(path + (key,))} must be a list of "
                                  f"[[{key}]] tables")
            value = [build(inner, v, where, sources, path + (key, i)) for i, v in enumerate(value)]
        elif inner:
            value = build(inner, value, where, sources, path + (key,))
        elif isinstance(value, Text):
            value = from_text(value, infos[key].annotation)
        values[key] = value
    try:
        return cls(**values)
    except ValidationError as e:
        raise explain(e.errors()[0], cls, where, source, path) from None


def explain(error: dict, cls, where: str, source=None, path: tuple = ()) -> SiclipError:
    """pydantic's error as this project's one line: the one place its wording is chosen."""
    loc = tuple(error["loc"])
    kind, value = error["type"], error["input"]
    prefix = f"{where}: " if where else ""
    if kind == "value_error" or not loc:  # a validator's own sentence, complete but for where (and which table)
        inner = f"{_dotted(path)}: " if path and not loc else ""
        return SiclipError(prefix + inner + str(error.get("ctx", {}).get("error", error["msg"])))
    name = loc[0]
    info = fields(cls).get(name)
    key = _dotted(path + (name,))
    if kind == "unexpected_keyword_argument" or info is None:
        return unknown_key(str(name), list(fields(cls)), (source or _Where({}, where))(path))
    if kind == "literal_error":
        allowed = choices(info.annotation) or []
        listed = f"{allowed[0]} or {allowed[1]}" if len(allowed) == 2 else f"one of {', '.join(allowed)}"
        return SiclipError(f"{prefix}{key} {value!r} is not {listed}")
    bounds = {k: getattr(m, k) for m in info.metadata for k in ("ge", "gt", "le", "lt") if hasattr(m, k)} \
        if kind in ("greater_than_equal", "greater_than", "less_than_equal", "less_than") else {}
    if bounds:
        if float in _union(info.annotation) and isinstance(value, int):
            value = float(value)
        return SiclipError(f"{prefix}{key} must be {_range(bounds, notes(info))}, got {value}")
    at = (source or _Where({}, where))(path + (name,))
    return SiclipError(f"{at}: {key} = {value!r} is not a valid {type_name(info.annotation)}")


def _range(bounds: dict, said: dict) -> str:
    unit = f" {said['unit']}" if said.get("unit") else ""
    zero = f" ({said['zero']})" if said.get("zero") else ""
    lo = bounds.get("ge", bounds.get("gt"))
    if "le" in bounds and "ge" in bounds:
        return f"within {bounds['ge']}..{bounds['le']}{unit}"
    if "le" in bounds and "gt" in bounds:
        return f"in ({bounds['gt']}, {bounds['le']}]{unit}"
    if "ge" in bounds:
        return f"0{zero} or more{unit}" if lo == 0 else f"at least {lo}{unit}"
    if "gt" in bounds:
        return "positive" if lo == 0 and not unit else f"more than {lo}{unit}"
    return f"at most {bounds.get('le', bounds.get('lt'))}{unit}"


# ----------------------------------------------------------------------------- sources: file, --set, flags


def load_toml(path: str | Path) -> dict:
    p = Path(path)
    if not p.is_file():
        raise SiclipError(f"config file {p} does not exist")
    try:
        return tomllib.loads(p.read_text())
    except tomllib.TOMLDecodeError as e:
        raise SiclipError(f"{p}: not valid TOML ({e})") from None


def set_dotted(data: dict, item: str, sources: dict[tuple, str]) -> None:
    """Apply one `--set a.b.0.c=value` to nested dicts and lists; the value stays text until `build` types it."""
    if "=" not in item:
        raise SiclipError(f"--set {item!r}: expected key=value")
    dotted, raw = item.split("=", 1)
    parts = dotted.strip().replace("-", "_").split(".")
    node: Any = data
    for i, part in enumerate(parts[:-1]):
        if isinstance(node, list):
            if not part.isdigit() or int(part) >= len(node):
                raise SiclipError(f"--set {item}: {'.'.join(parts[:i])} has {len(node)} entries; no index {part!r}")
            node = node[int(part)]
        else:
            node = node.setdefault(part, {})
    if isinstance(node, list):
        raise SiclipError(f"--set {item}: {dotted!r} names a list entry, not a key")
    node[parts[-1]] = Text(raw.strip())
    sources[tuple(int(p) if p.isdigit() else p for p in parts)] = f"--set {item}"


def resolve(cls, path: str | Path | dict | None = None, sets: list[str] = (), flags: dict | None = None,
            where: str | None = None):
    """A `cls` config from its defaults < a TOML file (or a dict: a config read back from JSON) < `key=value`
    overrides < CLI flags. Rules are reported under `where` (default: the class's WHERE)."""
    sources: dict[tuple, str] = {}
    if isinstance(path, dict):
        data = json.loads(json.dumps(path))
    else:
        data = load_toml(path) if path is not None else {}
        if path is not None:
            sources[()] = str(path)
    for item in sets:
        set_dotted(data, item, sources)
    for key, value in (flags or {}).items():
        if value is not None:
            data[key] = Text(value) if isinstance(value, str) else value
            sources[(key,)] = f"--{key.replace('_', '-')}"
    where = where if where is not None else getattr(cls, "WHERE", "config")
    return build(cls, data, where, sources)


def add_config_arguments(parser: argparse.ArgumentParser, cls, default_config: Path | None = None) -> None:
    """`--config`, `--set`, and one `--flag` per field declared with `flag(...)`."""
    parser.add_argument("--config", type=Path, default=default_config,
                        help=f"TOML config file (default: {default_config})" if default_config else "TOML config file")
    parser.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                        help="override one config key; repeatable")
    for name, info in fields(cls).items():
        said = notes(info)
        if not said.get("flag"):
            continue
        help_ = (info.description or "").replace("%", "%%")
        option = "--" + name.replace("_", "-")
        if said.get("switch"):
            parser.add_argument(option, dest=name, action="store_const", const=True, default=None, help=help_)
        else:
            parser.add_argument(option, dest=name, default=None, choices=choices(info.annotation),
                                metavar=said.get("metavar"),
                                help=f"{help_} (default: {str(default(info)).replace('%', '%%')})")


def config_from_args(cls, args: argparse.Namespace):
    flags = {name: getattr(args, name, None) for name in fields(cls)}
    return resolve(cls, args.config, args.sets, flags)


# ----------------------------------------------------------------------------- writing a config back


def to_toml(cfg) -> str:
    """The resolved config as TOML: its keys, then each inner config as a table and each list of them as
    [[tables]] (an unset optional key as a comment)."""
    return "\n".join(_toml_lines(cfg, "")) + "\n"


def _toml_lines(cfg, table: str) -> list[str]:
    lines, tables = [], []
    for name, info in fields(type(cfg)).items():
        value = getattr(cfg, name)
        inner, many = _nested(info.annotation)
        if inner and many:
            for item in value:
                tables += ["", f"[[{table}{name}]]"] + _toml_lines(item, f"{table}{name}.")
        elif inner:
            tables += [f"[{table}{name}]"] + _toml_lines(value, f"{table}{name}.")
        elif value is None:
            lines.append(f"# {name} = (unset)")
        else:
            lines.append(f"{name} = {toml_value(value)}")
    return lines + tables


def toml_value(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(toml_value(x) for x in v) + "]"
    return json.dumps(str(v))


def print_config(cfg, title: str, stream=None) -> None:
    stream = stream or sys.stderr
    print(f"# {title}: resolved config", file=stream)
    print(to_toml(cfg), end="", file=stream)
