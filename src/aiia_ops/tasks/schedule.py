"""invoke schedule.show | schedule.install: the host's cron file for backups, TLS, monitor."""

from __future__ import annotations

import sys
from pathlib import Path

from invoke import Collection

from aiia_ops import REPO_ROOT
from aiia_ops.commands import schedule as sched
from aiia_ops.host.runners import LocalRunner, Runner
from aiia_ops.model import Stack, load_stack
from aiia_ops.model.state import StateDir, local_state_dir
from aiia_ops.tasks.common import task


def render(model: Stack, state: StateDir) -> str:
    env = {"AIIA_STATE_DIR": str(state.root), "AIIA_STACK": str(Path(model.source).resolve())}
    return sched.cron_file(model, str(REPO_ROOT), sys.executable, env, sched.host_utc_offset())


def install_schedule(model: Stack, state: StateDir, runner: Runner) -> str:
    path = sched.cron_path()
    runner.write_file(path, render(model, state), mode=0o644)
    if path == sched.CRON_FILE:  # the real one: cron must be running to read it
        running = runner.run(["pgrep", "-x", "cron"], check=False).ok
        installed = Path("/usr/sbin/cron").exists()
        systemd = Path("/run/systemd/system").exists()
        for argv in sched.cron_daemon_commands(running, installed, systemd):
            runner.run(argv)
    return path


@task
def show(c, stack=None):
    """Print the cron file `invoke setup` installs."""
    model = load_stack(stack)
    print(render(model, local_state_dir(model)), end="")


@task
def install(c, stack=None):
    """Install the cron file (and start cron if it does not run)."""
    model = load_stack(stack)
    print(f"installed {install_schedule(model, local_state_dir(model), LocalRunner())}")


namespace = Collection("schedule", show, install)
