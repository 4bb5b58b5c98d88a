"""`invoke logrotate`: rotate the host's own log files (commands/logrotate.py decides how).

Container output is bounded by the engine (json-file, 10 MB x 3, commands/compose.py); what
the engine does not bound is nginx's access log in the state dir (every request, ~0.5 KB a
line) and the schedule's cron.log. The schedule runs this daily and `--if-larger` hourly."""

from __future__ import annotations

import posixpath

from aiia_ops.commands import logrotate as lr
from aiia_ops.host.runners import Runner
from aiia_ops.model import Stack
from aiia_ops.model.state import StateDir


def log_files(model: Stack, state: StateDir) -> list[lr.LogFile]:
    logs = state.root / "logs"
    nginx = lr.nginx_reopen(model.services.nginx.container)
    return [
        lr.LogFile(str(logs / "nginx" / "access.log"), nginx),
        lr.LogFile(str(logs / "cron.log")),
    ]


def size_of(runner: Runner, path: str) -> int | None:
    got = runner.query(["stat", "-c", "%s", path])
    text = got.stdout.strip() if got.ok else ""
    return int(text) if text.isdigit() else None


def rotate_logs(
    model: Stack, state: StateDir, runner: Runner, only_if_larger: bool = False
) -> list[str]:
    """Rotate what is due; returns one line per file saying what happened."""
    settings = model.services.nginx.settings
    done, reopen = [], []
    for log in log_files(model, state):
        size = size_of(runner, log.path)
        if not lr.due(size, only_if_larger, settings.access_log_max.bytes):
            state_word = "missing" if size is None else f"{size} bytes, not due"
            done.append(f"{log.path}: {state_word}")
            continue
        directory, name = posixpath.split(log.path)
        listing = runner.query(["ls", "-1", directory]).stdout.split()
        for argv in lr.rotate(log.path, lr.generations(listing, name), settings.access_log_keep):
            runner.run(argv)
        done.append(f"{log.path}: rotated ({size} bytes)")
        if log.reopen and log.reopen not in reopen:
            reopen.append(log.reopen)
    for argv in reopen:
        # nginx not running: it opens a new file when it starts; nothing is lost.
        result = runner.run(list(argv), check=False)
        if not result.ok:
            done.append(f"note: {' '.join(argv)} failed (not running?); it reopens at start")
    return done
