"""The stack on this machine's engine: build, up, down, logs, and setup (from nothing to a
healthy environment). Each step shows as it runs (flows/steps.Steps)."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from aiia_ops import REPO_ROOT
from aiia_ops.commands import docker as cmd
from aiia_ops.commands.compose import service_key
from aiia_ops.commands.render import SERVICE_UID
from aiia_ops.errors import OpsError
from aiia_ops.flows import provision as provision_flow
from aiia_ops.flows.schedule import install_schedule
from aiia_ops.flows.steps import Steps, confirm
from aiia_ops.host.git import SHARED_FOLDERS, head_version, image_tag, shared_image_tags
from aiia_ops.host.runners import LocalRunner, Runner
from aiia_ops.host.secrets import load_secrets
from aiia_ops.model import Stack
from aiia_ops.model.budget import check_budget, has_errors
from aiia_ops.model.secrets import Secrets
from aiia_ops.model.state import StateDir

# Host folders under the state dir that containers write to, owned by the service user.
WRITABLE_DIRS = ("logs/nginx", "ssl", "acme", "status")


def _say(line: str) -> None:
    print(line, flush=True)


def local_runner(secrets: Secrets | None = None) -> Runner:
    runner = LocalRunner()
    if secrets:
        runner.redact(*secrets.values())
    return runner


def check_fits(stack: Stack) -> None:
    """Refuse a stack that does not fit the machine before anything starts."""
    findings = check_budget(stack)
    if has_errors(findings):
        errors = [f"  {f.check}: {f.message}" for f in findings if f.severity == "error"]
        raise OpsError(
            "the stack does not fit the machine (invoke config.check):\n" + "\n".join(errors)
        )


def prepare_state(runner: Runner, state: StateDir) -> None:
    root = str(state.root)
    runner.run(["mkdir", "-p", root])
    runner.run(["chmod", "711", root])  # containers' bind mounts pass through; nobody lists it
    is_root = runner.query(["id", "-u"]).stdout.strip() == "0"
    for rel in WRITABLE_DIRS:
        path = f"{root}/{rel}"
        runner.run(["mkdir", "-p", path])
        if is_root:
            runner.run(["chown", f"{SERVICE_UID}:{SERVICE_UID}", path])


def write_configs(runner: Runner, stack: Stack, state: StateDir, secrets: Secrets) -> bool:
    """Render configs, the compose file and env files into the state dir, with nginx
    pointing where each environment's recorded switch state says (the live releases when
    none is recorded), under the host-wide switch lock. True if anything changed."""
    from aiia_ops.flows import switch as sw

    root = str(state.root)
    with sw.switch_lock(runner, root, out=_say):
        ups = sw.upstreams(runner, stack, root)
        return bool(sw.write_host_files(runner, stack, secrets, root, ups))


def require_images(runner: Runner, model: Stack) -> None:
    """Say which images are missing and how to get them, before compose tries a registry."""
    missing = []
    for name, tag in shared_image_tags(model).items():
        image = f"{getattr(model.services, name).image}:{tag}"
        if not runner.query(cmd.image_inspect(image)).ok:
            missing.append((image, SHARED_FOLDERS[name]))
    if missing:
        names = ", ".join(i for i, _ in missing)
        folders = " ".join(sorted({f for _, f in missing}))
        raise OpsError(
            f"images not built for this checkout: {names}; run invoke build "
            f"(or: for s in {folders}; do invoke build --service $s; done)"
        )


def running(runner: Runner, container: str) -> bool:
    result = runner.query(cmd.container_running(container))
    return result.ok and result.stdout.strip() == "true"


def build(runner: Runner, model: Stack, service: str | None = None, steps: Steps | None = None):
    """Build the service images, tagged with their git commit, the checkout's, and :latest."""
    steps = steps or Steps(out=_say)
    folders = list(cmd.IMAGE_FOLDERS)
    if service:
        if service not in folders:
            raise OpsError(f"unknown service {service!r}; expected one of: {', '.join(folders)}")
        folders = [service]
    for folder in folders:
        tag = image_tag(folder)
        with steps.step(f"building {cmd.image_of_folder(model, folder)}:{tag}"):
            if folder == "django":
                runner.run(cmd.prepare_wheelhouse(), stream=True)
            # Also tagged with the checkout's commit: every image of one commit by one name.
            extra = (head_version(),)
            runner.run(cmd.build_image(model, folder, tag, tag, extra_tags=extra), stream=True)


def up(model: Stack, state: StateDir, env: str | None = None, out=_say) -> None:
    """Start the stack (already set up) and wait until it is healthy."""
    check_fits(model)
    envs = [model.environment(env)] if env else list(model.environments.values())
    secrets = load_secrets(state.root, list(model.environments))
    runner = local_runner(secrets)
    prepare_state(runner, state)
    write_configs(runner, model, state, secrets)
    require_images(runner, model)
    with Steps(out=out).step("starting nginx, PostgreSQL, PgBouncer and Redis"):
        runner.run(cmd.up(model, str(state.root), cmd.shared_service_keys(model)), stream=True)
    for e in envs:  # the app releases belong to deploy: start the ones that exist
        if not runner.run(cmd.start_container(e.container), check=False).ok:
            out(f"   {e.name}: no release yet; run invoke setup --env={e.name}")


def down(model: Stack, state: StateDir, volumes: bool = False, yes: bool = False) -> None:
    """Stop and remove the stack's containers (data volumes too with `volumes`: asks first)."""
    if not state.compose_file.exists():
        raise OpsError(f"no stack has been set up here ({state.compose_file} is missing)")
    if volumes:
        confirm(
            "This deletes the databases, Redis data and media of every environment. "
            "Back up first (invoke backup).",
            yes=yes,
            expected=model.project,
            what="delete data",
        )
    runner = local_runner()
    for e in model.environments.values():  # the releases, then the shared services
        runner.run(cmd.remove_containers(e.container, f"{e.container}-next"), check=False)
    runner.run(cmd.down(model, str(state.root), volumes), stream=True)


def logs(model: Stack, state: StateDir, service: str | None, tail: int, follow: bool) -> None:
    keys = [service_key(x) for x in model.containers()]
    if service and service not in keys:
        raise OpsError(f"unknown service {service!r}; expected one of: {', '.join(keys)}")
    LocalRunner().run(cmd.logs(model, str(state.root), service, tail, follow), stream=True)


def setup(
    model: Stack, state: StateDir, env: str = "prod", skip_build: bool = False, out=_say
) -> None:
    """From nothing to a healthy environment: provision, build, secrets, databases, app,
    schedule. Ends with the addresses it serves."""
    if model.runtime == "swarm":  # issue 16: the swarm runtime's own procedure
        from aiia_ops.flows import swarm

        swarm.setup(model, env, out=out)
        return
    started = time.monotonic()
    check_fits(model)
    target = model.environment(env)
    steps = Steps(out=out)
    with steps.step("provisioning the Docker engine, compose v2 and the base image"):
        t0 = time.monotonic()
        timings = provision_flow.provision(LocalRunner(), out=out)
        out(provision_flow.timings_table(timings, time.monotonic() - t0))
    if not skip_build:
        build(local_runner(), model, steps=steps)
    with steps.step("secrets and rendered configs"):
        secrets = load_secrets(state.root, list(model.environments))
        runner = local_runner(secrets)
        prepare_state(runner, state)
        changed = write_configs(runner, model, state, secrets)
    root = str(state.root)
    require_images(runner, model)
    with steps.step("starting nginx, PostgreSQL, PgBouncer and Redis"):
        was_running = running(runner, model.services.nginx.container)
        runner.run(cmd.up(model, root, cmd.shared_service_keys(model)), stream=True)
        if was_running and changed:
            from aiia_ops.flows import switch as sw

            with sw.switch_lock(runner, root, out=out):
                for argv in cmd.nginx_reload(model):
                    runner.run(argv)
    with steps.step(f"database and role for {target.name} ({target.database})"):
        runner.run(
            cmd.ensure_database(model, target),
            input=secrets.environments[target.name].db_password + "\n",
        )
    from aiia_ops.flows.deploy import Deploy

    release = Deploy(model, target, root, runner, secrets, steps=steps)
    live = release.live()
    if live and live.running:
        out(
            f"-> {target.name} already runs {live.release}; to change it: "
            f"invoke deploy --env={target.name}"
        )
    else:  # the first release goes out like every other: invoke deploy's procedure
        release.deploy(None)
    # What a deploy from elsewhere (over SSH) needs to run tasks here, e.g. its backup.
    host = {"repo": str(REPO_ROOT), "python": sys.executable,
            "stack": str(Path(model.source).resolve())}  # fmt: skip
    runner.write_file(f"{root}/host.json", json.dumps(host, indent=2) + "\n")
    with steps.step("schedule: daily backups, TLS renewal check, monitor (cron on the host)"):
        out(f"   {install_schedule(model, state, runner)}")
    out(f"\n{target.name} is up in {time.monotonic() - started:.0f}s:")
    for domain in target.domains:
        out(f"  https://{domain}/")
    out(f"  https://{model.status_domain}/  (status page)\n")
