"""invoke backup | backup.list | backup.prune | backup.verify | backup.restore

Options -> stack -> one flow (flows/backup.py, flows/restore.py) -> output. A --dry-run
runs the same flow with a printing runner whose facts are real: every change is printed,
nothing is written. See docs/backups.md and docs/disaster-recovery.md.
"""

from __future__ import annotations

from invoke import Collection

from aiia_ops.commands import backups as bk
from aiia_ops.commands import pgbackrest
from aiia_ops.errors import OpsError
from aiia_ops.flows import backup as flow
from aiia_ops.flows import pitr as pitr_flow
from aiia_ops.flows import restore as restores
from aiia_ops.host.runners import LocalRunner, PrintingRunner, Runner
from aiia_ops.tasks.common import load, task

DRY_RUN = "print every command and file write (facts are read for real); change nothing"


def runner_for(dry_run: bool) -> Runner:
    return PrintingRunner(reader=LocalRunner()) if dry_run else LocalRunner()


@task(
    default=True,
    help={
        "env": "environment to back up: prod (default) or staging",
        "kind": "manual (default), daily (the 02:00 UTC cron) or pre-deploy",
        "dry_run": DRY_RUN,
    },
)
def backup(c, env="prod", kind="manual", dry_run=False, stack=None):
    """Back up one environment (database, media, configs, manifest) while it serves."""
    model, state = load(stack)
    if kind not in bk.KINDS:
        raise OpsError(f"unknown kind {kind!r}; expected one of: {', '.join(bk.KINDS)}")
    record = flow.take_backup(model, state, env, kind, runner_for(dry_run))
    print(record.path, flush=True)


@task(name="list", help={"env": "only this environment", "json": "print JSON for machines"})
def list_(c, env=None, json_=False, stack=None):
    """The backups on this machine: id, kind, environment, size, age, last verified."""
    model, state = load(stack)
    if env:
        model.environment(env)
    print(flow.list_text(state, env, json_))
    if not json_ and pgbackrest.pitr_of(model) is not None:  # the off-site repository's window
        print(pitr_flow.list_text(model, LocalRunner()))


@task(help={"env": "only this environment (default: all)", "dry_run": DRY_RUN})
def prune(c, env=None, dry_run=False, stack=None):
    """Delete backups beyond the retention of stack.yml (never the newest verified one)."""
    model, state = load(stack)
    print(flow.prune(model, state, env, runner_for(dry_run)), flush=True)


@task(
    help={
        "id": "backup id (default: the newest backup of each environment, or of --env)",
        "env": "with no id: the newest backup of this environment",
    },
)
def verify(c, id=None, env=None, stack=None):
    """Checksums, then a real restore into a scratch database, compared with the source."""
    model, state = load(stack)
    restores.verify(model, state, id, env, LocalRunner())


@task(
    help={
        "env": "environment to restore: prod or staging",
        "id": "backup id (invoke backup.list), or 'latest': the newest verified one",
        "yes": "do not ask",
        "allow_other_env": "restore a backup taken of another environment",
        "no_safety_backup": "skip the safety backup (only when the database is beyond saving)",
        "no_media": "restore the database only, not the media",
        "dry_run": DRY_RUN + " (and nothing to confirm)",
    }
)
def restore(
    c,
    env,
    id,
    yes=False,
    allow_other_env=False,
    no_safety_backup=False,
    no_media=False,
    dry_run=False,
    stack=None,
):
    """Restore a backup: safety backup, restore beside the live database, swap, health."""
    model, state = load(stack)
    report = restores.restore_backup(
        model,
        state,
        env,
        id,
        runner_for(dry_run),
        yes=yes or dry_run,
        allow_other_env=allow_other_env,
        safety=not no_safety_backup,
        media=not no_media,
    )
    if dry_run:
        print(f"\ndry run of restoring {env} from {report['id']}: nothing was changed")
        return
    print(
        f"\n{env} restored from {report['id']} in {report['duration_s']}s "
        f"(switch {report.get('switch_s', '-')}s; "
        f"safety backup: {report['safety_backup'] or 'none'}); "
        "/health/ answers 200",
        flush=True,
    )


from aiia_ops.tasks.pitr import BACKUP_TASKS  # noqa: E402  (backup.pitr, .pitr-init, .base)

namespace = Collection("backup", backup, list_, prune, verify, restore, *BACKUP_TASKS)
