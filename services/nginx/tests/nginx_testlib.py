"""Render the nginx templates with the project's real model and renderer.

Only the nginx entries of `aiia_ops.render.TEMPLATES` are rendered, so these tests do not
depend on the other services' templates. Secrets are fakes: nginx's templates use none.
"""

from __future__ import annotations

from pathlib import Path
from unittest import mock

from aiia_ops import DEFAULT_STACK, render
from aiia_ops.model import Stack, load_stack
from aiia_ops.secrets import EnvSecrets, Secrets

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
