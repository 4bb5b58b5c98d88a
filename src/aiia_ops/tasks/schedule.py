"""invoke schedule.show | schedule.install: the host's cron file for backups, TLS, monitor."""

from __future__ import annotations

from invoke import Collection

from aiia_ops.flows import schedule as flow
from aiia_ops.host.runners import LocalRunner
from aiia_ops.tasks.common import load, task


@task
def show(c, stack=None):
    """Print the cron file `invoke setup` installs."""
    print(flow.render(*load(stack)), end="")


@task
def install(c, stack=None):
    """Install the cron file (and start cron if it does not run)."""
    model, state = load(stack)
    print(f"installed {flow.install_schedule(model, state, LocalRunner())}")


namespace = Collection("schedule", show, install)
