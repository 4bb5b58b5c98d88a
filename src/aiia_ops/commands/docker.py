"""Docker and compose commands for the stack, built as argv lists (nothing runs here).

A runner executes them locally, over SSH, or prints them for a dry run.
"""

from __future__ import annotations

from pathlib import Path, PurePosixPath

from aiia_ops import SERVICES_DIR
from aiia_ops.commands.compose import CONFIG_MOUNT, app_environment, config_dir_name, service_key
from aiia_ops.commands.hardening import run_flags
from aiia_ops.model import Environment, Stack

# Image build order: the app last, it changes most.
IMAGE_FOLDERS = ("nginx", "postgres", "pgbouncer", "redis", "django")
BASE_IMAGE = "aiia/base:trixie"


def image_of_folder(stack: Stack, folder: str) -> str:
    """services/<folder> builds the image whose name ends in /<folder> (aiia/postgres ...)."""
    images = {i.image.rsplit("/", 1)[-1]: i.image for i in stack.containers()}
    return images[folder]


def build_image(
    stack: Stack,
    folder: str,
    tag: str,
    version: str,
    services_dir: Path = SERVICES_DIR,
    extra_tags: tuple[str, ...] = (),
) -> list[str]:
    image = image_of_folder(stack, folder)
    tags = [
        x for t in dict.fromkeys((tag, *extra_tags, "latest")) for x in ("--tag", f"{image}:{t}")
    ]
    return [
        "docker", "build", *tags,
        "--build-arg", f"APP_VERSION={version}",
        "--label", f"org.eduaiia.version={version}",
        str(services_dir / folder),
    ]  # fmt: skip


def prepare_wheelhouse(services_dir: Path = SERVICES_DIR) -> list[str]:
    """pip cannot reach PyPI inside a build here: wheels are fetched on the host first."""
    return [str(services_dir / "django" / "build-wheelhouse")]


def compose(stack: Stack, state_dir: str, *args: str) -> list[str]:
    compose_file = PurePosixPath(state_dir) / "compose.yml"
    return ["docker", "compose", "--project-name", stack.project, "--file", str(compose_file),
            *args]  # fmt: skip


def shared_service_keys(stack: Stack) -> list[str]:
    return ["postgresql", "pgbouncer", "redis", "nginx"]


def up(stack: Stack, state_dir: str, services: list[str], wait: bool = True) -> list[str]:
    extra = ["--wait"] if wait else []
    # Never reach for a registry: images are built here (invoke build) or shipped over SSH.
    return compose(
        stack, state_dir, "up", "--detach", "--no-build", "--pull", "never", *extra, *services
    )


def ensure_database(stack: Stack, env: Environment) -> list[str]:
    """Idempotent: the environment's role and database (password read from stdin)."""
    pg = stack.services.postgresql
    return ["docker", "exec", "--interactive", pg.container, "ensure-database", env.database,
            env.db_user]  # fmt: skip


def one_off_app(
    stack: Stack,
    env: Environment,
    state_dir: str,
    image_tag: str,
    args: list[str],
    version: str | None = None,
) -> list[str]:
    """A throwaway container of the app image, straight to PostgreSQL (not the pooler):
    migrations need session-level features transaction pooling does not keep."""
    state = PurePosixPath(state_dir)
    pg = stack.services.postgresql
    settings = app_environment(stack, env, version or image_tag)
    settings.update(DB_HOST=str(pg.address), DB_PORT=str(pg.port))
    argv = [
        "docker", "run", "--rm",
        "--network", stack.network.name,
        "--memory", str(env.memory.limit.bytes), "--memory-swap", str(env.memory.limit.bytes),
        "--cpus", f"{env.cpu.limit:g}",
        "--label", f"org.eduaiia.stack={stack.project}",
        "--label", f"org.eduaiia.one-off={env.name}",
        "--env-file", str(state / "env" / f"{service_key(env)}.env"),
        *run_flags("app"),  # the release's own hardening (hardening.py)
    ]  # fmt: skip
    for key, value in settings.items():
        argv += ["--env", f"{key}={value}"]
    argv += [
        "--mount", f"type=volume,source={stack.project}_{env.storage_volume},"
        f"target={env.volumes['storage']}",
        "--mount", f"type=bind,source={state / 'config' / config_dir_name(env)},"
        f"target={CONFIG_MOUNT},readonly",
        f"{env.image}:{image_tag}", *args,
    ]  # fmt: skip
    return argv


def nginx_reload(stack: Stack) -> list[list[str]]:
    """Test the rendered config first; a bad one never replaces the running one."""
    name = stack.services.nginx.container
    return [
        ["docker", "exec", name, "nginx", "-t", "-q", "-c", f"{CONFIG_MOUNT}/nginx.conf"],
        ["docker", "exec", name, "nginx", "-s", "reload", "-c", f"{CONFIG_MOUNT}/nginx.conf"],
    ]


def pgbouncer_reload(stack: Stack) -> list[str]:
    """SIGHUP: PgBouncer rereads its ini and auth file without dropping clients."""
    return ["docker", "kill", "--signal", "HUP", stack.services.pgbouncer.container]


def logs(stack: Stack, state_dir: str, service: str | None, tail: int, follow: bool) -> list[str]:
    args = ["logs", "--tail", str(tail), "--timestamps"]
    if follow:
        args.append("--follow")
    return compose(stack, state_dir, *args, *([service] if service else []))


def down(stack: Stack, state_dir: str, volumes: bool = False) -> list[str]:
    return compose(stack, state_dir, "down", *(["--volumes"] if volumes else []))


# --- facts and small changes the procedures ask the engine for ----------------------------


def image_inspect(image: str) -> list[str]:
    """A fact: exits 0 when the image exists here."""
    return ["docker", "image", "inspect", image]


def container_running(container: str) -> list[str]:
    """A fact: prints `true` when the container runs."""
    return ["docker", "inspect", "--format", "{{.State.Running}}", container]


def container_status(container: str) -> list[str]:
    """A fact: `running`, `exited`, ... (nothing when there is no such container)."""
    return ["docker", "inspect", "--format", "{{.State.Status}}", container]


def container_logs(container: str, tail: int) -> list[str]:
    return ["docker", "logs", "--tail", str(tail), container]


def start_container(container: str) -> list[str]:
    return ["docker", "start", container]


def remove_containers(*containers: str) -> list[str]:
    return ["docker", "rm", "--force", *containers]
