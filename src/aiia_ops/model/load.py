"""Loading the stack file: safe YAML (duplicate keys refused) -> typed, validated Stack."""

from __future__ import annotations

import os
import re
from pathlib import Path

import yaml

from aiia_ops import DEFAULT_STACK
from aiia_ops.errors import OpsError
from aiia_ops.model.placement import placement_checks
from aiia_ops.model.profiles import load_profiled
from aiia_ops.model.schema import MISSING, Problems, build, deep_merge
from aiia_ops.model.types import Environment, Stack, StackError
from aiia_ops.model.validate import cross_checks, valid_name

# The environment keys that only make sense per environment, not in the shared `app` block.
_ENV_ONLY = ("container", "address", "standby_address", "domains", "database", "redis_db")


# Hostile files are refused before they cost time or memory: a stack file is a few KB.
MAX_FILE_BYTES = 256 * 1024
MAX_DEPTH = 50  # nesting of mappings and lists (the stack file uses 5)
MAX_NODES = 100_000  # nodes after expanding aliases (the stack file has ~500)
MAX_ALIASES = 1_000


class _SafeLoader(yaml.SafeLoader):
    """Safe YAML with limits, and a key given twice in one mapping is an error, not a silent
    overwrite. Aliases (*name) are counted at their expanded size while the document is
    composed, so a billion-laughs bomb stops at the first node over MAX_NODES instead of
    being expanded; nesting deeper than MAX_DEPTH stops before Python's recursion limit."""

    def __init__(self, stream):
        super().__init__(stream)
        self._sizes: dict[int, int] = {}  # id(node) -> its size with aliases expanded
        self._open: list[int] = [0]  # running sizes of the nodes being composed
        self._composing: set[int] = set()  # anchors of nodes not finished yet
        self._aliases = 0

    def _refuse(self, problem: str, mark) -> None:
        raise yaml.composer.ComposerError(None, None, problem, mark)

    def _grow(self, size: int, mark) -> None:
        self._open[-1] += size
        if self._open[-1] > MAX_NODES or sum(self._open) > MAX_NODES:
            self._refuse(
                f"more than {MAX_NODES} values once aliases are expanded "
                "(an alias bomb?); write the values out or use fewer aliases",
                mark,
            )

    def compose_node(self, parent, index):
        event = self.peek_event()
        if isinstance(event, yaml.AliasEvent):
            target = self.anchors.get(event.anchor)
            if target is not None:
                self._aliases += 1
                if self._aliases > MAX_ALIASES:
                    self._refuse(f"more than {MAX_ALIASES} aliases", event.start_mark)
                if event.anchor in self._composing:
                    self._refuse(
                        f"alias *{event.anchor} refers to a value that contains it",
                        event.start_mark,
                    )
                self._grow(self._sizes.get(id(target), 1), event.start_mark)
            return super().compose_node(parent, index)
        if len(self._open) > MAX_DEPTH:
            self._refuse(
                f"nested more than {MAX_DEPTH} levels deep; the stack file needs 5",
                event.start_mark,
            )
        self._open.append(1)
        anchor = getattr(event, "anchor", None)
        pending = anchor is not None and isinstance(
            event, (yaml.MappingStartEvent, yaml.SequenceStartEvent)
        )
        if pending:
            self._composing.add(anchor)
        node = super().compose_node(parent, index)
        if pending:
            self._composing.discard(anchor)
        size = self._open.pop()
        self._sizes[id(node)] = size
        self._grow(size, event.start_mark)
        return node

    def construct_yaml_int(self, node):
        try:
            return super().construct_yaml_int(node)
        except ValueError:  # more digits than Python converts (4300)
            digits = f"{node.value[:56]}... ({len(node.value)} characters)"
            raise yaml.constructor.ConstructorError(
                None, None, f"{digits} is not a usable number", node.start_mark
            ) from None


def _construct_mapping(loader, node, deep=False):
    seen = {}
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        try:
            hash(key)
        except TypeError:
            raise yaml.constructor.ConstructorError(
                None,
                None,
                "a key is a mapping or a list; expected a name",
                key_node.start_mark,
            ) from None
        if key in seen:
            raise yaml.constructor.ConstructorError(
                None,
                None,
                f"key {key!r} appears twice (first on line {seen[key]})",
                key_node.start_mark,
            )
        seen[key] = key_node.start_mark.line + 1
    return yaml.SafeLoader.construct_mapping(loader, node, deep)


_SafeLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)
_SafeLoader.add_constructor("tag:yaml.org,2002:int", _SafeLoader.construct_yaml_int)
_UniqueKeyLoader = _SafeLoader  # the name it had before it had limits


# Quoted texts and comments, which may hold brackets that open nothing.
_NOT_FLOW = re.compile(r"'(?:[^']|'')*'|\"(?:[^\"\\]|\\.)*\"|(?:^|(?<=\s))#[^\n]*", re.M)


def _flow_depth(text: str) -> tuple[int, int]:
    """How deep [ and { nest (outside quotes and comments), and where that depth is first
    passed. The YAML scanner looks ahead across every open bracket on a line, so ten
    thousand of them cost it half a second before the composer's depth limit is reached."""
    depth = 0
    for match in re.finditer(r"[\[\]{}]", _NOT_FLOW.sub(lambda m: " " * len(m[0]), text)):
        depth += 1 if match[0] in "[{" else -1
        if depth > MAX_DEPTH:
            return depth, match.start()
    return depth, -1


def _read_text(path: Path) -> str:
    """At most MAX_FILE_BYTES of UTF-8 text (OSError when it cannot be read)."""
    with path.open("rb") as f:
        raw = f.read(MAX_FILE_BYTES + 1)
    if len(raw) > MAX_FILE_BYTES:
        raise StackError(
            str(path), [f"larger than {MAX_FILE_BYTES} bytes; a stack file is a few KB"]
        )
    try:
        return raw.decode()
    except UnicodeDecodeError as exc:
        raise StackError(
            str(path), [f"not UTF-8 text (byte {exc.start}); save it as UTF-8"]
        ) from None


def parse_yaml(text: str, source: str) -> dict:
    if len(text) > MAX_FILE_BYTES:
        raise StackError(
            source,
            [f"larger than {MAX_FILE_BYTES} characters; a stack file is a few KB"],
        )
    _, at = _flow_depth(text)
    if at >= 0:
        line = text.count("\n", 0, at) + 1
        column = at - (text.rfind("\n", 0, at) + 1) + 1
        raise StackError(
            f"{source}:{line}:{column}",
            [f"not valid YAML: nested more than {MAX_DEPTH} levels deep; the stack file needs 5"],
        )
    try:
        data = yaml.load(text, Loader=_SafeLoader)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f":{mark.line + 1}:{mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc)
        raise StackError(f"{source}{where}", [f"not valid YAML: {problem}"]) from None
    except RecursionError:  # a guard above should have stopped it first
        raise StackError(
            source, [f"not valid YAML: nested too deep (at most {MAX_DEPTH})"]
        ) from None
    if not isinstance(data, dict):
        raise StackError(source, ["expected a mapping of top-level keys (project, machine, ...)"])
    return data


def load_stack(path: Path | str | None = None, profile: str | None = None) -> Stack:
    """The stack file: `path`, else $AIIA_STACK, else deploy/stack.yml; with `profile`
    (else $AIIA_PROFILE) laid over it (model/profiles.py)."""
    path = Path(path or os.environ.get("AIIA_STACK") or DEFAULT_STACK)
    try:
        text = _read_text(path)
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
        if not hasattr(raw_envs, "__len__"):  # a number: len() below would raise
            raw_envs = [raw_envs]
    else:
        for name, overrides in raw_envs.items():
            if not valid_name(name, "environments", problems):
                continue
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
