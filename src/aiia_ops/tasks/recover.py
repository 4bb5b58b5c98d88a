"""invoke recover | secrets.export | backup.media: the loss of the server (flows/recover.py,
flows/offsite_files.py, host/export.py; docs/disaster-recovery.md)."""

from __future__ import annotations

import getpass
import os
import sys
from pathlib import Path

from invoke import Collection

from aiia_ops.errors import OpsError
from aiia_ops.flows import offsite_files as files
from aiia_ops.flows import recover as flow
from aiia_ops.host import export
from aiia_ops.host.runners import LocalRunner
from aiia_ops.host.secrets import load_secrets
from aiia_ops.model import load_stack
from aiia_ops.tasks.common import load, task


def passphrase(twice: bool) -> str:
    value = os.environ.get(export.PASS_VAR)
    if value:
        return value
    if not sys.stdin.isatty():
        raise OpsError(f"no passphrase: set {export.PASS_VAR} or run in a terminal to type it")
    value = getpass.getpass("export passphrase: ")
    if twice and getpass.getpass("again: ") != value:
        raise OpsError("the two passphrases differ; nothing was written")
    return value


@task(name="export", help={"out": "the file to write (0600); keep it off the server"})
def export_(c, out, stack=None):
    """Every secret of this host in one file, encrypted with a passphrase
    ($AIIA_EXPORT_PASSPHRASE, or asked): what `invoke recover` needs besides the store."""
    model, state = load(stack)
    load_secrets(state.root, list(model.environments), create=False)  # all there, or say so
    names = ["shared", *model.environments]
    n = export.export(state.root, model.project, names, Path(out), passphrase(twice=True))
    print(f"{n} secrets files exported to {out} (aes-256-cbc, pbkdf2; docs/disaster-recovery.md)")


@task
def media(c, stack=None):
    """Copy the media and the configuration set off-site (restic, incremental, encrypted)."""
    model, state = load(stack)
    runner = LocalRunner()
    runner.redact(*load_secrets(state.root, list(model.environments), create=False).values())
    r = files.backup(model, state, runner)
    print(
        f"off-site copy {r['snapshot']} in {r['seconds']}s: {r['files']} files "
        f"({r['files_new']} new, {r['files_changed']} changed), {r['added']} bytes sent; "
        f"storage of {', '.join(r['environments']) or 'no environment'}",
        flush=True,
    )


@task(
    help={
        "host": "the new host: a host of the stack with ssh:, or user@address[:port]",
        "secrets": "the file `invoke secrets.export` wrote (passphrase: $AIIA_EXPORT_PASSPHRASE)",
        "yes": "do not ask",
    }
)
def recover(c, host, secrets, yes=False, stack=None):
    """The whole server onto a new host from the off-site store alone (the old one is never
    contacted): images, secrets, configs, database to the newest moment, media, health."""
    model = load_stack(stack)
    flow.recover(model, host, Path(secrets), passphrase(twice=False), yes=yes)


secrets_ns = Collection("secrets", export_)
