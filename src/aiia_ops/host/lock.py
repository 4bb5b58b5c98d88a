"""The one lock: an atomic `mkdir` on the target host, holding who, when, what and which pid.

Used by every operation that must not overlap: `deploy-<env>` (deploy, rollback, migrate),
`backup-<env>` (backup, restore, verify, prune), `renew` (ssl-renew), `monitor` (one run at
a time). It works through any runner, so a lock on a remote host is taken over SSH.

A lock whose holder ran on this machine and whose process is gone is stale: it is reported
and taken over. So is a lock directory without holder.json older than EMPTY_STALE seconds
(its taker was killed between the mkdir and the write: the holder file is written right
after the mkdir, atomically, so a live taker is never that slow). Any other held lock is
refused with its holder and the exact command that clears it (`invoke lock.release --name
NAME`).
"""

from __future__ import annotations

import json
import os
import re
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime

from aiia_ops.errors import OpsError
from aiia_ops.host.faults import failpoint
from aiia_ops.host.releases import now_iso, who
from aiia_ops.host.runners import Runner
from aiia_ops.host.signals import shielded


class LockHeld(OpsError):
    pass


# A lock dir this old without holder.json was left by a taker killed between its mkdir and
# its write (both are one command each, back to back, even over SSH): taken over.
EMPTY_STALE = 10.0
NO_HOLDER = "unknown (no holder.json yet)"


def locks_dir(state_dir: str) -> str:
    return f"{str(state_dir).rstrip('/')}/locks"


LOCK_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,100}")


def check_lock_name(name: object) -> str:
    """A lock is a directory under <state>/locks: its name is one plain path component."""
    if not isinstance(name, str) or not LOCK_NAME.fullmatch(name):
        raise OpsError(
            f"lock name {name!r}: a lock name is 1-101 of A-Z a-z 0-9 _ . -, starting with a "
            "letter or digit (invoke lock.status lists them). Nothing was changed"
        )
    return name


def lock_dir(state_dir: str, name: str) -> str:
    return f"{locks_dir(state_dir)}/{check_lock_name(name)}"


def deploy_lock(env: str) -> str:
    return f"deploy-{env}"


def backup_lock(env: str) -> str:
    return f"backup-{env}"


def holder_alive(held: dict) -> bool | None:
    """True/False when the holder ran on this machine (its pid is checked); None otherwise."""
    if held.get("from") != socket.gethostname() or not isinstance(held.get("pid"), int):
        return None
    if held["pid"] == os.getpid():
        return True
    try:
        os.kill(held["pid"], 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def age_seconds(held: dict, now: float | None = None) -> float | None:
    """How long ago the holder took the lock (None: unknown)."""
    try:
        since = datetime.fromisoformat(str(held["since"]).replace("Z", "+00:00"))
    except (KeyError, ValueError):
        return None
    if since.tzinfo is None:
        return None
    return (now if now is not None else time.time()) - since.timestamp()


def describe(held: dict) -> str:
    return (
        f"{held.get('holder', 'someone')} since {held.get('since', '?')} "
        f"({held.get('action', '?')} of {held.get('version') or '-'}, pid "
        f"{held.get('pid', '?')} on {held.get('from', '?')})"
    )


def acquire(
    runner: Runner,
    state_dir: str,
    name: str,
    *,
    version: str = "",
    action: str = "",
    wait: float = 0.0,
    release_hint: str | None = None,
    out=print,
    max_age: float | None = None,
) -> dict:
    """Take lock `name` or raise LockHeld; waits up to `wait` seconds for a live holder.
    Stale, reported and taken over: a holder on this machine whose pid is gone, a lock dir
    without holder.json older than EMPTY_STALE seconds, or (with `max_age`) a holder that
    cannot be checked from here and is older than `max_age` seconds."""
    path = lock_dir(state_dir, name)
    runner.run(["mkdir", "-p", locks_dir(state_dir)])
    info = {
        "name": name,
        "holder": who(),
        "since": now_iso(),
        "version": version,
        "action": action,
        "pid": os.getpid(),
        "from": socket.gethostname(),
    }
    deadline = time.monotonic() + wait
    while not _take(runner, path, name, info):
        held = read(runner, state_dir, name) or {}
        empty_for = None
        if held.get("holder") == NO_HOLDER:
            empty_for = dir_age(runner, path)
            if empty_for is not None and empty_for > EMPTY_STALE:
                out(
                    f"   taking over a stale lock {name}: its directory has had no "
                    f"holder.json for {empty_for:.0f} s (a run killed while taking it)"
                )
                runner.run(["rm", "-rf", path])
                continue
        alive = holder_alive(held)
        if alive is False:
            out(f"   taking over a stale lock {name}: {describe(held)} is no longer running")
            runner.run(["rm", "-rf", path])
            continue
        age = age_seconds(held)
        if alive is None and max_age is not None and age is not None and age > max_age:
            out(
                f"   taking over a stale lock {name}: {describe(held)} is older than "
                f"{max_age / 3600:g} h"
            )
            runner.run(["rm", "-rf", path])
            continue
        if time.monotonic() < deadline:
            time.sleep(0.5)
            continue
        hint = release_hint or f"invoke lock.release --name {name}"
        if held.get("holder") == NO_HOLDER:
            left = max(1.0, EMPTY_STALE - (empty_for or 0.0))
            raise LockHeld(
                f"{name} is being taken by another run (its directory has no holder.json "
                f"yet); retry in {left:.0f} s: a run killed while taking it is then taken "
                f"over; or if it died: {hint}"
            )
        raise LockHeld(
            f"{name} is locked by {describe(held)}; wait for it to finish, or if it died: {hint}"
        )
    return info


def _take(runner: Runner, path: str, name: str, info: dict) -> bool:
    """mkdir, then holder.json, with SIGINT/SIGTERM/SIGHUP held in between (a signal there
    would leave a lock nobody is named in): raised once the holder is written, and then the
    lock is let go again. Only SIGKILL can leave the dir empty (see EMPTY_STALE)."""
    taken = False
    try:
        with shielded():
            if not runner.run(["mkdir", path], check=False).ok:
                return False
            taken = True
            failpoint(f"lock:{name}")  # the crash tests: killed between mkdir and write
            runner.write_file(f"{path}/holder.json", json.dumps(info, indent=2) + "\n")
    except BaseException:
        if taken:
            runner.run(["rm", "-rf", path], check=False)
        raise
    return True


def dir_age(runner: Runner, path: str) -> float | None:
    """Seconds since `path` was last changed, by the host's own clock (None: unknown)."""
    mtime = runner.query(["stat", "-c", "%Y", path])
    now = runner.query(["date", "+%s"])
    try:
        return float(now.stdout.strip()) - float(mtime.stdout.strip())
    except ValueError:
        return None


def read(runner: Runner, state_dir: str, name: str) -> dict | None:
    data = runner.read_file(f"{lock_dir(state_dir, name)}/holder.json")
    if data is None:
        # mkdir done, holder.json not yet written (or lost): still held
        exists = runner.query(["test", "-d", lock_dir(state_dir, name)]).ok
        return {"holder": NO_HOLDER} if exists else None
    try:
        return json.loads(data)
    except ValueError:
        return {"holder": "unknown (unreadable holder.json)"}


def held_locks(runner: Runner, state_dir: str) -> dict[str, dict]:
    """Every lock held on the host, by name."""
    listing = runner.query(["ls", "-1", locks_dir(state_dir)])
    names = listing.stdout.split() if listing.ok else []
    names = [n for n in sorted(names) if LOCK_NAME.fullmatch(n)]  # never a stray file
    return {n: h for n in names if (h := read(runner, state_dir, n)) is not None}


def release(runner: Runner, state_dir: str, name: str) -> None:
    runner.run(["rm", "-rf", lock_dir(state_dir, name)])


@contextmanager
def holding(runner: Runner, state_dir: str, name: str, **kw) -> Iterator[dict]:
    """`with holding(...)`: the lock for the block, released on any outcome."""
    info = acquire(runner, state_dir, name, **kw)
    try:
        yield info
    finally:
        # A SIGTERM during the `rm` (just after a block's last step: the fault matrix's
        # "nginx reloaded") killed it and left our own live pid holding the lock; the
        # recovery then waited SWITCH_WAIT for itself. Held until the lock is gone.
        with shielded():
            release(runner, state_dir, name)
