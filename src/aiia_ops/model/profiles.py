"""Machine profiles: overlays of the stack file for a bigger machine or several hosts.

A profile is a YAML file next to the stack file, `profiles/<name>.yml` (for
deploy/stack.yml: deploy/profiles/1gb.yml, deploy/profiles/2gb-4cpu.yml), chosen with
`--profile NAME` or $AIIA_PROFILE. It holds only what differs from the stack file and is
laid over it before anything is checked, so the merged stack goes through the same
validation and budget check as the stack file alone. The overlay rules (`overlay`):

- a mapping merges key by key, at every depth;
- anything else, lists included, replaces the stack file's value whole: a list is an
  ordered value (domains, ports, instances, a healthcheck command) that a profile states
  in full, never patched item by item;
- `null` removes the key (a host the profile does not use: `hosts: {local: null}`).

A problem in the merged stack names the file that holds its key: the profile when the
profile sets that key (or a list or value above it), else the stack file.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

from aiia_ops.errors import OpsError
from aiia_ops.model.types import Stack, StackError

PROFILES_DIR = "profiles"
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
_PATH = re.compile(r"^[A-Za-z0-9_-]+(?:\[\d+\])*(?:\.[A-Za-z0-9_-]+(?:\[\d+\])*)*$")
_STEP = re.compile(r"([^.\[\]]+)|\[(\d+)\]")


def profiles_dir(stack_path: Path) -> Path:
    return Path(stack_path).parent / PROFILES_DIR


def profile_names(stack_path: Path) -> list[str]:
    folder = profiles_dir(stack_path)
    return sorted(p.stem for p in folder.glob("*.yml")) if folder.is_dir() else []


def profile_path(stack_path: Path, name: str) -> Path:
    """The file of profile `name`, or an error naming the profiles there are."""
    names = profile_names(stack_path)
    if name not in names or not _NAME.match(name):
        known = ", ".join(names) if names else f"none ({profiles_dir(stack_path)} has no .yml)"
        raise OpsError(f"unknown profile {name!r}; expected one of: {known}")
    return profiles_dir(stack_path) / f"{name}.yml"


def overlay(base: Any, profile: Any) -> Any:
    """The profile laid over the base: mappings merge, `null` removes, the rest replaces."""
    if not isinstance(base, dict) or not isinstance(profile, dict):
        return profile
    out = dict(base)
    for key, value in profile.items():
        if value is None:
            out.pop(key, None)
        elif isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = overlay(out[key], value)
        else:
            out[key] = value
    return out


def steps(path: str) -> list[str | int]:
    """`environments.prod.instances[1].host` -> ['environments', 'prod', 'instances', 1, 'host']."""
    return [int(index) if index else key for key, index in _STEP.findall(path)]


def sets(profile: dict, path: str, base: dict | None = None) -> bool:
    """Whether `path` is the profile's: it holds the key itself, or a list or value above
    it that replaced the stack file's whole, or (given the stack file's data) a mapping
    above it that only the profile has (a host the profile adds)."""
    node: Any = profile
    under: Any = base
    for step in steps(path):
        if not isinstance(node, dict):
            return True  # a list or a value the profile set, above this key
        if step not in node:
            return False
        if base is not None and (not isinstance(under, dict) or step not in under):
            return True  # a mapping the stack file does not have: all of it is the profile's
        node = node[step]
        under = under[step] if isinstance(under, dict) else None
    return True


def attribute(
    error: StackError, base: dict, profile: dict, stack_file: str, profile_file: str
) -> StackError:
    """The merged stack's problems, each prefixed with the file that holds its key."""
    lines = []
    for line in error.problems:
        path, sep, _ = line.partition(": ")
        if sep and _PATH.match(path):
            owner = profile_file if sets(profile, path, base) else stack_file
            lines.append(f"{owner}: {line}")
        else:
            lines.append(line)
    return StackError(f"{stack_file} with profile {profile_file}", lines)


def load_profiled(
    data: dict,
    stack_path: Path,
    name: str,
    parse: Callable[[str, str], dict],
    build: Callable[[dict, str], Stack],
) -> Stack:
    """The stack file's data with profile `name` laid over it, checked as one stack.
    `parse` and `build` are model/load.py's (passed in: load.py calls this module)."""
    path = profile_path(stack_path, name)
    try:
        text = path.read_text()
    except OSError as exc:
        raise OpsError(f"cannot read the profile {path}: {exc.strerror}") from None
    profile = parse(text, str(path))
    try:
        stack = build(overlay(data, profile), str(stack_path))
    except StackError as exc:
        raise attribute(exc, data, profile, str(stack_path), str(path)) from None
    object.__setattr__(stack, "profile", str(path))
    return stack
