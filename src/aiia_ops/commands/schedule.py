"""The host's schedule: daily backups, the daily TLS renewal check, the monitor every minute.

Cron on the host, not a scheduler container: cron is already part of a Debian server, uses
no memory between runs, and each job is the same `invoke` task a person runs. Nothing of
it counts against the 512 MB the containers share. The file is rendered from the stack
(backups.daily_at, monitoring.interval) and installed as /etc/cron.d/<project> (aiia for
deploy/stack.yml): a second stack on the same host (another project) gets its own file
instead of replacing the first one's schedule.
"""

from __future__ import annotations

import datetime as _dt
import shlex
from dataclasses import dataclass

from aiia_ops.model import Stack

CRON_DIR = "/etc/cron.d"


def cron_path(project: str, override: str | None = None) -> str:
    """Where the schedule goes: /etc/cron.d/<project> (the project name is validated as an
    identifier, which cron's file-name rule also admits), or `override` ($AIIA_CRON_FILE
    lets tests write it without activating it)."""
    return override or f"{CRON_DIR}/{project}"


def is_active(path: str) -> bool:
    """A file cron itself reads (so cron must be running), not a test's copy."""
    return path.startswith(f"{CRON_DIR}/")


@dataclass(frozen=True)
class Job:
    minute: str
    hour: str
    task: list[str]
    why: str


def utc_to_local(hhmm: str, utc_offset: _dt.timedelta) -> tuple[int, int]:
    """cron reads the host's local time; the stack says UTC."""
    h, m = map(int, hhmm.split(":"))
    minutes = (h * 60 + m + int(utc_offset.total_seconds() // 60)) % (24 * 60)
    return minutes // 60, minutes % 60


def jobs(stack: Stack, utc_offset: _dt.timedelta = _dt.timedelta(0)) -> list[Job]:
    hour, minute = utc_to_local(stack.backups.daily_at, utc_offset)
    out = []
    for i, env in enumerate(stack.environments):
        # Environments a few minutes apart: never two dumps at once on 2 vCPUs.
        h, m = divmod(hour * 60 + minute + 10 * i, 60)
        out.append(
            Job(
                str(m),
                str(h % 24),
                ["backup", "--kind", "daily", "--env", env],
                f"daily backup of {env}: backups.daily_at {stack.backups.daily_at} UTC"
                + (f" + {10 * i} min" if i else ""),
            )
        )
    pitr = stack.backups.pitr
    if pitr is not None and pitr.enabled:  # pgBackRest base backup: full weekly, diff daily
        bh, bm = utc_to_local(pitr.base_at, utc_offset)
        out.append(
            Job(
                str(bm),
                str(bh),
                ["backup.base", "--kind", "auto"],
                f"pgBackRest base backup at {pitr.base_at} UTC: full on {pitr.full_weekday}, "
                "differential the other days",
            )
        )
        out.append(
            Job(
                str(pitr.files_minute),
                "*",
                ["backup.media"],
                "media and configuration set off-site (restic, incremental): hourly",
            )
        )
    rh, rm = utc_to_local("03:30", utc_offset)
    out.append(
        Job(
            str(rm),
            str(rh),
            ["ssl-renew"],
            f"daily TLS renewal check (renews at {stack.tls.acme.renew_before} left)",
        )
    )
    lh, lm = utc_to_local("00:05", utc_offset)
    out.append(
        Job(str(lm), str(lh), ["logrotate"], "daily log rotation (nginx access log, cron.log)")
    )
    out.append(
        Job(
            "35",
            "*",
            ["logrotate", "--if-larger"],
            f"hourly: rotate a log past {stack.services.nginx.settings.access_log_max}",
        )
    )
    every = max(1, stack.monitoring.interval.whole_seconds // 60)
    out.append(
        Job(
            "*" if every == 1 else f"*/{every}",
            "*",
            ["monitor", "--quiet"],
            f"monitor every {stack.monitoring.interval}: status page and alerts",
        )
    )
    return out


def cron_file(
    stack: Stack,
    repo: str,
    python: str,
    env: dict[str, str],
    utc_offset: _dt.timedelta = _dt.timedelta(0),
) -> str:
    log = f"{env.get('AIIA_STATE_DIR', '/var/lib/aiia')}/logs/cron.log"
    lines = [
        "# Installed by `invoke setup` from deploy/stack.yml; edit the stack, not this file.",
        "SHELL=/bin/sh",
        "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
        *(f"{k}={v}" for k, v in sorted(env.items())),
        "",
    ]
    for job in jobs(stack, utc_offset):
        command = shlex.join([python, "-m", "invoke", *job.task])
        lines += [
            f"# {job.why}",
            f"{job.minute} {job.hour} * * * root cd {shlex.quote(repo)} && {command} "
            f">> {shlex.quote(log)} 2>&1",
        ]
    return "\n".join(lines) + "\n"


def host_utc_offset() -> _dt.timedelta:
    return _dt.datetime.now().astimezone().utcoffset() or _dt.timedelta(0)


def cron_daemon_commands(running: bool, installed: bool, systemd: bool) -> list[list[str]]:
    """What it takes for cron to run the file (none when it already runs)."""
    if running:
        return []
    out = [] if installed else [["apt-get", "install", "-y", "--no-install-recommends", "cron"]]
    out.append(["systemctl", "enable", "--now", "cron"] if systemd else ["/usr/sbin/cron"])
    return out
