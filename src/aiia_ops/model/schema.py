"""Build typed dataclasses from parsed YAML, collecting every problem with its key path.

One small engine serves the whole model: it reads the type hints of a dataclass and checks
each value against them. Problems are collected, never raised one at a time, so a broken
stack file is reported in one go, one line per problem:

    services.redis.memory.limit: expected a size such as 64MB (units B, KB, MB, GB), got '12XB'
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import ipaddress
import math
import re
import types
from typing import Annotated, Any, Literal, Union, get_args, get_origin, get_type_hints

from aiia_ops.model.units import Duration, Size, UnitError

MISSING = object()

# Numbers the model accepts: whole numbers within 64 bits, finite floats within 2**53 (so
# that no later float conversion overflows and no NaN compares False and silences a check).
MAX_INT = 2**63 - 1
MAX_FLOAT = float(2**53)
MAX_SIZE_BYTES = 2**50  # 1 PB: far above any machine, far below an overflow
MAX_DURATION_SECONDS = 3650 * 86400  # ten years
_PLAIN_KEY = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_-]*")


@dataclasses.dataclass(frozen=True)
class Match:
    """A text constraint for `Annotated[str, Match(...)]`: the whole value matches `pattern`.

    `says` is the rule in words, shown after the offending value:
        services.nginx.container: '--privileged': a container name is ...
    """

    pattern: str
    says: str

    def problem(self, value: str) -> str | None:
        if re.fullmatch(self.pattern, value):
            return None
        return f"{shown(value)}: {self.says}"


@dataclasses.dataclass(frozen=True)
class LongText:
    """`Annotated[str, LongText(n), ...]`: text of up to n characters instead of the 1000 every
    other string may have (a PEM certificate is longer)."""

    limit: int


def shown(value: Any, limit: int = 60) -> str:
    """repr() of a value for a message: control characters escaped, long values cut."""
    try:
        text = repr(value)
    except ValueError:  # an int past Python's 4300-digit conversion limit
        return f"a number of about {int(value.bit_length() * 0.30103)} digits"
    except RecursionError:
        return "a value nested too deep"
    if len(text) > limit:
        text = f"{text[: limit - 3]}... ({len(text)} characters)"
    return text


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


def deep_merge(base: Any, base_path: str, override: Any, override_path: str, depth: int = 0) -> Any:
    """Override's keys win; nested dicts merge. Remembers where each key came from.
    Below 50 levels (data no stack file has) the override wins whole: no RecursionError."""
    if not isinstance(base, dict) or not isinstance(override, dict) or depth > 50:
        return override
    data, paths = {}, {}
    for key, value in base.items():
        data[key], paths[key] = value, _child_path(base, base_path, key)
    for key, value in override.items():
        child = _child_path(override, override_path, key)
        if key in data and isinstance(data[key], dict) and isinstance(value, dict):
            data[key] = deep_merge(data[key], paths[key], value, child, depth + 1)
        else:
            data[key] = value
        paths[key] = child
    return Sourced(data, paths)


def _child_path(parent: Any, path: str, key: Any) -> str:
    if isinstance(parent, Sourced) and _hashable(key) and key in parent.paths:
        return parent.paths[key]
    return child_path(path, key)


def child_path(path: str, key: Any) -> str:
    """`path.key`; a key that is not plain text (a newline, a dot, a number) as `path[repr]`,
    so a hostile key can never forge a line or another path in a message."""
    if isinstance(key, str) and _PLAIN_KEY.fullmatch(key) and len(key) <= 64:
        return f"{path}.{key}" if path else key
    return f"{path}[{shown(key)}]"


def _hashable(key: Any) -> bool:
    try:
        hash(key)
    except TypeError:
        return False
    return True


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
    if origin is Annotated:
        return describe(get_args(tp)[0])
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
    return shown(value)


def _number_problem(value: Any) -> str | None:
    """Why a number read from the file cannot be used, or None."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    if isinstance(value, float) and not math.isfinite(value):
        return f"{value!r} is not a number; expected a finite number"
    limit = MAX_INT if isinstance(value, int) else MAX_FLOAT
    if abs(value) > limit:
        return f"{shown(value)} is too large; expected a number between {-limit:g} and {limit:g}"
    return None


def _constrained(tp: Any, value: Any, path: str, problems: Problems) -> Any:
    base, *rules = get_args(tp)
    long = next((r for r in rules if isinstance(r, LongText)), None)
    if long and base is str and isinstance(value, str):
        if len(value) > long.limit:
            problems.add(
                path, f"{shown(value)} is too long; expected at most {long.limit} characters"
            )
            return MISSING
        built = value
    else:
        built = build(base, value, path, problems)
    if built is MISSING:
        return MISSING
    for rule in rules:
        problem = rule.problem(built) if isinstance(rule, Match) else None
        if problem:
            problems.add(path, problem)
            return MISSING
    return built


def build(tp: Any, value: Any, path: str, problems: Problems) -> Any:
    """Check `value` against type `tp`; return the typed value, or MISSING after recording why."""
    origin = get_origin(tp)
    if origin is Annotated:
        return _constrained(tp, value, path, problems)
    if origin in (Union, types.UnionType):
        options = get_args(tp)
        if value is None and type(None) in options:
            return None
        trials = []
        for option in options:
            if option is type(None):
                continue
            trial = Problems()
            built = build(option, value, path, trial)
            if not trial:
                return built
            trials.append(trial)
        if len(trials) == 1 and get_origin(options[0]) is Annotated:
            problems.extend(p for p in trials[0] if p not in problems)  # the rule's own words
        else:
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
        key_tp, item_tp = get_args(tp)
        out, broken = {}, False
        for k, v in value.items():
            if not isinstance(k, str):
                problems.add(path, f"keys must be text, got {_found(k)}")
                broken = True
                continue
            if build(key_tp, k, path, problems) is MISSING:
                broken = True
                continue
            out[k] = build(item_tp, v, _child_path(value, path, k), problems)
        return MISSING if broken or any(v is MISSING for v in out.values()) else out
    if origin is Literal:
        allowed = get_args(tp)
        if (
            not _hashable(value)
            or value not in allowed
            or type(value) is not type(allowed[allowed.index(value)])
        ):
            said = value[:100] if isinstance(value, str) else ""
            close = difflib.get_close_matches(said, [str(a) for a in allowed], n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            problems.add(path, f"expected {describe(tp)}, got {_found(value)}{hint}")
            return MISSING
        return value
    return _build_scalar(tp, value, path, problems)


def _build_scalar(tp: Any, value: Any, path: str, problems: Problems) -> Any:
    number = _number_problem(value)
    if number:
        problems.add(path, number)
        return MISSING
    if isinstance(value, (dict, list)):  # no scalar is built from one (nor shown: it may nest)
        problems.add(path, f"expected {describe(tp)}, got {_found(value)}")
        return MISSING
    if isinstance(value, str) and len(value) > 1000:
        problems.add(path, f"{shown(value)} is too long; expected at most 1000 characters")
        return MISSING
    try:
        if tp is Size:
            parsed = Size.parse(value)
            if not 0 <= parsed.bytes <= MAX_SIZE_BYTES:
                raise OverflowError
            return parsed
        if tp is Duration:
            parsed = Duration.parse(value)
            if not 0 <= parsed.seconds <= MAX_DURATION_SECONDS:
                raise OverflowError
            return parsed
        if tp is ipaddress.IPv4Address:
            if not isinstance(value, str):
                raise ValueError
            return ipaddress.IPv4Address(value)
        if tp is ipaddress.IPv4Network:
            if not isinstance(value, str):
                raise ValueError
            return ipaddress.IPv4Network(value, strict=True)
    except UnitError as exc:
        problems.add(path, str(exc))
        return MISSING
    except OverflowError:
        most = "1024TB" if tp is Size else "3650d"
        problems.add(path, f"{_found(value)} is too large; expected at most {most}")
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
    fields, hints = _fields(tp)
    for key in value:
        if not isinstance(key, str) or key not in fields:
            close = difflib.get_close_matches(str(key)[:100], list(fields), n=1, cutoff=0.6)
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


@functools.cache
def _fields(tp: type) -> tuple[dict[str, dataclasses.Field], dict[str, Any]]:
    """A dataclass's fields by YAML key, and its type hints (resolved once: it is slow)."""
    fields = {key_of(f): f for f in dataclasses.fields(tp) if f.init}
    return fields, get_type_hints(tp, include_extras=True)


def field_key(key: str, **kw) -> Any:
    """A dataclass field whose YAML key differs from its Python name (e.g. 'pre-deploy')."""
    return dataclasses.field(metadata={"key": key}, **kw)
