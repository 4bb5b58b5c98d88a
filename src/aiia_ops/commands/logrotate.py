"""Rotating the host's logs (nginx's access and error logs, the schedule's cron.log) as data.

logrotate's classic scheme, as commands for any runner (local or SSH, printed in a dry run):
`access.log` -> `access.log.1` (kept plain: a reader that was in the middle of it, the
monitor, can finish it), the previous `.1` -> `.2.gz`, ... up to `keep` generations; older
ones are deleted. nginx keeps writing to the file it has open until it is told to reopen
its logs (USR1 to the master), so the rename loses no line; cron.log is opened anew by each
job. Due daily, and earlier when a file has grown past `max_bytes` (checked hourly), so a
burst of traffic cannot fill the disk between two daily runs.
"""

from __future__ import annotations

import shlex
from dataclasses import dataclass


@dataclass(frozen=True)
class LogFile:
    path: str  # the live file, e.g. <state>/logs/nginx/access.log
    reopen: tuple[str, ...] = ()  # the command that makes the writer reopen it, if any


def generations(listing: list[str], name: str) -> list[int]:
    """The rotated generations present in a directory listing: 1 for `name.1`, N for
    `name.N.gz`; anything else (another file, a temp file) is ignored."""
    found = []
    for entry in listing:
        if entry == f"{name}.1":
            found.append(1)
        elif entry.startswith(f"{name}.") and entry.endswith(".gz"):
            middle = entry[len(name) + 1 : -3]
            if middle.isdigit() and int(middle) >= 2:
                found.append(int(middle))
    return sorted(set(found))


def due(size: int | None, only_if_larger: bool, max_bytes: int) -> bool:
    """Rotate now? Not when the file is missing or empty; on the hourly check only past
    max_bytes; on the daily run whenever it has anything."""
    if not size:
        return False
    return size >= max_bytes if only_if_larger else True


def rotate(path: str, present: list[int], keep: int) -> list[list[str]]:
    """The commands that rotate `path` once, given the generations present, keeping `keep`
    rotated generations (the new .1 included). In an order that is safe to stop anywhere:
    the oldest goes first, nothing is overwritten, the live file moves last."""
    out: list[list[str]] = []
    for n in sorted((g for g in present if g >= keep), reverse=True):
        out.append(["rm", "-f", _name(path, n)])
    for n in sorted((g for g in present if 2 <= g < keep), reverse=True):
        out.append(["mv", "-f", _name(path, n), _name(path, n + 1)])
    if 1 in present and keep >= 2:
        # .1 -> .2.gz: compress into a temp name, then rename, so a stop halfway leaves
        # .1 intact instead of a truncated .2.gz
        tmp = f"{path}.2.gz.tmp"
        out.append(["sh", "-c", f"gzip -c {shlex.quote(path + '.1')} > {shlex.quote(tmp)}"])
        out.append(["mv", "-f", tmp, _name(path, 2)])
        out.append(["rm", "-f", f"{path}.1"])
    out.append(["mv", "-f", path, f"{path}.1"])
    return out


def _name(path: str, n: int) -> str:
    return f"{path}.1" if n == 1 else f"{path}.{n}.gz"


def nginx_reopen(container: str) -> tuple[str, ...]:
    """nginx's master reopens its log files on USR1 (its workers follow)."""
    return ("docker", "kill", "--signal", "USR1", container)
