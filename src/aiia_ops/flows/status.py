"""What is running: the stack's containers as the engine reports them, through a runner
(this machine's engine or a remote one over SSH), with memory by the one formula."""

from __future__ import annotations

from dataclasses import dataclass

from aiia_ops.commands.compose import service_key
from aiia_ops.commands.engine import STACK_LABEL
from aiia_ops.host.engine import Engine

# Socket I/O lives in host/http.py; these names stay importable from here for their callers.
from aiia_ops.host.http import health_through_nginx, https_get
from aiia_ops.host.runners import LocalRunner, Runner
from aiia_ops.host.targets import runner_for
from aiia_ops.model import Stack
from aiia_ops.model.units import Size


@dataclass
class ContainerStatus:
    service: str
    container: str
    state: str
    health: str
    memory_used: Size | None
    memory_limit: Size | None
    cpu_limit: float | None
    address: str
    image: str


def status_runner(stack: Stack, host: str | None = None) -> Runner:
    """The runner for `--host`: a host of the stack (local for `ssh: null`, else SSH), or
    `user@address[:port]`; without one, the stack's first host."""
    if host is None:
        name = next(iter(stack.hosts))
        return runner_for(stack.hosts[name], name)
    if host in stack.hosts:
        return runner_for(stack.hosts[host], host)
    from aiia_ops.host.ssh import runner_for_spec

    return runner_for_spec(host, host=host)


def stack_status(stack: Stack, runner: Runner | None = None) -> list[ContainerStatus]:
    """One row per container of the stack: `docker info` (is the engine there?), one
    `docker inspect` of them all, one read of the running ones' cgroup counters."""
    engine = Engine(runner or LocalRunner())
    engine.ping()
    expected = {c.container: service_key(c) for c in stack.containers()}
    # Only containers of this stack count: one of the same name from elsewhere is absent.
    found = {
        name: c
        for name, c in engine.inspect(list(expected)).items()
        if name in expected and c.labels.get(STACK_LABEL) == stack.project
    }
    usage = engine.usage({n: c.id for n, c in found.items() if c.running})
    rows = []
    for name, key in expected.items():
        c = found.get(name)
        if c is None:
            rows.append(ContainerStatus(key, name, "absent", "-", None, None, None, "-", "-"))
            continue
        used = usage.get(name)
        rows.append(
            ContainerStatus(
                key,
                name,
                c.state,
                c.health,
                Size(used.memory_used) if used and used.memory_used is not None else None,
                Size(c.memory_limit) if c.memory_limit else None,
                c.cpu_limit,
                c.addresses.get(stack.network.name) or "-",
                c.image,
            )
        )
    return rows


def status_table_rows(rows: list[ContainerStatus]) -> list[list[str]]:
    def mb(s: Size | None) -> str:
        return "-" if s is None else f"{s.mb:.1f}MB" if isinstance(s.mb, float) else f"{s.mb}MB"

    return [
        [
            r.service,
            r.state,
            r.health,
            f"{mb(r.memory_used)} / {mb(r.memory_limit)}",
            "-" if r.cpu_limit is None else f"{r.cpu_limit:g}",
            r.address,
            r.image,
        ]
        for r in rows
    ]


STATUS_HEADERS = [
    "service",
    "state",
    "health",
    "memory used / limit",
    "cpu limit",
    "address",
    "image",
]


def status_json(rows: list[ContainerStatus]) -> list[dict]:
    """`invoke status --json`: sizes in bytes."""
    return [
        {
            **vars(r),
            "memory_used": r.memory_used and r.memory_used.bytes,
            "memory_limit": r.memory_limit and r.memory_limit.bytes,
        }
        for r in rows
    ]


__all__ = [
    "STATUS_HEADERS",
    "ContainerStatus",
    "health_through_nginx",
    "https_get",
    "stack_status",
    "status_json",
    "status_runner",
    "status_table_rows",
]
