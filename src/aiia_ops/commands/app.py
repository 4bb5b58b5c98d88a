"""App release containers: built here as argv lists, owned by `invoke deploy` (not compose).

Each environment has two fixed addresses (`address`, `standby_address`). The live release
runs under the environment's container name (aiia_django_prod) on one of them; a new
release starts as <name>-next on the other, takes over, and is renamed. Facts about what
runs are read from the engine (labels on the container), never remembered separately.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from aiia_ops import SERVICES_DIR
from aiia_ops.commands.compose import (
    CONFIG_MOUNT,
    LOGGING,
    app_environment,
    config_dir_name,
    service_key,
)
from aiia_ops.commands.docker import build_image, prepare_wheelhouse
from aiia_ops.commands.hardening import run_flags
from aiia_ops.commands.release_config import CONFIG_LABEL, ReleaseConfig
from aiia_ops.errors import OpsError
from aiia_ops.model import Environment, Stack

RELEASE_LABEL = "org.eduaiia.release"


def next_name(env: Environment) -> str:
    return f"{env.container}-next"


def run_release(
    stack: Stack,
    env: Environment,
    state_dir: str,
    tag: str,
    address: str,
    name: str,
    config: ReleaseConfig | None = None,
) -> list[str]:
    """`docker run` of one release of the app, with the environment's limits and settings;
    its config dir: the release's own copy (`config`), else the environment's current one."""
    state = PurePosixPath(state_dir)
    config_dir = config.path if config else str(state / "config" / config_dir_name(env))
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
        *(["--label", f"{CONFIG_LABEL}={config.digest}"] if config else []),
        "--env-file", str(state / "env" / f"{service_key(env)}.env"),
        *run_flags("app"),  # cap_drop ALL, no-new-privileges, read-only root (hardening.py)
    ]  # fmt: skip
    for key, value in app_environment(stack, env, tag).items():
        argv += ["--env", f"{key}={value}"]
    argv += [
        "--mount", f"type=volume,source={stack.project}_{env.storage_volume},"
        f"target={env.volumes['storage']}",
        "--mount", f"type=bind,source={config_dir},target={CONFIG_MOUNT},readonly",
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
    config: str = ""  # the digest of the config copy it mounts ("": the shared dir)


def inspect_container(name: str) -> list[str]:
    """The engine's whole record of one container, as JSON (parsed by `parse_inspect`)."""
    return ["docker", "inspect", "--type", "container", "--format", "{{json .}}", name]


def parse_inspect(text: str, network: str) -> Running:
    data = json.loads(text)
    state = data.get("State", {})
    nets = data.get("NetworkSettings", {}).get("Networks", {}) or {}
    net = nets.get(network) or {}
    address = (net.get("IPAMConfig") or {}).get("IPv4Address") or net.get("IPAddress", "")
    labels = data.get("Config", {}).get("Labels") or {}
    return Running(
        name=data.get("Name", "").lstrip("/"),
        running=bool(state.get("Running")),
        release=labels.get(RELEASE_LABEL, ""),
        address=address,
        health=(state.get("Health") or {}).get("Status", "none"),
        config=labels.get(CONFIG_LABEL, ""),
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


def upstreams(stack: Stack, lives: dict[str, Running | None]) -> dict[str, str]:
    """Where nginx should send each environment: the live release's address, if any."""
    out = {}
    for env in stack.environments.values():
        live = lives.get(env.name)
        if live and live.running and live.address:
            out[env.name] = f"{live.address}:{env.port}"
    return out


# -- facts a deploy reads (argv + a pure parser of the answer) ---------------------------

MIN_FREE_DISK = 2 * 1024**3  # an image, a backup and logs on a 20 GB disk


def engine_version() -> list[str]:
    return ["docker", "info", "--format", "{{.ServerVersion}}"]


def image_inspect(image: str) -> list[str]:
    """Exits 0 when the engine has `image`."""
    return ["docker", "image", "inspect", "--format", "{{.Id}}", image]


def free_disk(path: str) -> list[str]:
    return ["df", "--output=avail", "-B1", path]


def parse_free_disk(text: str) -> int | None:
    """Bytes available, from `df --output=avail -B1` (None when unreadable)."""
    words = text.split()
    return int(words[-1]) if words and words[-1].isdigit() else None


def disk_problem(avail: int | None, state_dir: str) -> str | None:
    if avail is None or avail >= MIN_FREE_DISK:
        return None
    return (
        f"only {avail // 1024**2} MB free under {state_dir}; a deploy needs "
        f"{MIN_FREE_DISK // 1024**2} MB (prune old backups or images: invoke backup.prune, "
        "docker image prune)"
    )


def is_running(name: str) -> list[str]:
    """Prints `true` while container `name` runs."""
    return ["docker", "inspect", "--format", "{{.State.Running}}", name]


def container_status(name: str) -> list[str]:
    """created, running, restarting, exited, dead ..."""
    return ["docker", "inspect", "--format", "{{.State.Status}}", name]


def container_logs(name: str, tail: int = 40) -> list[str]:
    return ["docker", "logs", "--tail", str(tail), name]


def nginx_processes(stack: Stack) -> list[str]:
    return ["docker", "top", stack.services.nginx.container, "-eo", "pid,args"]


def parse_workers(text: str) -> set[str]:
    """The pids of nginx worker processes in `docker top ... -eo pid,args` output."""
    return {line.split()[0] for line in text.splitlines()[1:] if "worker process" in line}


def parse_draining(text: str) -> set[str]:
    """The pids of nginx workers still finishing requests after a reload."""
    return {line.split()[0] for line in text.splitlines()[1:] if "is shutting down" in line}


# -- changes -------------------------------------------------------------------------------


def start_container(name: str) -> list[str]:
    return ["docker", "start", name]


def remove_container(name: str) -> list[str]:
    return ["docker", "rm", "--force", name]


def stop_container(name: str, seconds: int) -> list[str]:
    return ["docker", "stop", "--time", str(seconds), name]


def remove_stopped(name: str) -> list[str]:
    return ["docker", "rm", name]


def rename_container(name: str, new_name: str) -> list[str]:
    return ["docker", "rename", name, new_name]


def remove_image(image: str) -> list[str]:
    return ["docker", "image", "rm", image]


def save_image(image: str) -> list[str]:
    """Piped into `load_image()` on another host: an image shipped without a registry."""
    return ["docker", "save", image]


def load_image() -> list[str]:
    return ["docker", "load"]


# -- decisions -----------------------------------------------------------------------------


def release_tags(history: list[dict]) -> list[str]:
    return [r["commit"][:12] for r in history if r.get("commit")]


def rollback_candidates(
    env_name: str, history: list[dict], current: str | None, to: str | None
) -> list[str]:
    """Good earlier releases, newest first: never a bad one, never the live one; `to`
    narrows them to those whose commit starts with it."""
    bad = {r["commit"][:12] for r in history if r.get("result") == "bad"}
    good = [r["commit"][:12] for r in reversed(history) if r.get("result") == "good"]
    candidates = [c for c in dict.fromkeys(good) if c != current and c not in bad]
    if to:
        matches = [c for c in candidates if c.startswith(to[:12])]
        if not matches:
            known = ", ".join(candidates) or "none"
            raise OpsError(
                f"{to} is not a good earlier release of {env_name}; rollback targets: {known}"
            )
        candidates = matches
    return candidates


def no_rollback_target(env_name: str, keep_releases: int) -> OpsError:
    return OpsError(
        f"no earlier good release of {env_name} whose image is still on the host "
        f"(releases kept: {keep_releases}); deploy a commit instead: "
        f"invoke deploy --env={env_name} --ref COMMIT"
    )


def images_to_prune(
    current: str,
    histories: dict[str, list[dict]],
    live_releases: set[str],
    keep_releases: int,
) -> list[str]:
    """Release tags this host deployed that are neither live, nor `current`, nor among an
    environment's last `keep_releases`. Images it never deployed are not ours to remove."""
    keep, seen = {current} | live_releases, set()
    for history in histories.values():
        tags = release_tags(history)
        keep |= set(list(dict.fromkeys(reversed(tags)))[:keep_releases])
        seen |= set(tags)
    return sorted(seen - keep)


def release_build(stack: Stack, checkout: str, tag: str) -> list[list[str]]:
    """Build the app image from `checkout` (a git worktree of the release's commit). This
    checkout's wheelhouse seeds the release's, whose build-wheelhouse then only fetches
    what its own pins add."""
    django = f"{checkout}/services/django"
    return [
        prepare_wheelhouse(),
        ["cp", "-a", "-T", str(SERVICES_DIR / "django" / "wheelhouse"), f"{django}/wheelhouse"],
        [f"{django}/build-wheelhouse"],
        build_image(stack, "django", tag, tag, services_dir=Path(checkout) / "services"),
    ]


# -- migration safety (the release's new migrations against the live release) ------------

MIGRATION_SAFETY_ARGS = ["manage.py", "migration_safety"]
MIGRATION_REFUSED_EXIT = 3  # the app's `manage.py migration_safety`: a breaking migration


def migration_safety(stack: Stack, env: Environment, state_dir: str, tag: str) -> list[str]:
    """A one-off container of the new release's image, straight to the live database: its
    migrations not yet applied there, checked for operations that break the live release."""
    from aiia_ops.commands.docker import one_off_app

    return one_off_app(stack, env, state_dir, tag, MIGRATION_SAFETY_ARGS)


def migration_safety_verdict(code: int, stdout: str, stderr: str) -> tuple[str, str]:
    """("ok" | "refused" | "absent" | "error", detail) from the check's exit and output.
    "absent": the release predates the check (no such management command)."""
    text = "\n".join(part.strip() for part in (stdout, stderr) if part.strip())
    if code == 0:
        return "ok", stdout.strip()
    if code == MIGRATION_REFUSED_EXIT:
        lines = [line for line in text.splitlines() if line.startswith("migration safety:")]
        return "refused", "\n".join(lines) or text
    if "Unknown command: 'migration_safety'" in text:
        return "absent", text
    return "error", text
