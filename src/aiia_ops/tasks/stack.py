"""invoke build | up | down | status | logs | setup: the stack on this machine's engine."""

from __future__ import annotations

import contextlib
import json
import os
import sys
import time
from pathlib import Path

from aiia_ops import REPO_ROOT
from aiia_ops.commands import docker as cmd
from aiia_ops.commands.compose import service_key
from aiia_ops.commands.render import SERVICE_UID
from aiia_ops.errors import OpsError
from aiia_ops.flows.output import paint, table
from aiia_ops.flows.status import STATUS_HEADERS, stack_status, status_table_rows
from aiia_ops.host.git import head_version, image_tag
from aiia_ops.host.runners import LocalRunner, Runner
from aiia_ops.host.secrets import load_secrets
from aiia_ops.model import Stack, load_stack
from aiia_ops.model.budget import check_budget, has_errors
from aiia_ops.model.secrets import Secrets
from aiia_ops.model.state import StateDir, local_state_dir
from aiia_ops.tasks.common import task

# Host folders under the state dir that containers write to, owned by the service user.
WRITABLE_DIRS = ("logs/nginx", "ssl", "acme", "status")


@contextlib.contextmanager
def step(title: str):
    """Show a long step as it runs, with its duration."""
    print(f"-> {title} ...", flush=True)
    started = time.monotonic()
    try:
        yield
    except BaseException:
        print(paint(f"   failed after {time.monotonic() - started:.1f}s", "error"), flush=True)
        raise
    print(f"   done in {time.monotonic() - started:.1f}s", flush=True)


def _runner(secrets: Secrets | None = None) -> Runner:
    runner = LocalRunner()
    if secrets:
        runner.redact(*secrets.values())
    return runner


def prepare_state(state: StateDir) -> None:
    state.root.mkdir(parents=True, exist_ok=True)
    os.chmod(state.root, 0o711)  # containers' bind mounts pass through; nobody lists it
    for rel in WRITABLE_DIRS:
        path = state.root / rel
        path.mkdir(parents=True, exist_ok=True)
        if os.geteuid() == 0:
            os.chown(path, SERVICE_UID, SERVICE_UID)


def write_configs(stack: Stack, state: StateDir, secrets: Secrets) -> bool:
    """Render configs, the compose file and env files into the state dir, with nginx
    pointing at the live releases. True if anything changed."""
    from aiia_ops.flows.deploy import live_upstreams, write_host_files

    runner = LocalRunner()
    return bool(
        write_host_files(runner, stack, secrets, str(state.root), live_upstreams(runner, stack))
    )


def require_images(model: Stack, runner: Runner) -> None:
    """Say which images are missing and how to get them, before compose tries a registry."""
    from aiia_ops.host.git import SHARED_FOLDERS, shared_image_tags

    tags = shared_image_tags(model)
    missing = []
    for name, tag in tags.items():
        image = f"{getattr(model.services, name).image}:{tag}"
        if not runner.run(["docker", "image", "inspect", image], check=False).ok:
            missing.append((image, SHARED_FOLDERS[name]))
    if missing:
        names = ", ".join(i for i, _ in missing)
        folders = " ".join(sorted({f for _, f in missing}))
        raise OpsError(
            f"images not built for this checkout: {names}; run invoke build "
            f"(or: for s in {folders}; do invoke build --service $s; done)"
        )


def _load(stack_path: str | None) -> tuple[Stack, StateDir]:
    stack = load_stack(stack_path)
    findings = check_budget(stack)
    if has_errors(findings):
        errors = [f"  {f.check}: {f.message}" for f in findings if f.severity == "error"]
        raise OpsError(
            "the stack does not fit the machine (invoke config.check):\n" + "\n".join(errors)
        )
    return stack, local_state_dir(stack)


@task(
    help={
        "service": "one service folder to build (nginx, postgres, pgbouncer, redis, "
        "django); default all",
    }
)
def build(c, service=None, stack=None):
    """Build the service images, tagged with the git commit (and :latest)."""
    model = load_stack(stack)
    folders = list(cmd.IMAGE_FOLDERS)
    if service:
        if service not in folders:
            raise OpsError(f"unknown service {service!r}; expected one of: {', '.join(folders)}")
        folders = [service]
    runner = _runner()
    for folder in folders:
        tag = image_tag(folder)
        with step(f"building {cmd.image_of_folder(model, folder)}:{tag}"):
            if folder == "django":
                runner.run(cmd.prepare_wheelhouse(), stream=True)
            # Also tagged with the checkout's commit: every image of one commit by one name.
            extra = (head_version(),)
            runner.run(cmd.build_image(model, folder, tag, tag, extra_tags=extra), stream=True)


@task(
    help={
        "env": "also start this environment's app (default: every environment)",
    }
)
def up(c, env=None, stack=None):
    """Start the stack (already set up) and wait until it is healthy."""
    model, state = _load(stack)
    envs = [model.environment(env)] if env else list(model.environments.values())
    secrets = load_secrets(state.root, list(model.environments))
    prepare_state(state)
    write_configs(model, state, secrets)
    runner = _runner(secrets)
    require_images(model, runner)
    with step("starting nginx, PostgreSQL, PgBouncer and Redis"):
        runner.run(cmd.up(model, str(state.root), cmd.shared_service_keys(model)), stream=True)
    for e in envs:  # the app releases belong to deploy: start the ones that exist
        if not runner.run(["docker", "start", e.container], check=False).ok:
            print(f"   {e.name}: no release yet; run invoke setup --env={e.name}")
    _print_status(model)


@task(
    help={
        "volumes": "also delete the data volumes (database, redis, storage): asks first",
        "yes": "do not ask",
    }
)
def down(c, volumes=False, yes=False, stack=None):
    """Stop and remove the stack's containers (data volumes are kept unless --volumes)."""
    model = load_stack(stack)
    state = local_state_dir(model)
    if not state.compose_file.exists():
        raise OpsError(f"no stack has been set up here ({state.compose_file} is missing)")
    if volumes and not yes:
        _confirm(
            "This deletes the databases, Redis data and media of every environment. "
            f"Back up first (invoke backup). Type '{model.project}' to go on: ",
            model.project,
        )
    runner = _runner()
    for e in model.environments.values():  # the releases, then the shared services
        runner.run(["docker", "rm", "--force", e.container, f"{e.container}-next"], check=False)
    runner.run(cmd.down(model, str(state.root), volumes), stream=True)


def _confirm(prompt: str, expected: str) -> None:
    if not sys.stdin.isatty():
        raise OpsError("refusing to delete data without confirmation; pass --yes")
    if input(prompt).strip() != expected:
        raise OpsError("not confirmed; nothing was changed")


@task(
    help={
        "json": "print JSON for machines",
        "host": "a host of the stack, or user@address[:port] over SSH (default: this machine)",
    }
)
def status(c, json_=False, host=None, stack=None):
    """Each service: state, health, memory used/limit, CPU limit, address."""
    from aiia_ops.flows.status import status_json, status_runner

    model = load_stack(stack)
    runner = status_runner(model, host)
    if json_:
        print(json.dumps(status_json(stack_status(model, runner)), indent=2))
        return
    _print_status(model, runner)


def _print_status(model: Stack, runner: Runner | None = None) -> None:
    print(table(STATUS_HEADERS, status_table_rows(stack_status(model, runner))))


@task(
    help={
        "service": "compose service (nginx, postgresql, pgbouncer, redis, django_prod, "
        "django_staging); default all",
        "tail": "lines per service",
        "follow": "keep following",
    }
)
def logs(c, service=None, tail=100, follow=False, stack=None):
    """Show the containers' logs."""
    model = load_stack(stack)
    keys = [service_key(x) for x in model.containers()]
    if service and service not in keys:
        raise OpsError(f"unknown service {service!r}; expected one of: {', '.join(keys)}")
    state = local_state_dir(model)
    LocalRunner().run(cmd.logs(model, str(state.root), service, int(tail), follow), stream=True)


@task(
    help={
        "env": "environment to set up: prod or staging",
        "skip_build": "use the images already built for this commit",
    }
)
def setup(c, env="prod", skip_build=False, stack=None):
    """From nothing to a healthy environment: provision, build, secrets, databases, app."""
    started = time.monotonic()
    model, state = _load(stack)
    target = model.environment(env)
    from aiia_ops.tasks import provision as provision_task

    with step("provisioning the Docker engine, compose v2 and the base image"):
        provision_task.provision(c)
    if not skip_build:
        build(c, stack=stack)
    with step("secrets and rendered configs"):
        secrets = load_secrets(state.root, list(model.environments))
        prepare_state(state)
        changed = write_configs(model, state, secrets)
    runner = _runner(secrets)
    root = str(state.root)
    require_images(model, runner)
    with step("starting nginx, PostgreSQL, PgBouncer and Redis"):
        was_running = _running(model.services.nginx.container)
        runner.run(cmd.up(model, root, cmd.shared_service_keys(model)), stream=True)
        if was_running and changed:
            for argv in cmd.nginx_reload(model):
                runner.run(argv)
    with step(f"database and role for {target.name} ({target.database})"):
        runner.run(
            cmd.ensure_database(model, target),
            input=secrets.environments[target.name].db_password + "\n",
        )
    from aiia_ops.flows.deploy import Deploy
    from aiia_ops.flows.steps import Steps

    release = Deploy(model, target, root, runner, secrets, steps=Steps())
    live = release.live()
    if live and live.running:
        print(
            f"-> {target.name} already runs {live.release}; to change it: "
            f"invoke deploy --env={target.name}"
        )
    else:  # the first release goes out like every other: invoke deploy's procedure
        release.deploy(None)
    from aiia_ops.tasks.schedule import install_schedule

    # What a deploy from elsewhere (over SSH) needs to run tasks here, e.g. its backup.
    runner.write_file(
        str(state.root / "host.json"),
        json.dumps(
            {
                "repo": str(REPO_ROOT),
                "python": sys.executable,
                "stack": str(Path(model.source).resolve()),
            },
            indent=2,
        )
        + "\n",
    )

    with step("schedule: daily backups, TLS renewal check, monitor (cron on the host)"):
        print(f"   {install_schedule(model, state, runner)}")
    print(f"\n{target.name} is up in {time.monotonic() - started:.0f}s:")
    for domain in target.domains:
        print(f"  https://{domain}/")
    print(f"  https://{model.status_domain}/  (status page)\n")
    _print_status(model)


def _running(container: str) -> bool:
    result = LocalRunner().run(
        ["docker", "inspect", "--format", "{{.State.Running}}", container], check=False
    )
    return result.ok and result.stdout.strip() == "true"
