"""invoke config.check, config.render, config.show: the stack, checked and rendered."""

from __future__ import annotations

from pathlib import Path

from invoke import Collection, Exit

from aiia_ops.flows import config as config_flow
from aiia_ops.flows.output import table
from aiia_ops.model import load_stack
from aiia_ops.model.budget import check_budget, has_errors
from aiia_ops.model.placement import host_loads, is_multi_host, refuse_multi_host
from aiia_ops.model.state import local_state_dir
from aiia_ops.model.units import Size
from aiia_ops.tasks.common import task


@task
def check(c, stack=None, profile=None):
    """Validate the stack and check it fits the machine (memory, CPU, connections, deploys)."""
    model = load_stack(stack, profile)
    findings = check_budget(model)
    print(
        table(["result", "check", "finding"], [[f.severity, f.check, f.message] for f in findings])
    )
    errors = sum(f.severity == "error" for f in findings)
    warnings = sum(f.severity == "warning" for f in findings)
    source = f"{model.source} with profile {model.profile}" if model.profile else model.source
    print(f"\n{source}: {errors} error(s), {warnings} warning(s)")
    if has_errors(findings):
        raise Exit(code=1)


@task(
    help={
        "env": "environment whose per-environment files to render (default: all)",
        "out": "folder to write into (default: the host's state dir)",
    }
)
def render(c, env=None, out=None, stack=None, profile=None):
    """Render every service's config and the compose file."""
    model = load_stack(stack, profile)
    refuse_multi_host(model, "config.render")
    envs = [model.environment(env).name] if env else list(model.environments)
    for path in config_flow.render(model, local_state_dir(model), envs, Path(out) if out else None):
        print(f"wrote {path}")


def allocation_rows(items: list) -> list[list[object]]:
    rows = []
    for item in items:
        port = item.port if item.port is not None else ", ".join(map(str, item.publish))
        rows.append(
            [
                item.container,
                item.memory.limit,
                item.memory.reservation,
                f"{item.cpu.limit:g}",
                f"{item.cpu.reservation:g}",
                item.address,
                port,
            ]
        )
    rows.append(
        [
            "total",
            sum((i.memory.limit for i in items), Size(0)),
            sum((i.memory.reservation for i in items), Size(0)),
            f"{sum(i.cpu.limit for i in items):g}",
            f"{sum(i.cpu.reservation for i in items):g}",
            "",
            "",
        ]
    )
    return rows


HEADERS = ["container", "mem limit", "mem reserved", "cpu max", "cpu reserved", "address", "port"]


@task
def show(c, stack=None, profile=None):
    """The allocation tables of the architecture document, regenerated from the model;
    with several hosts, one table per host."""
    model = load_stack(stack, profile)
    if not is_multi_host(model):
        m = model.machine
        print(
            f"machine: {m.memory} RAM ({m.os_reserve} kept for the OS), {m.cpus:g} vCPU, "
            f"{m.disk} disk; network {model.network.name} {model.network.subnet}\n"
        )
        print(table(HEADERS, allocation_rows(model.containers())))
        return
    print(f"{len(model.hosts)} hosts; on each, network {model.network.name} {model.network.subnet}")
    for load in host_loads(model):
        host, m = model.hosts[load.name], load.machine
        roles = ", ".join(host.roles) or "any role"
        print(
            f"\nhost {load.name} ({host.address}; {roles}): {m.memory} RAM ({m.os_reserve} kept "
            f"for the OS), {m.cpus:g} vCPU, {m.disk} disk\n"
        )
        print(table(HEADERS, allocation_rows(load.items)))


namespace = Collection("config", check, render, show)
