"""The host's cron file for backups, TLS renewal and the monitor: rendered, installed, and
cron started when it does not run (commands/schedule.py decides how)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

from aiia_ops import REPO_ROOT
from aiia_ops.commands import schedule as sched
from aiia_ops.host.runners import Runner
from aiia_ops.model import Stack
from aiia_ops.model.state import StateDir


def render(model: Stack, state: StateDir) -> str:
    env = {"AIIA_STATE_DIR": str(state.root), "AIIA_STACK": str(Path(model.source).resolve())}
    return sched.cron_file(model, str(REPO_ROOT), sys.executable, env, sched.host_utc_offset())


def install_schedule(model: Stack, state: StateDir, runner: Runner) -> str:
    """Write the cron file; returns its path."""
    path = sched.cron_path(model.project, os.environ.get("AIIA_CRON_FILE"))
    runner.write_file(path, render(model, state), mode=0o644)
    if sched.is_active(path):  # the real one: cron must be running to read it
        running = runner.query(["pgrep", "-x", "cron"]).ok
        installed = runner.query(["test", "-e", "/usr/sbin/cron"]).ok
        systemd = runner.query(["test", "-e", "/run/systemd/system"]).ok
        for argv in sched.cron_daemon_commands(running, installed, systemd):
            runner.run(argv)
    return path
