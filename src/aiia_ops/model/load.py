"""Loading the stack file: safe YAML (duplicate keys refused) -> typed, validated Stack."""

from __future__ import annotations

import os
from pathlib import Path

import yaml

from aiia_ops import DEFAULT_STACK
from aiia_ops.errors import OpsError
from aiia_ops.model.placement import placement_checks
from aiia_ops.model.profiles import load_profiled
from aiia_ops.model.schema import MISSING, Problems, build, deep_merge
from aiia_ops.model.types import Environment, Stack, StackError
from aiia_ops.model.validate import cross_checks

# The environment keys that only make sense per environment, not in the shared `app` block.
_ENV_ONLY = ("container", "address", "standby_address", "domains", "database", "redis_db")


class _UniqueKeyLoader(yaml.SafeLoader):
    """Safe YAML, and a key given twice in one mapping is an error, not a silent overwrite."""


def _construct_mapping(loader, node, deep=False):
    seen = {}
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        if key in seen:
            raise yaml.constructor.ConstructorError(
                None,
                None,
                f"key {key!r} appears twice (first on line {seen[key]})",
                key_node.start_mark,
            )
        seen[key] = key_node.start_mark.line + 1
    return yaml.SafeLoader.construct_mapping(loader, node, deep)


_UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


def parse_yaml(text: str, source: str) -> dict:
    try:
        data = yaml.load(text, Loader=_UniqueKeyLoader)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f":{mark.line + 1}:{mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc)
        raise StackError(f"{source}{where}", [f"not valid YAML: {problem}"]) from None
    if not isinstance(data, dict):
        raise StackError(source, ["expected a mapping of top-level keys (project, machine, ...)"])
    return data


def load_stack(path: Path | str | None = None, profile: str | None = None) -> Stack:
    """The stack file: `path`, else $AIIA_STACK, else deploy/stack.yml; with `profile`
    (else $AIIA_PROFILE) laid over it (model/profiles.py)."""
    path = Path(path or os.environ.get("AIIA_STACK") or DEFAULT_STACK)
    try:
        text = path.read_text()
    except OSError as exc:
        raise OpsError(
            f"cannot read the stack file {path}: {exc.strerror}; "
            f"pass an existing file with --stack PATH"
        ) from None
    data = parse_yaml(text, str(path))
    if profile := profile or os.environ.get("AIIA_PROFILE"):
        return load_profiled(data, path, profile, parse_yaml, stack_from_data)
    return stack_from_data(data, str(path))


def stack_from_data(data: dict, source: str = "stack") -> Stack:
    problems = Problems()
    data = dict(data)
    app = data.pop("app", None)
    raw_envs = data.pop("environments", None)
    if app is not None and not isinstance(app, dict):
        problems.add("app", "expected a mapping of the settings every environment shares")
        app = {}
    for key in _ENV_ONLY:
        if isinstance(app, dict) and key in app:
            problems.add(f"app.{key}", "differs per environment; set it under environments.<name>")
    data["environments"] = {}
    stack = build(Stack, data, "", problems)
    environments = {}
    if not isinstance(raw_envs, dict) or not raw_envs:
        problems.add(
            "environments",
            "missing; expected a mapping of environment names (prod, staging) to their settings",
        )
    else:
        for name, overrides in raw_envs.items():
            merged = deep_merge(app or {}, "app", overrides or {}, f"environments.{name}")
            env = build(Environment, merged, f"environments.{name}", problems)
            if env is not MISSING:
                object.__setattr__(env, "name", name)
                environments[name] = env
    if stack is not MISSING:
        object.__setattr__(stack, "environments", environments)
        object.__setattr__(stack, "source", source)
        for name in ("nginx", "pgbouncer", "postgresql", "redis"):
            object.__setattr__(getattr(stack.services, name), "name", name)
        if len(environments) == len(raw_envs or {}):
            cross_checks(stack, problems)
            placement_checks(stack, problems)
    if problems:
        raise StackError(source, problems.lines())
    return stack
