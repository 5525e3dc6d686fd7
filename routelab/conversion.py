"""Dict <-> dataclass with validation: the conversion every config section goes through.

``from_dict`` builds a dataclass from a mapping, rejecting unknown keys with a "did you mean" hint
and wrong types with a message naming the field, the value and what is allowed; a registered
section (attention, ffn, router) is built by ``section_from_dict``, its ``kind`` picking the
dataclass. ``to_dict`` is the way back. Every error is a ``ConfigError`` (a ``ValueError``).

Knows nothing of the schema (``routelab.config``), which uses it.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from typing import Any, Literal, Union

from routelab.errors import ConfigError
from routelab.options import SECTIONS
from routelab.registry import UnknownKindError

__all__ = ["from_dict", "section_from_dict", "to_dict"]


def _fields(cls: type) -> dict[str, dataclasses.Field]:
    return {f.name: f for f in dataclasses.fields(cls)}


def section_from_dict(base: type, data: Any, path: str) -> Any:
    """Build a registered section (attention, ffn, router): its ``kind`` picks, in ``base.registry``,
    the dataclass that validates the rest. A bare string is the kind alone (``router: topk``)."""
    if isinstance(data, str):
        data = {"kind": data}
    if not isinstance(data, dict):
        raise ConfigError(f"{path} must be a mapping with a 'kind' key (or a kind name), got {data!r}")
    kind = data.get("kind", base.kind)
    if kind in getattr(base, "renamed", {}):  # a kind saved under its former name
        kind = base.renamed[kind]
        data = {**data, "kind": kind}
    try:
        entry = base.registry.get(kind)
    except UnknownKindError as e:
        raise ConfigError(f"{path}.kind: {e}") from None
    upgrade = getattr(entry.config_class, "upgrade", None)  # reads sections written by older versions
    return from_dict(entry.config_class, upgrade(data) if upgrade else data, path)


def from_dict(cls: type, data: Any, path: str) -> Any:
    """Build dataclass ``cls`` from a mapping, checking keys and types; ``path`` names the section."""
    where = path or "config"
    if not isinstance(data, dict):
        raise ConfigError(f"{where} must be a mapping, got {data!r}")
    fields = _fields(cls)
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for key, value in data.items():
        if key not in fields:
            hint = difflib.get_close_matches(str(key), list(fields), n=1)
            did_you_mean = f"; did you mean {hint[0]!r}?" if hint else ""
            raise ConfigError(
                f"unknown key {_join(path, key)!r}{did_you_mean} (known keys: {', '.join(fields)})"
            )
        kwargs[key] = _coerce(value, hints[key], _join(path, key))
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except (TypeError, ValueError) as e:  # a range check raised something else
        raise ConfigError(f"{where}: {e}") from None


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def _coerce(value: Any, tp: Any, name: str) -> Any:
    """Check ``value`` against type ``tp``; allow int -> float; return the value to store."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp in SECTIONS:
        return section_from_dict(tp, value, name)
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, name)
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        non_none = [a for a in args if a is not type(None)]
        errors = []
        for a in non_none:
            try:
                return _coerce(value, a, name)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if len(errors) == 1 else f"{name}={value!r} matches none of {non_none}")
    if origin is Literal:
        if value not in args:
            hint = difflib.get_close_matches(str(value), [str(a) for a in args], n=1)
            did_you_mean = f" (did you mean {hint[0]!r}?)" if hint else ""
            raise ConfigError(f"{name}={value!r} is invalid{did_you_mean}; allowed: {', '.join(map(repr, args))}")
        return value
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{name}={value!r} is invalid; allowed: a list")
        item = args[0] if args else Any
        return [_coerce(v, item, f"{name}[{i}]") for i, v in enumerate(value)]
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{name}={value!r} is invalid; allowed: a mapping")
        return dict(value)
    if tp is Any:
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{name}={value!r} is invalid; allowed: true or false")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{name}={value!r} is invalid; allowed: an integer")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{name}={value!r} is invalid; allowed: a number")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{name}={value!r} is invalid; allowed: a string")
        return value
    raise ConfigError(f"{name}: unsupported field type {tp!r}")  # a bug in a config class


def to_dict(obj: Any) -> Any:
    """Dataclasses (nested), lists and mappings as plain dicts and lists, as ``from_dict`` reads them."""
    if dataclasses.is_dataclass(obj):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    return obj
