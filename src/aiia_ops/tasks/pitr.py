"""invoke backup.pitr | backup.pitr-init | backup.base | offsite.up | offsite.down

Point-in-time recovery with pgBackRest (flows/pitr.py) and the lab's off-site S3 store
(flows/offsite.py). See docs/backups-offsite.md.
"""

from __future__ import annotations

import os

from invoke import Collection

from aiia_ops.commands import lab
from aiia_ops.errors import OpsError
from aiia_ops.flows import offsite as store
from aiia_ops.flows import pitr as flow
from aiia_ops.host.runners import LocalRunner
from aiia_ops.host.secrets import load_secrets
from aiia_ops.tasks.common import load, task


@task(
    help={
        "env": "environment to restore: prod or staging",
        "to": "'latest' or a moment such as '2026-12-02 01:30:00' (UTC unless it has an offset)",
        "yes": "do not ask",
    }
)
def pitr(c, env, to, yes=False, stack=None):
    """Restore one environment's database to a moment, from the off-site repository."""
    model, state = load(stack)
    runner = LocalRunner()
    runner.redact(*load_secrets(state.root, list(model.environments), create=False).values())
    r = flow.pitr(model, state, env, to, runner, yes=yes)
    print(
        f"\n{env} restored to {r['target']} in {r['pitr_s']}s (set {r['pitr_set']}, switch "
        f"{r['switch_s']}s; safety backup: {r['safety_backup'] or 'none'}); /health/ answers 200",
        flush=True,
    )


@task(name="pitr-init")
def pitr_init(c, stack=None):
    """Create the stanza in the off-site repository, check archiving, take the first full."""
    model, _ = load(stack)
    print(flow.init(model, LocalRunner()), flush=True)


@task(
    help={"kind": "auto (default: full on backups.pitr.full_weekday, else diff), full, diff, incr"}
)
def base(c, kind="auto", stack=None):
    """A pgBackRest base backup to the off-site repository (the cron runs this daily)."""
    model, _ = load(stack)
    print(flow.base_backup(model, LocalRunner(), kind), flush=True)


def _lab_host(name: str):
    k = name.removeprefix("lab")
    if not name.startswith("lab") or not k.isdigit():
        raise OpsError(f"--host {name!r}: expected a lab host such as lab9 (docs/lab.md)")
    from aiia_ops.host.ssh import SSHRunner

    net = lab.NET
    root = lab.lab_dir(os.environ)
    address = net.address(int(k))
    runner = SSHRunner(
        f"root@{address}:22",
        key_filename=f"{root}/id_ed25519",
        known_hosts=f"{root}/known_hosts",
        host=name,
    )
    return runner, address, f"{root}/{name}/offsite"


@task(name="up", help={"host": "the lab host for the store, e.g. lab9"})
def offsite_up(c, host, stack=None):
    """Start the S3 store (SeaweedFS) on a lab host with the stack's bucket and keys."""
    model, state = load(stack)
    secrets = load_secrets(state.root, list(model.environments))
    runner, address, data = _lab_host(host)
    runner.redact(*secrets.values())
    print(store.up(model, secrets, runner, address, data), flush=True)


@task(name="down", help={"host": "the lab host of the store", "wipe": "delete its data too"})
def offsite_down(c, host, wipe=False):
    """Stop the store (its data stays unless --wipe)."""
    runner, _, data = _lab_host(host)
    print(store.down(runner, data, wipe), flush=True)


BACKUP_TASKS = (pitr, pitr_init, base)
offsite = Collection("offsite", offsite_up, offsite_down)
