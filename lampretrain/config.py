"""Validated configuration: dataclass schemas built from YAML with errors that name the key.

Every schema in lampretrain (prep specs, recipes) is a tree of dataclasses.
:func:`from_dict` checks it before any work starts: an unknown key names the
allowed ones, a wrong type or a value outside a ``Literal`` names the allowed
values. ``--set a.b=c`` overrides go through :func:`apply_overrides`.
"""

from __future__ import annotations

import dataclasses
import re
import types
from pathlib import Path
from typing import Any, Literal, TypeVar, Union, get_args, get_origin, get_type_hints

import yaml

from .errors import UserError

T = TypeVar("T")


class ConfigError(UserError, ValueError):
    """A configuration problem; the message names the file and key path."""


def load_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"{path}: no such file")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {err}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level, got {type(data).__name__}")
    return data


def from_dict(cls: type[T], data: Any, where: str = "", at: str = "") -> T:
    """Build dataclass ``cls`` from plain data, validating keys, types, choices and ranges.

    Errors read ``WHERE: key.path: what is wrong``: ``WHERE`` is usually the file, ``at`` the key path of
    ``data`` inside a larger schema (``heads`` → ``heads.denoising.prob: ...``). With neither, the class
    name stands for ``WHERE``.
    """
    try:
        return _convert(cls, data, at)
    except ConfigError as err:
        if at and not where:
            raise
        raise ConfigError(f"{where or cls.__name__}: {err}") from None


def override(base: T, overrides: dict[str, Any], at: str = "") -> T:
    """A copy of dataclass instance ``base`` with ``overrides``, validated as :func:`from_dict` validates."""
    current = {f.name: getattr(base, f.name) for f in dataclasses.fields(base) if f.init}
    return from_dict(type(base), {**current, **overrides}, at=at)


def _key(where: str, name: str) -> str:
    return f"{where}.{name}" if where else name


def _at(where: str) -> str:
    return f"{where}: " if where else ""


def to_dict(obj: Any) -> Any:
    """Plain data (for YAML/JSON/MLflow) from a schema instance."""
    if dataclasses.is_dataclass(obj):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    if isinstance(obj, Path):
        return str(obj)
    return obj


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``key.sub=value`` strings (value parsed as YAML) to nested plain data."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override '{item}' is not of the form key.path=value")
        key, raw = item.split("=", 1)
        node = data
        parts = key.strip().split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override '{item}': '{part}' is not a section")
        node[parts[-1]] = yaml.safe_load(raw)
    return data


def _convert(tp: Any, value: Any, where: str) -> Any:
    origin = get_origin(tp)
    if tp is Any:
        return value
    if dataclasses.is_dataclass(tp):
        return _convert_dataclass(tp, value, where)
    if origin in (Union, types.UnionType):
        options = get_args(tp)
        if value is None and type(None) in options:
            return None
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return _convert(option, value, where)
            except ConfigError as err:
                errors.append(str(err))
        raise ConfigError(errors[0] if len(errors) == 1 else f"{_at(where)}{value!r} matches none of {_name(tp)}")
    if origin is Literal:
        allowed = get_args(tp)
        if value not in allowed:
            raise ConfigError(f"{_at(where)}{value!r} is not allowed; choose one of {', '.join(map(repr, allowed))}")
        return value
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{_at(where)}expected a list, got {value!r}")
        (item,) = get_args(tp)[:1] or (Any,)
        items = [_convert(item, v, f"{where}[{k}]") for k, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{_at(where)}expected a mapping, got {value!r}")
        key_tp, val_tp = get_args(tp) or (Any, Any)
        return {_convert(key_tp, k, where): _convert(val_tp, v, _key(where, k)) for k, v in value.items()}
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{_at(where)}expected a number, got {value!r}")
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{_at(where)}expected an integer, got {value!r}")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{_at(where)}expected true or false, got {value!r}")
        return value
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{_at(where)}expected a string, got {value!r}")
        return value
    return value


def _convert_dataclass(cls: type, value: Any, where: str) -> Any:
    if dataclasses.is_dataclass(value) and isinstance(value, cls):
        return value
    if value is None:
        value = {}
    if not isinstance(value, dict):
        raise ConfigError(f"{_at(where)}expected a mapping with keys {_keys(cls)}, got {value!r}")
    hints = get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = [k for k in value if k not in fields]
    if unknown:
        raise ConfigError(f"{_at(where)}unknown key '{unknown[0]}'; allowed keys: {_keys(cls)}")
    kwargs = {}
    for name, f in fields.items():
        if name in value:
            kwargs[name] = _convert(hints[name], value[name], _key(where, name))
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise ConfigError(f"{_at(where)}missing required key '{name}'")
    try:
        obj = cls(**kwargs)
        check = getattr(obj, "check", None)
        if callable(check):
            check()
    except (ConfigError, ValueError) as err:  # a range check in __post_init__ or check()
        # "every: must be >= 1" raised by the checkpoint section reads "checkpoint.every: must be >= 1"
        message = str(err)
        keyed = re.match(r"[A-Za-z_][\w.]*: ", message) and where
        raise ConfigError(f"{where}.{message}" if keyed else f"{_at(where)}{message}") from None
    return obj


def _keys(cls: type) -> str:
    return ", ".join(f.name for f in dataclasses.fields(cls) if f.init)


def _name(tp: Any) -> str:
    if get_origin(tp) in (Union, types.UnionType):
        return " | ".join(_name(option) for option in get_args(tp))
    if get_origin(tp) is Literal:
        return " | ".join(map(repr, get_args(tp)))
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")
