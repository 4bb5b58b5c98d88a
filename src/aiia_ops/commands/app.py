"""App release containers: built here as argv lists, owned by `invoke deploy` (not compose).

Each environment has two fixed addresses (`address`, `standby_address`). The live release
runs under the environment's container name (aiia_django_prod) on one of them; a new
release starts as <name>-next on the other, takes over, and is renamed. Facts about what
runs are read from the engine (labels on the container), never remembered separately.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import PurePosixPath

from aiia_ops.commands.compose import (
    CONFIG_MOUNT,
    LOGGING,
    app_environment,
    config_dir_name,
    service_key,
)
from aiia_ops.host.runners import Runner
from aiia_ops.model import Environment, Stack

RELEASE_LABEL = "org.eduaiia.release"


def next_name(env: Environment) -> str:
    return f"{env.container}-next"


def run_release(
    stack: Stack, env: Environment, state_dir: str, tag: str, address: str, name: str
) -> list[str]:
    """`docker run` of one release of the app, with the environment's limits and settings."""
    state = PurePosixPath(state_dir)
    hc = env.healthcheck
    argv = [
        "docker", "run", "--detach", "--name", name,
        "--restart", "unless-stopped",
        "--network", stack.network.name, "--ip", address,
        "--memory", str(env.memory.limit.bytes),
        "--memory-reservation", str(env.memory.reservation.bytes),
        "--memory-swap", str(env.memory.limit.bytes),
        "--cpus", f"{env.cpu.limit:g}",
        "--cpu-shares", str(max(2, round(1024 * env.cpu.reservation))),
        # The image's own check (GET /health/); the figures come from the stack.
        "--health-interval", str(hc.interval), "--health-timeout", str(hc.timeout),
        "--health-retries", str(hc.retries),
        "--stop-timeout", str(stack.deploy.drain_timeout.whole_seconds),
        "--log-driver", LOGGING["driver"],
        *(x for k, v in LOGGING["options"].items() for x in ("--log-opt", f"{k}={v}")),
        "--label", f"org.eduaiia.stack={stack.project}",
        "--label", f"org.eduaiia.service={service_key(env)}",
        "--label", f"{RELEASE_LABEL}={tag}",
        "--env-file", str(state / "env" / f"{service_key(env)}.env"),
    ]  # fmt: skip
    for key, value in app_environment(stack, env, tag).items():
        argv += ["--env", f"{key}={value}"]
    argv += [
        "--mount", f"type=volume,source={stack.project}_{env.storage_volume},"
        f"target={env.volumes['storage']}",
        "--mount", f"type=bind,source={state / 'config' / config_dir_name(env)},"
        f"target={CONFIG_MOUNT},readonly",
        f"{env.image}:{tag}",
    ]  # fmt: skip
    return argv


@dataclass(frozen=True)
class Running:
    """What the engine says about one app container."""

    name: str
    running: bool
    release: str  # image tag = commit
    address: str
    health: str


def inspect_release(runner: Runner, stack: Stack, name: str) -> Running | None:
    fmt = "{{json .}}"
    result = runner.run(
        ["docker", "inspect", "--type", "container", "--format", fmt, name], check=False
    )
    if not result.ok or not result.stdout.strip():
        return None
    return parse_inspect(result.stdout, stack.network.name)


def parse_inspect(text: str, network: str) -> Running:
    data = json.loads(text)
    state = data.get("State", {})
    nets = data.get("NetworkSettings", {}).get("Networks", {}) or {}
    net = nets.get(network) or {}
    address = (net.get("IPAMConfig") or {}).get("IPv4Address") or net.get("IPAddress", "")
    return Running(
        name=data.get("Name", "").lstrip("/"),
        running=bool(state.get("Running")),
        release=(data.get("Config", {}).get("Labels") or {}).get(RELEASE_LABEL, ""),
        address=address,
        health=(state.get("Health") or {}).get("Status", "none"),
    )


def free_slot(env: Environment, live: Running | None) -> str:
    """The address a new release starts on: the one the live release does not hold."""
    primary, standby = str(env.address), str(env.standby_address)
    if live is None or not live.running:
        return primary
    return standby if live.address == primary else primary


def health_probe(name: str) -> list[str]:
    """Run the image's own health check inside the container (works over SSH too)."""
    return ["docker", "exec", name, "/usr/bin/python3", "-I", "/app/bin/healthcheck"]


def live_upstreams(runner: Runner, stack: Stack) -> dict[str, str]:
    """Where nginx should send each environment: the live release's address, if any."""
    out = {}
    for env in stack.environments.values():
        live = inspect_release(runner, stack, env.container)
        if live and live.running and live.address:
            out[env.name] = f"{live.address}:{env.port}"
    return out
