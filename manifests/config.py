"""Stage configs: a dataclass per stage, filled from defaults < a TOML file < --set key=value < flags.

Unknown keys are an error that lists the valid ones; the resolved config is printed at start and
saved beside the outputs.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import sys
import types
import typing
from pathlib import Path
from typing import Any

from siclip.manifests.errors import SiclipError

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib


def _field_types(cls) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def coerce_value(key: str, value: Any, typ: Any, where: str) -> Any:
    """Check (and for strings from the command line, convert) one value against its field type."""
    origin = typing.get_origin(typ)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(typ) if a is not type(None)]
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null") and type(None) in typing.get_args(typ)):
            return None
        return coerce_value(key, value, args[0], where)
    if isinstance(value, str) and typ is not str:
        try:
            value = tomllib.loads(f"v = {value}")["v"]
        except tomllib.TOMLDecodeError:
            if typ is bool and value.lower() in ("yes", "no", "on", "off"):
                value = value.lower() in ("yes", "on")
    if typ is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if origin in (list, tuple) or typ in (list, tuple):
        if isinstance(value, (list, tuple)):
            return list(value)
    elif typ is bool and isinstance(value, bool):
        return value
    elif typ is Any or (isinstance(typ, type) and isinstance(value, typ) and not (typ is int and isinstance(value, bool))):
        return value
    raise SiclipError(f"{where}: {key} = {value!r} is not a valid {getattr(typ, '__name__', typ)}")


def unknown_key(key: str, valid: list[str], where: str) -> SiclipError:
    close = difflib.get_close_matches(key, valid, n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    return SiclipError(f"{where}: unknown key {key!r}{hint}; valid keys: {', '.join(valid)}")


def resolve(cls, path: str | Path | None = None, sets: list[str] = (), flags: dict | None = None):
    """Build a `cls` config from its defaults, a TOML file, `key=value` overrides and CLI flags."""
    types_ = _field_types(cls)
    valid = list(types_)
    values: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise SiclipError(f"config file {p} does not exist")
        try:
            data = tomllib.loads(p.read_text())
        except tomllib.TOMLDecodeError as e:
            raise SiclipError(f"{p}: not valid TOML ({e})") from None
        for k, v in data.items():
            if k not in types_:
                raise unknown_key(k, valid, str(p))
            values[k] = coerce_value(k, v, types_[k], str(p))
    for item in sets:
        if "=" not in item:
            raise SiclipError(f"--set {item!r}: expected key=value")
        k, v = item.split("=", 1)
        k = k.strip().replace("-", "_")
        if k not in types_:
            raise unknown_key(k, valid, "--set")
        values[k] = coerce_value(k, v.strip(), types_[k], "--set")
    for k, v in (flags or {}).items():
        if v is not None:
            values[k] = coerce_value(k, v, types_[k], f"--{k.replace('_', '-')}")
    cfg = cls(**values)
    if hasattr(cfg, "validate"):
        cfg.validate()
    return cfg


def add_config_arguments(parser: argparse.ArgumentParser, cls, default_config: Path | None = None) -> None:
    """`--config`, `--set`, and one `--flag` per field whose metadata has 'flag': True."""
    parser.add_argument("--config", type=Path, default=default_config,
                        help=f"TOML config file (default: {default_config})" if default_config else "TOML config file")
    parser.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                        help="override one config key; repeatable")
    for f in dataclasses.fields(cls):
        if not f.metadata.get("flag"):
            continue
        kind = f.metadata.get("kind")
        help_ = f.metadata.get("help", "").replace("%", "%%")
        name = "--" + f.name.replace("_", "-")
        if kind == "switch":
            parser.add_argument(name, dest=f.name, action="store_const", const=True, default=None, help=help_)
        else:
            parser.add_argument(name, dest=f.name, default=None, choices=f.metadata.get("choices"),
                                metavar=f.metadata.get("metavar"), help=f"{help_} (default: {str(f.default).replace('%', '%%')})")


def config_from_args(cls, args: argparse.Namespace):
    flags = {f.name: getattr(args, f.name, None) for f in dataclasses.fields(cls)}
    return resolve(cls, args.config, args.sets, flags)


def to_toml(cfg) -> str:
    """The resolved config as TOML (flat scalars and lists only)."""
    lines = []
    for f in dataclasses.fields(cfg):
        v = getattr(cfg, f.name)
        if v is None:
            lines.append(f"# {f.name} = (unset)")
        else:
            lines.append(f"{f.name} = {toml_value(v)}")
    return "\n".join(lines) + "\n"


def toml_value(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(toml_value(x) for x in v) + "]"
    import json
    return json.dumps(str(v))


def print_config(cfg, title: str, stream=None) -> None:
    stream = stream or sys.stderr
    print(f"# {title}: resolved config", file=stream)
    print(to_toml(cfg), end="", file=stream)
