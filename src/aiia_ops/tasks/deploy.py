"""invoke deploy | rollback | migrate | lock.status | lock.release."""

from __future__ import annotations

from invoke import Collection

from aiia_ops.flows import deploy as flow
from aiia_ops.flows import locks
from aiia_ops.tasks.common import load, task


@task(
    help={
        "env": "environment: prod or staging",
        "host": "a host of deploy/stack.yml or user@address[:port] (default: the environment's)",
        "ref": "git commit, branch or tag to deploy (default: HEAD)",
        "dry_run": "print the exact commands, per host, in order; change nothing",
        "accept_new_host_key": "first contact with an SSH host: record its key (a changed "
        "key is still refused)",
        "backup": "take the pre-deploy backup (default; --no-backup skips it)",
    }
)
def deploy(
    c, env, host=None, ref=None, dry_run=False, accept_new_host_key=False, backup=True, stack=None
):
    """Zero-downtime, health-gated deploy of a commit, with automatic switch-back. A deploy
    killed at any step is resumed by running it again."""
    model, _ = load(stack, swarm=True)
    result = flow.deploy(
        model,
        env,
        ref,
        host=host,
        dry_run=dry_run,
        accept_new_host_key=accept_new_host_key,
        backup=backup,
    )
    if not result["dry_run"]:
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
    model, _ = load(stack, swarm=True)
    result = flow.rollback(model, env, to, host=host, dry_run=dry_run)
    if not result["dry_run"]:
        print(
            f"\n{env} now serves {result['release']} again ({result['seconds']:.0f}s). "
            "The database was not rolled back; if a migration must be undone, restore a "
            f"backup: invoke backup.list --env {env}, then invoke backup.restore."
        )


@task(help={"env": "environment: prod or staging"})
def migrate(c, env, stack=None):
    """Run the live release's migrations in a one-off container, straight to PostgreSQL."""
    model, _ = load(stack)
    release = flow.migrate(model, env)
    print(f"\n{env}: migrations of {release} applied.")


@task(name="status", help={"host": "a host of the stack (default: every host)"})
def lock_status(c, host=None, stack=None):
    """Every lock held (deploy-ENV, backup-ENV, renew, monitor): who, since when, what, pid."""
    model, _ = load(stack)
    locks.status(model, host)


@task(
    name="release",
    help={
        "env": "environment whose deploy lock to clear",
        "name": "any lock by name (see invoke lock.status), e.g. backup-prod or renew",
        "host": "host (default: the environment's, or the stack's only host)",
        "yes": "do not ask",
    },
)
def lock_release(c, env=None, name=None, host=None, yes=False, stack=None):
    """Clear a lock left by an operation that died (asks first)."""
    model, _ = load(stack)
    locks.release(model, env=env, name=name, host=host, yes=yes)


lock = Collection("lock", lock_status, lock_release)
