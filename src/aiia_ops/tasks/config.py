"""invoke config.check, config.render, config.show: the stack, checked and rendered."""

from __future__ import annotations

from pathlib import Path

from invoke import Collection, Exit

from aiia_ops.flows import config as config_flow
from aiia_ops.flows.output import table
from aiia_ops.model import Stack, load_stack
from aiia_ops.model.budget import check_budget, has_errors
from aiia_ops.model.state import local_state_dir
from aiia_ops.model.units import Size
from aiia_ops.tasks.common import task


@task
def check(c, stack=None):
    """Validate the stack and check it fits the machine (memory, CPU, connections, deploys)."""
    model = load_stack(stack)
    findings = check_budget(model)
    print(
        table(["result", "check", "finding"], [[f.severity, f.check, f.message] for f in findings])
    )
    errors = sum(f.severity == "error" for f in findings)
    warnings = sum(f.severity == "warning" for f in findings)
    print(f"\n{model.source}: {errors} error(s), {warnings} warning(s)")
    if has_errors(findings):
        raise Exit(code=1)


@task(
    help={
        "env": "environment whose per-environment files to render (default: all)",
        "out": "folder to write into (default: the host's state dir)",
    }
)
def render(c, env=None, out=None, stack=None):
    """Render every service's config and the compose file."""
    model = load_stack(stack)
    envs = [model.environment(env).name] if env else list(model.environments)
    for path in config_flow.render(model, local_state_dir(model), envs, Path(out) if out else None):
        print(f"wrote {path}")


def allocation_rows(model: Stack) -> list[list[object]]:
    rows = []
    for item in model.containers():
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
    total_lim = sum((i.memory.limit for i in model.containers()), Size(0))
    total_res = sum((i.memory.reservation for i in model.containers()), Size(0))
    rows.append(
        [
            "total",
            total_lim,
            total_res,
            f"{sum(i.cpu.limit for i in model.containers()):g}",
            f"{sum(i.cpu.reservation for i in model.containers()):g}",
            "",
            "",
        ]
    )
    return rows


@task
def show(c, stack=None):
    """The allocation tables of the architecture document, regenerated from the model."""
    model = load_stack(stack)
    m = model.machine
    print(
        f"machine: {m.memory} RAM ({m.os_reserve} kept for the OS), {m.cpus:g} vCPU, "
        f"{m.disk} disk; network {model.network.name} {model.network.subnet}\n"
    )
    print(
        table(
            [
                "container",
                "mem limit",
                "mem reserved",
                "cpu max",
                "cpu reserved",
                "address",
                "port",
            ],
            allocation_rows(model),
        )
    )


namespace = Collection("config", check, render, show)
