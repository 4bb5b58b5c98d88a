"""The package's layers, checked from its source: imports only point down, and no cycles.

    tasks -> flows -> host -> commands -> model        (aiia_ops and aiia_ops.errors: anyone)

A module's folder says what it may touch (docs/architecture.md). Every import counts,
function-level ones included: a cycle hidden inside a function is still a cycle.
"""

from __future__ import annotations

import ast
from pathlib import Path

from aiia_ops import REPO_ROOT

PACKAGE = REPO_ROOT / "src" / "aiia_ops"
LAYERS = ("model", "commands", "host", "flows", "tasks")
ROOT_MODULES = {"aiia_ops", "aiia_ops.errors"}
TASK_LINES = 150  # options -> load -> one flow call -> output; a little more for help texts


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def all_modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def imports_of(name: str, path: Path, known: set[str]) -> set[str]:
    """The package modules `name` imports (a `from pkg import sub` names the submodule)."""
    out: set[str] = set()
    is_pkg = path.name == "__init__.py"
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names if a.name.startswith("aiia_ops"))
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = name.split(".") if is_pkg else name.split(".")[:-1]
                base = base[: len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if not target.startswith("aiia_ops"):
                continue
            subs = {f"{target}.{a.name}" for a in node.names} & known
            out.update(subs or {target})
    return {m for m in out if m in known and m != name}


def layer(name: str) -> int | None:
    if name in ROOT_MODULES:
        return None
    part = name.split(".")[1]
    assert part in LAYERS, f"{name}: every module lives in one of {LAYERS} (or is errors.py)"
    return LAYERS.index(part)


def graph() -> dict[str, set[str]]:
    modules = all_modules()
    known = set(modules)
    return {name: imports_of(name, path, known) for name, path in modules.items()}


def test_every_module_is_in_a_layer():
    for name in all_modules():
        layer(name)


def test_no_module_imports_from_a_higher_layer():
    upward = []
    for name, deps in graph().items():
        mine = layer(name)
        for dep in sorted(deps):
            theirs = layer(dep)
            if mine is not None and theirs is not None and theirs > mine:
                upward.append(f"{name} imports {dep} ({LAYERS[mine]} -> {LAYERS[theirs]})")
            if mine is None and theirs is not None:
                upward.append(f"{name} (imported by every layer) imports {dep}")
    assert upward == []


def strongly_connected(g: dict[str, set[str]]) -> list[list[str]]:
    """Tarjan's algorithm, iteratively: the groups of modules that import each other."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    groups: list[list[str]] = []
    counter = 0
    for start in g:
        if start in index:
            continue
        work = [(start, iter(sorted(g[start])))]
        index[start] = low[start] = counter
        counter += 1
        stack.append(start)
        on_stack.add(start)
        while work:
            node, children = work[-1]
            for child in children:
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(g[child]))))
                    break
                if child in on_stack:
                    low[node] = min(low[node], index[child])
            else:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[node])
                if low[node] == index[node]:
                    group = []
                    while True:
                        member = stack.pop()
                        on_stack.discard(member)
                        group.append(member)
                        if member == node:
                            break
                    if len(group) > 1:
                        groups.append(sorted(group))
    return groups


def test_there_are_no_import_cycles():
    assert strongly_connected(graph()) == []


def test_the_cycle_finder_finds_a_cycle():
    assert strongly_connected({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_commands_and_model_run_nothing():
    """The pure layers import no process, socket or SSH library."""
    forbidden = {"subprocess", "socket", "paramiko", "fabric", "invoke", "http", "urllib",
                 "sqlite3", "docker", "shutil", "tempfile", "fcntl"}  # fmt: skip
    found = []
    for name, path in all_modules().items():
        if layer(name) not in (LAYERS.index("model"), LAYERS.index("commands")):
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name.split(".")[0] for a in node.names]
            elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
                names = [node.module.split(".")[0]]
            found += [f"{name} imports {n}" for n in names if n in forbidden]
    assert found == []


def test_task_modules_are_thin():
    fat = [
        f"{p.relative_to(PACKAGE)}: {n} lines"
        for p in sorted((PACKAGE / "tasks").glob("*.py"))
        if (n := len(p.read_text().splitlines())) > TASK_LINES
    ]
    assert fat == []


def calls_outside(allowed: set[str], match) -> list[str]:
    """`file:line` of every AST node `match` accepts in a module not in `allowed`."""
    found = []
    for name, path in all_modules().items():
        if any(name == a or name.startswith(a + ".") for a in allowed):
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if match(node):
                found.append(f"{path.relative_to(PACKAGE)}:{node.lineno}")
    return found


def is_docker_argv(node) -> bool:
    """A list literal that starts with "docker": an engine command spelled out."""
    return (
        isinstance(node, ast.List)
        and bool(node.elts)
        and isinstance(node.elts[0], ast.Constant)
        and node.elts[0].value == "docker"
    )


def test_docker_argv_are_built_only_in_commands():
    assert calls_outside({"aiia_ops.commands"}, is_docker_argv) == []


def is_call_to(*names: str):
    def match(node) -> bool:
        if not isinstance(node, ast.Call):
            return False
        f = node.func
        dotted = f.attr if isinstance(f, ast.Attribute) else getattr(f, "id", "")
        if isinstance(f, ast.Attribute) and isinstance(f.value, ast.Name):
            dotted = f"{f.value.id}.{f.attr}"
        return dotted in names

    return match


def test_one_atomic_write():
    """Files are replaced only by host/files.atomic_write (the SSH runner's SFTP rename is
    the same write on a remote host)."""
    renames = is_call_to("os.replace", "os.rename")
    assert calls_outside({"aiia_ops.host.files"}, renames) == []


def test_one_lock():
    assert calls_outside({"aiia_ops.host.lock"}, is_call_to("fcntl.flock", "fcntl.lockf")) == []


def test_the_checks_see_what_they_look_for():
    tree = ast.parse('x = ["docker", "ps"]\nos.replace(a, b)\nfcntl.flock(f, 1)')
    nodes = list(ast.walk(tree))
    assert any(is_docker_argv(n) for n in nodes)
    assert any(is_call_to("os.replace")(n) for n in nodes)
    assert any(is_call_to("fcntl.flock")(n) for n in nodes)
