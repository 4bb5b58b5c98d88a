"""Build typed dataclasses from parsed YAML, collecting every problem with its key path.

One small engine serves the whole model: it reads the type hints of a dataclass and checks
each value against them. Problems are collected, never raised one at a time, so a broken
stack file is reported in one go, one line per problem:

    services.redis.memory.limit: expected a size such as 64MB (units B, KB, MB, GB), got '12XB'
"""

from __future__ import annotations

import dataclasses
import difflib
import ipaddress
import types
from typing import Any, Literal, Union, get_args, get_origin, get_type_hints

from aiia_ops.model.units import Duration, Size, UnitError

MISSING = object()


class Problems(list):
    """Problems found so far: (path, message) pairs, each recorded once, in order."""

    def add(self, path: str, message: str) -> None:
        if (path, message) not in self:
            self.append((path, message))

    def lines(self) -> list[str]:
        return [f"{path}: {message}" if path else message for path, message in self]


class Sourced(dict):
    """A dict that remembers, per key, the key path it came from (after a deep merge)."""

    def __init__(self, data: dict, paths: dict[str, str]):
        super().__init__(data)
        self.paths = paths


def deep_merge(base: Any, base_path: str, override: Any, override_path: str) -> Any:
    """Override's keys win; nested dicts merge. Remembers where each key came from."""
    if not isinstance(base, dict) or not isinstance(override, dict):
        return override
    data, paths = {}, {}
    for key, value in base.items():
        data[key], paths[key] = value, _child_path(base, base_path, key)
    for key, value in override.items():
        child = _child_path(override, override_path, key)
        if key in data and isinstance(data[key], dict) and isinstance(value, dict):
            data[key] = deep_merge(data[key], paths[key], value, child)
        else:
            data[key] = value
        paths[key] = child
    return Sourced(data, paths)


def _child_path(parent: Any, path: str, key: str) -> str:
    if isinstance(parent, Sourced) and key in parent.paths:
        return parent.paths[key]
    return f"{path}.{key}" if path else str(key)


def key_of(field: dataclasses.Field) -> str:
    return field.metadata.get("key", field.name)


def describe(tp: Any) -> str:
    """What a type expects, in words for people."""
    if tp is Size:
        return "a size such as 64MB"
    if tp is Duration:
        return "a duration such as 30s"
    if tp is ipaddress.IPv4Address:
        return "an IPv4 address such as 172.20.0.2"
    if tp is ipaddress.IPv4Network:
        return "an IPv4 subnet such as 172.20.0.0/16"
    if tp is bool:
        return "true or false"
    if tp is int:
        return "a whole number"
    if tp is float:
        return "a number"
    if tp is str:
        return "a text"
    origin = get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in get_args(tp))
    if origin is list:
        return f"a list of {describe(get_args(tp)[0]).removeprefix('a ').removeprefix('an ')}s"
    if origin is dict:
        return "a mapping"
    if origin in (Union, types.UnionType):
        return " or ".join(describe(a) for a in get_args(tp) if a is not type(None))
    if dataclasses.is_dataclass(tp):
        return "a mapping with keys " + ", ".join(key_of(f) for f in dataclasses.fields(tp))
    return getattr(tp, "__name__", str(tp))


def _found(value: Any) -> str:
    if isinstance(value, dict):
        return "a mapping"
    if isinstance(value, list):
        return "a list"
    return repr(value)


def build(tp: Any, value: Any, path: str, problems: Problems) -> Any:
    """Check `value` against type `tp`; return the typed value, or MISSING after recording why."""
    origin = get_origin(tp)
    if origin in (Union, types.UnionType):
        options = get_args(tp)
        if value is None and type(None) in options:
            return None
        for option in options:
            if option is type(None):
                continue
            trial = Problems()
            built = build(option, value, path, trial)
            if not trial:
                return built
        problems.add(path, f"expected {describe(tp)}, got {_found(value)}")
        return MISSING
    if value is None:
        problems.add(path, f"missing value; expected {describe(tp)}")
        return MISSING
    if dataclasses.is_dataclass(tp) and tp not in (Size, Duration):
        return _build_dataclass(tp, value, path, problems)
    if origin is list:
        if not isinstance(value, list):
            problems.add(path, f"expected {describe(tp)}, got {_found(value)}")
            return MISSING
        (item_tp,) = get_args(tp)
        items = [build(item_tp, v, f"{path}[{i}]", problems) for i, v in enumerate(value)]
        return MISSING if any(i is MISSING for i in items) else items
    if origin is dict:
        if not isinstance(value, dict):
            problems.add(path, f"expected a mapping, got {_found(value)}")
            return MISSING
        _, item_tp = get_args(tp)
        out = {}
        for k, v in value.items():
            child = _child_path(value, path, k)
            if not isinstance(k, str):
                problems.add(child, f"keys must be text, got {k!r}")
                continue
            out[k] = build(item_tp, v, child, problems)
        return MISSING if any(v is MISSING for v in out.values()) else out
    if origin is Literal:
        allowed = get_args(tp)
        if value not in allowed:
            close = difflib.get_close_matches(str(value), [str(a) for a in allowed], n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            problems.add(path, f"expected {describe(tp)}, got {_found(value)}{hint}")
            return MISSING
        return value
    return _build_scalar(tp, value, path, problems)


def _build_scalar(tp: Any, value: Any, path: str, problems: Problems) -> Any:
    try:
        if tp in (Size, Duration):
            return tp.parse(value)
        if tp is ipaddress.IPv4Address:
            return ipaddress.IPv4Address(str(value))
        if tp is ipaddress.IPv4Network:
            return ipaddress.IPv4Network(str(value), strict=True)
    except UnitError as exc:
        problems.add(path, str(exc))
        return MISSING
    except ValueError:
        problems.add(path, f"expected {describe(tp)}, got {_found(value)}")
        return MISSING
    if tp is bool and isinstance(value, bool):
        return value
    if tp is int and isinstance(value, int) and not isinstance(value, bool):
        return value
    if tp is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if tp is str and isinstance(value, str):
        return value
    problems.add(path, f"expected {describe(tp)}, got {_found(value)}")
    return MISSING


def _build_dataclass(tp: Any, value: Any, path: str, problems: Problems) -> Any:
    if not isinstance(value, dict):
        problems.add(path, f"expected {describe(tp)}, got {_found(value)}")
        return MISSING
    fields = {key_of(f): f for f in dataclasses.fields(tp) if f.init}
    hints = get_type_hints(tp)
    for key in value:
        if key not in fields:
            close = difflib.get_close_matches(str(key), list(fields), n=1, cutoff=0.6)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            known = ", ".join(fields)
            problems.add(_child_path(value, path, key), f"unknown key{hint}; known keys: {known}")
    kwargs, broken = {}, False
    for key, field in fields.items():
        child = _child_path(value, path, key)
        if key not in value:
            has_default = (
                field.default is not dataclasses.MISSING
                or field.default_factory is not dataclasses.MISSING
            )
            if not has_default:
                problems.add(child, f"missing; expected {describe(hints[field.name])}")
                broken = True
            continue
        built = build(hints[field.name], value[key], child, problems)
        if built is MISSING:
            broken = True
        else:
            kwargs[field.name] = built
    return MISSING if broken else tp(**kwargs)


def field_key(key: str, **kw) -> Any:
    """A dataclass field whose YAML key differs from its Python name (e.g. 'pre-deploy')."""
    return dataclasses.field(metadata={"key": key}, **kw)
