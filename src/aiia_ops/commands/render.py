"""Render every service's config from the model: jinja2 templates in services/<name>/templates.

`render_stack()` returns {relative path: RenderedFile}; writing them is
`host.files.write_rendered()`.
The compose file is not a template: it is built as data in compose.py and dumped.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from aiia_ops import SERVICES_DIR
from aiia_ops.commands import pgbackrest, redis_acl
from aiia_ops.commands.templating import render_file
from aiia_ops.model import Environment, Stack
from aiia_ops.model.secrets import Secrets

# UID/GID every service image runs as (services/base/Dockerfile).
SERVICE_UID = 10001


@dataclass(frozen=True)
class Template:
    service: str  # folder under services/
    template: str  # file under services/<service>/templates/
    output: str  # path under the render dir; "{env}" for per-environment files
    per_env: bool = False
    secret: bool = False  # holds secrets: 0640, owned by the service user


TEMPLATES = (
    Template("nginx", "nginx.conf.j2", "nginx/nginx.conf"),
    Template("nginx", "default.conf.j2", "nginx/conf.d/00-default.conf"),
    Template("nginx", "app.conf.j2", "nginx/conf.d/{env}.conf", per_env=True),
    Template("nginx", "status.conf.j2", "nginx/conf.d/status.conf"),
    Template("postgres", "postgresql.conf.j2", "postgresql/postgresql.conf"),
    Template("postgres", "pg_hba.conf.j2", "postgresql/pg_hba.conf"),
    Template("pgbouncer", "pgbouncer.ini.j2", "pgbouncer/pgbouncer.ini"),
    Template("pgbouncer", "userlist.txt.j2", "pgbouncer/userlist.txt", secret=True),
    Template("redis", "redis.conf.j2", "redis/redis.conf", secret=True),
    Template("django", "gunicorn.conf.py.j2", "app-{env}/gunicorn.conf.py", per_env=True),
)

# Which model entry a template folder renders for (its `svc`).
_SVC = {"nginx": "nginx", "postgres": "postgresql", "pgbouncer": "pgbouncer", "redis": "redis"}


@dataclass(frozen=True)
class RenderedFile:
    text: str
    secret: bool = False


def default_upstreams(stack: Stack) -> dict[str, str]:
    return {e.name: f"{e.address}:{e.port}" for e in stack.environments.values()}


def render_stack(
    stack: Stack,
    secrets: Secrets,
    envs: list[str] | None = None,
    upstreams: dict[str, str] | None = None,
    services_dir: Path = SERVICES_DIR,
) -> dict[str, RenderedFile]:
    """Every config file; per-environment ones only for `envs` (default: all)."""
    selected = [stack.environment(e) for e in envs] if envs else list(stack.environments.values())
    context = {
        "stack": stack,
        "envs": stack.environments,
        "upstreams": {**default_upstreams(stack), **(upstreams or {})},
        "secrets": secrets,
        "status_domain": stack.status_domain,
        "redis_users": redis_acl.conf_lines(stack, secrets),
        "archiving": pgbackrest.postgres_settings(stack),
    }
    out: dict[str, RenderedFile] = {}
    for t in TEMPLATES:
        path = services_dir / t.service / "templates" / t.template
        svc = getattr(stack.services, _SVC[t.service]) if t.service in _SVC else None
        # The nginx vhosts exist for every environment: nginx is shared.
        targets: list[Environment | None] = [None]
        if t.per_env:
            targets = list(stack.environments.values()) if t.service == "nginx" else selected
        for env in targets:
            rel = t.output.format(env=env.name) if env else t.output
            text = render_file(path, **context, svc=svc, env=env)
            out[rel] = RenderedFile(text, t.secret)
    if pgbackrest.pitr_of(stack) is not None:  # no secrets in them: the keys are env vars
        for name, text in pgbackrest.config_files(stack).items():
            out[f"postgresql/{name}"] = RenderedFile(text)
    return out


@dataclass(frozen=True)
class HostFile:
    """A file the stack needs on a host, with its mode (and group, for secret configs)."""

    path: str
    data: bytes
    mode: int = 0o644
    group: int | None = None


def host_files(
    stack: Stack,
    secrets: Secrets,
    state_root: str,
    tags: dict[str, str],
    upstreams: dict[str, str] | None = None,
) -> list[HostFile]:
    """Everything rendered onto a host's state dir: configs, the compose file, env files."""
    from aiia_ops.commands.compose import compose_data, dump, env_files

    root = state_root.rstrip("/")
    out = []
    for rel, f in sorted(render_stack(stack, secrets, upstreams=upstreams).items()):
        if f.secret:
            out.append(HostFile(f"{root}/config/{rel}", f.text.encode(), 0o640, SERVICE_UID))
        else:
            out.append(HostFile(f"{root}/config/{rel}", f.text.encode(), 0o644))
    out.append(HostFile(f"{root}/compose.yml", dump(compose_data(stack, root, tags)).encode()))
    for name, values in env_files(stack, secrets).items():
        text = "".join(f"{k}={v}\n" for k, v in values.items())
        out.append(HostFile(f"{root}/env/{name}.env", text.encode(), 0o600))
    return out
