"""Pass configs: typed frozen dataclasses, filled the same way from the CLI, a TOML recipe or Python.

Every field has a default and a doc (``option(default, "doc")``); values
arriving as text (``--set prune.ratio=0.5``) are converted by the field's
type, and unknown keys or values of the wrong type are one-line errors.
"""

from __future__ import annotations

import dataclasses
import sys
import types
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin

from onnxopt.errors import OnnxoptError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

__all__ = [
    "option",
    "ConfigField",
    "config_fields",
    "build_config",
    "config_to_dict",
    "parse_settings",
    "load_recipe",
]


def option(default: Any, doc: str, *, unit: str | None = None) -> Any:
    """A config field with a default and a one-line doc (and a unit, where one helps)."""
    metadata = {"doc": doc, "unit": unit}
    if isinstance(default, (list, dict, set)):
        return dataclasses.field(default_factory=lambda: type(default)(default), metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


@dataclasses.dataclass(frozen=True)
class ConfigField:
    """One documented config key, as `onnxopt passes` lists it."""

    name: str
    type: Any
    default: Any
    doc: str
    unit: str | None

    @property
    def type_name(self) -> str:
        return _type_name(self.type)


def _type_name(tp: Any) -> str:
    origin = get_origin(tp)
    if origin is Literal:
        return "|".join(str(a) for a in get_args(tp))
    if origin in (Union, types.UnionType):
        return " or ".join(_type_name(a) for a in get_args(tp) if a is not type(None)) + " (optional)"
    if origin in (list, tuple):
        args = get_args(tp)
        return f"list of {_type_name(args[0]) if args else 'str'}"
    return getattr(tp, "__name__", str(tp))


def config_fields(config_cls: type) -> list[ConfigField]:
    """The documented fields of a config dataclass, with resolved types."""
    hints = typing.get_type_hints(config_cls)
    out = []
    for f in dataclasses.fields(config_cls):
        if f.default is not dataclasses.MISSING:
            default = f.default
        elif f.default_factory is not dataclasses.MISSING:
            default = f.default_factory()
        else:
            default = dataclasses.MISSING
        out.append(ConfigField(f.name, hints[f.name], default, f.metadata.get("doc", ""), f.metadata.get("unit")))
    return out


def _coerce(tp: Any, value: Any, where: str) -> Any:
    origin = get_origin(tp)
    if origin in (Union, types.UnionType):
        args = [a for a in get_args(tp) if a is not type(None)]
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null", "")):
            return None
        errors = []
        for arg in args:
            try:
                return _coerce(arg, value, where)
            except OnnxoptError as err:
                errors.append(err.message)
        raise OnnxoptError(f"{where}: {value!r} is not a {_type_name(tp)}", "see `onnxopt passes` for the key's type")
    if origin is Literal:
        choices = get_args(tp)
        for choice in choices:
            if value == choice or (isinstance(value, str) and str(choice) == value):
                return choice
            if isinstance(choice, int) and not isinstance(choice, bool) and isinstance(value, str) and value.strip().lstrip("-").isdigit() and int(value) == choice:
                return choice
        raise OnnxoptError(f"{where}: {value!r} is not one of {', '.join(map(str, choices))}",
                           "pick one of the listed values")
    if origin in (list, tuple):
        args = get_args(tp)
        inner = args[0] if args else str
        items = [s.strip() for s in value.split(",") if s.strip()] if isinstance(value, str) else list(value)
        coerced = [_coerce(inner, item, where) for item in items]
        return tuple(coerced) if origin is tuple else coerced
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("1", "true", "yes", "on"):
            return True
        if isinstance(value, str) and value.lower() in ("0", "false", "no", "off"):
            return False
        raise OnnxoptError(f"{where}: {value!r} is not a boolean", "use true or false")
    if tp is int:
        if isinstance(value, bool):
            raise OnnxoptError(f"{where}: {value!r} is not an integer", "give a whole number")
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        try:
            return int(str(value).strip())
        except ValueError:
            raise OnnxoptError(f"{where}: {value!r} is not an integer", "give a whole number") from None
    if tp is float:
        if isinstance(value, bool):
            raise OnnxoptError(f"{where}: {value!r} is not a number", "give a number such as 0.5")
        if isinstance(value, (int, float)):
            return float(value)
        try:
            return float(str(value).strip())
        except ValueError:
            raise OnnxoptError(f"{where}: {value!r} is not a number", "give a number such as 0.5") from None
    if tp is str:
        if not isinstance(value, str):
            raise OnnxoptError(f"{where}: {value!r} is not text", "quote the value")
        return value
    if tp is Path:
        return Path(value)
    return value


def build_config(config_cls: type, values: Mapping[str, Any], *, pass_name: str) -> Any:
    """Instantiate ``config_cls`` from ``values`` (text or Python values); unknown keys are errors."""
    fields = {f.name: f for f in config_fields(config_cls)}
    unknown = [k for k in values if k not in fields]
    if unknown:
        raise OnnxoptError(f"unknown config key {pass_name}.{unknown[0]}",
                           f"keys of {pass_name}: {', '.join(fields) or '(none)'}")
    kwargs = {k: _coerce(fields[k].type, v, f"{pass_name}.{k}") for k, v in values.items()}
    try:
        config = config_cls(**kwargs)
    except (ValueError, TypeError) as err:
        raise OnnxoptError(f"{pass_name} config: {err}", "see `onnxopt passes` for valid values") from None
    return config


def config_to_dict(config: Any) -> dict[str, Any]:
    """A JSON-friendly dict of a config's values."""
    out = {}
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        out[f.name] = list(value) if isinstance(value, tuple) else (str(value) if isinstance(value, Path) else value)
    return out


def parse_settings(items: list[str] | tuple[str, ...]) -> dict[str, dict[str, str]]:
    """Parse ``--set pass.key=value`` items into ``{pass: {key: value}}``."""
    out: dict[str, dict[str, str]] = {}
    for item in items:
        key, sep, value = item.partition("=")
        pass_name, dot, field_name = key.strip().partition(".")
        if not sep or not dot or not pass_name or not field_name:
            raise OnnxoptError(f"--set {item!r} is not PASS.KEY=VALUE", "for example --set prune.ratio=0.5")
        out.setdefault(pass_name, {})[field_name] = value
    return out


def load_recipe(path: str | Path) -> tuple[list[str], dict[str, dict[str, Any]]]:
    """Read a TOML recipe: ``passes = ["prune", "quant"]`` and one table per pass with its keys."""
    path = Path(path)
    if not path.is_file():
        raise OnnxoptError(f"recipe {path}: no such file", "check the --recipe path")
    try:
        doc = tomllib.loads(path.read_text())
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as err:
        raise OnnxoptError(f"recipe {path} is not valid TOML ({err})", "fix the syntax") from None
    passes = doc.pop("passes", [])
    if isinstance(passes, str):
        passes = [p.strip() for p in passes.split(",") if p.strip()]
    if not isinstance(passes, list) or not all(isinstance(p, str) for p in passes):
        raise OnnxoptError(f"recipe {path}: 'passes' must be a list of pass names", 'e.g. passes = ["prune", "quant"]')
    settings: dict[str, dict[str, Any]] = {}
    for name, table in doc.items():
        if not isinstance(table, dict):
            raise OnnxoptError(f"recipe {path}: top-level key {name!r} is not a pass table",
                               "put each pass's keys under [pass_name]")
        settings[name] = dict(table)
    return passes, settings
