"""`invoke provision` and `invoke engine.stop`: the procedure is flows/provision.py."""

from __future__ import annotations

import time

from invoke import Exit

from aiia_ops.errors import OpsError
from aiia_ops.flows import provision as flow
from aiia_ops.host.runners import LocalRunner, PrintingRunner
from aiia_ops.tasks.common import task


@task(
    help={
        "dry_run": "print the plan's exact commands (facts are read, nothing is changed)",
        "verbose": "show the output of each command as it runs",
    }
)
def provision(c, dry_run=False, verbose=False):
    """Make this machine able to run the stack: Docker engine, compose v2, base images."""
    try:
        if dry_run:  # the facts are this machine's; nothing the plan says is run
            flow.print_plan(flow.plan(PrintingRunner(reader=LocalRunner())))
            return
        started = time.monotonic()
        timings = flow.provision(LocalRunner(), verbose=verbose)
    except OpsError as exc:
        raise Exit(f"provision: {exc}") from None
    print("\n" + flow.timings_table(timings, time.monotonic() - started))


@task(name="stop")
def engine_stop(c):
    """Stop the dockerd that `invoke provision` started (by its pidfile), and only that one."""
    try:
        flow.engine_stop(LocalRunner())
    except OpsError as exc:
        raise Exit(f"engine.stop: {exc}") from None
