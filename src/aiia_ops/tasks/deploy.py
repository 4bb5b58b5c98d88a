"""invoke deploy | rollback | migrate | lock.status | lock.release."""

from __future__ import annotations

import json
import sys

from invoke import Collection, Exit

from aiia_ops.commands import docker as cmd
from aiia_ops.errors import OpsError
from aiia_ops.flows.deploy import Deploy, resolve_ref
from aiia_ops.flows.steps import Steps
from aiia_ops.host import lock as locks
from aiia_ops.host.runners import LocalRunner, PrintingRunner, Runner
from aiia_ops.host.secrets import load_secrets
from aiia_ops.model import Host, Stack, load_stack
from aiia_ops.model.state import local_state_dir
from aiia_ops.tasks.common import task


def target(
    model: Stack, env_name: str, host: str | None, accept_new_host_key: bool = False
) -> tuple[Runner, str, str, Host | None]:
    """(runner, state dir on that host, label, its stack entry) for --host or the
    environment's first host. --host takes a host name of the stack or user@address[:port]."""
    env = model.environment(env_name)
    name = host or env.hosts[0]
    entry = model.hosts.get(name)
    if entry is not None and entry.ssh is None:
        return LocalRunner(host=name), str(local_state_dir(model, name).root), name, entry
    from aiia_ops.host.ssh import runner_for_spec

    spec = entry.ssh if entry else name
    state_dir = entry.state_dir if entry else "/var/lib/aiia"
    runner = runner_for_spec(spec, host=name, accept_new_host_key=accept_new_host_key)
    return runner, state_dir, name, entry


def make_deploy(
    model: Stack,
    env_name: str,
    host: str | None,
    dry_run: bool,
    backup: bool = True,
    accept_new_host_key: bool = False,
) -> Deploy:
    env = model.environment(env_name)
    runner, state_dir, label, entry = target(model, env_name, host, accept_new_host_key)
    secrets = (
        load_secrets(local_state_dir(model).root, list(model.environments))
        if isinstance(runner, LocalRunner)
        else remote_secrets(runner, state_dir, model)
    )
    runner.redact(*secrets.values())
    local: Runner = LocalRunner()
    if dry_run:
        runner = PrintingRunner(reader=runner, host=label, secrets=set(runner.secrets))
        local = PrintingRunner(reader=local, host="build", secrets=set(runner.secrets))
    deploy = Deploy(
        model,
        env,
        state_dir,
        runner,
        secrets,
        local=local,
        dry_run=dry_run,
        steps=Steps(),
        host=entry,
    )
    if backup:
        deploy.take_backup = pre_deploy_backup(deploy)
    return deploy


def pre_deploy_backup(deploy: Deploy):
    """The environment's database backed up where it lives: here, or on the SSH host by the
    host's own checkout (recorded in <state>/host.json by `invoke setup` there)."""
    from aiia_ops.commands.backups import take_backup

    runner = deploy.runner.reader if isinstance(deploy.runner, PrintingRunner) else deploy.runner
    if isinstance(runner, LocalRunner):
        return lambda: take_backup(
            deploy.stack,
            local_state_dir(deploy.stack),
            deploy.env.name,
            "pre-deploy",
            deploy.runner,
        )

    def remote() -> None:
        raw = runner.read_file(f"{deploy.state_dir}/host.json")
        if raw is None:
            raise OpsError(
                f"{deploy.state_dir}/host.json is missing on the host: run invoke "
                "setup there first (it records the checkout that takes backups)"
            )
        host = json.loads(raw)
        deploy.runner.run(
            [
                host["python"],
                "-m",
                "invoke",
                "--search-root",
                host["repo"],
                "backup",
                "--env",
                deploy.env.name,
                "--kind",
                "pre-deploy",
            ],
            env={"AIIA_STATE_DIR": deploy.state_dir, "AIIA_STACK": host["stack"]},
            stream=True,
        )

    return remote


def remote_secrets(runner: Runner, state_dir: str, model: Stack):
    """The host keeps its secrets; read them over the connection (never printed)."""
    import tempfile
    from pathlib import Path

    tmp = Path(tempfile.mkdtemp(prefix="aiia-secrets-"))
    try:
        (tmp / "secrets").mkdir(mode=0o700)
        for name in ["shared", *model.environments]:
            data = runner.read_file(f"{state_dir}/secrets/{name}.env")
            if data is None:
                raise OpsError(
                    f"no secrets on the host ({state_dir}/secrets/{name}.env); set "
                    "the host up first: invoke setup on it"
                )
            path = tmp / "secrets" / f"{name}.env"
            path.write_bytes(data)
            path.chmod(0o600)
        return load_secrets(tmp, list(model.environments), create=False)
    finally:
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)


@task(
    help={
        "env": "environment: prod or staging",
        "host": "a host of deploy/stack.yml or user@address[:port] (default: the environment's)",
        "ref": "git commit, branch or tag to deploy (default: HEAD)",
        "dry_run": "print the exact commands, per host, in order; change nothing",
        "accept_new_host_key": "first contact with an SSH host: record its key (a changed "
        "key is still refused)",
    }
)
def deploy(c, env, host=None, ref=None, dry_run=False, accept_new_host_key=False, stack=None):
    """Zero-downtime, health-gated deploy of a commit, with automatic switch-back."""
    model = load_stack(stack)
    _, tag = resolve_ref(ref)
    d = make_deploy(model, env, host, dry_run, accept_new_host_key=accept_new_host_key)
    if dry_run:
        print(f"# dry run: deploy {tag} to {env}; nothing is changed\n")
    result = _run(lambda: d.deploy(ref), d)
    if not dry_run:
        print(f"\n{env} now serves {result['release']} ({result['seconds']:.0f}s).")


@task(
    help={
        "env": "environment: prod or staging",
        "to": "commit to return to (default: the previous good release)",
        "host": "host (default: the environment's)",
        "dry_run": "print, change nothing",
    }
)
def rollback(c, env, to=None, host=None, dry_run=False, stack=None):
    """Back to the previous good release in seconds (the database is not rolled back)."""
    model = load_stack(stack)
    d = make_deploy(model, env, host, dry_run, backup=False)
    result = _run(lambda: d.rollback(to), d)
    if not dry_run:
        print(
            f"\n{env} now serves {result['release']} again ({result['seconds']:.0f}s). "
            "The database was not rolled back; if a migration must be undone, restore a "
            f"backup: invoke backup.list --env {env}, then invoke backup.restore."
        )


def _run(fn, d: Deploy) -> dict:
    try:
        return fn()
    except OpsError:
        print(
            f"\n{d.env.name} still serves the previous release. The database is never "
            "rolled back automatically (see invoke backup.restore).",
            file=sys.stderr,
        )
        raise


@task(help={"env": "environment: prod or staging"})
def migrate(c, env, stack=None):
    """Run the live release's migrations in a one-off container, straight to PostgreSQL."""
    model = load_stack(stack)
    d = make_deploy(model, env, None, dry_run=False, backup=False)
    live = d.live()
    if not live:
        raise OpsError(f"{env} has no release yet: invoke deploy --env={env}")
    d.runner.run(
        cmd.one_off_app(model, d.env, d.state_dir, live.release, ["migrate", "--noinput"]),
        stream=True,
    )


@task(name="status", help={"env": "environment (default: all)"})
def lock_status(c, env=None, stack=None):
    """Who holds each environment's deploy lock, since when, for which version."""
    model = load_stack(stack)
    envs = [model.environment(env).name] if env else list(model.environments)
    for name in envs:
        runner, state_dir, _, _ = target(model, name, None)
        held = locks.read(runner, state_dir, locks.deploy_lock(name))
        print(f"{name}: " + (json.dumps(held) if held else "free"))


@task(
    name="release",
    help={"env": "environment whose lock to clear", "yes": "do not ask"},
)
def lock_release(c, env, yes=False, stack=None):
    """Clear a lock left by a deploy that died (asks first)."""
    model = load_stack(stack)
    runner, state_dir, _, _ = target(model, env, None)
    held = locks.read(runner, state_dir, locks.deploy_lock(model.environment(env).name))
    if not held:
        print(f"{env}: not locked")
        return
    print(f"{env} is locked: {json.dumps(held)}")
    if not yes:
        if not sys.stdin.isatty():
            raise Exit("error: refusing without confirmation; pass --yes", code=1)
        if input("Release it? Only if that deploy is dead. [y/N] ").strip().lower() != "y":
            raise Exit("not released", code=1)
    locks.release(runner, state_dir, locks.deploy_lock(env))
    print(f"{env}: released")


lock = Collection("lock", lock_status, lock_release)
