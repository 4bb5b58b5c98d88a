"""invoke logrotate [--if-larger] [--dry-run]: rotate nginx's access log and cron.log."""

from __future__ import annotations

from aiia_ops.flows import logrotate as flow
from aiia_ops.host.runners import LocalRunner, PrintingRunner
from aiia_ops.tasks.common import load, task


@task(
    help={
        "if_larger": "only files past services.nginx.settings.access_log_max (the hourly check)",
        "dry_run": "print the commands (sizes are read), change nothing",
    }
)
def logrotate(c, stack=None, if_larger=False, dry_run=False):
    """Rotate the host's log files: daily from the schedule, hourly --if-larger."""
    model, state = load(stack)
    runner = PrintingRunner(reader=LocalRunner()) if dry_run else LocalRunner()
    for line in flow.rotate_logs(model, state, runner, only_if_larger=if_larger):
        print(line)
