"""The deploy lock: an atomic `mkdir` on the host, holding who, when and which version.

One lock per environment (a staging deploy never waits for a prod one). A second deploy
is refused with the holder's details; `invoke lock.release` clears a lock left by a deploy
that died (the holder's process is gone, or the machine rebooted).
"""

from __future__ import annotations

import json
import os
import socket

from .errors import OpsError
from .releases import now_iso, who
from .runners import Runner


class LockHeld(OpsError):
    pass


def lock_dir(state_dir: str, env: str) -> str:
    return f"{state_dir.rstrip('/')}/locks/deploy-{env}"


def acquire(runner: Runner, state_dir: str, env: str, version: str, action: str) -> dict:
    path = lock_dir(state_dir, env)
    runner.run(["mkdir", "-p", f"{state_dir.rstrip('/')}/locks"])
    info = {
        "env": env,
        "holder": who(),
        "since": now_iso(),
        "version": version,
        "action": action,
        "pid": os.getpid(),
        "from": socket.gethostname(),
    }
    if not runner.run(["mkdir", path], check=False).ok:
        held = read(runner, state_dir, env) or {}
        raise LockHeld(
            f"{env} is locked by {held.get('holder', 'someone')} since {held.get('since', '?')} "
            f"({held.get('action', 'deploy')} of {held.get('version', '?')}, pid "
            f"{held.get('pid', '?')} on {held.get('from', '?')}); wait for it to finish, or if "
            f"it died: invoke lock.release --env={env}"
        )
    runner.write_file(f"{path}/holder.json", json.dumps(info, indent=2) + "\n")
    return info


def read(runner: Runner, state_dir: str, env: str) -> dict | None:
    data = runner.read_file(f"{lock_dir(state_dir, env)}/holder.json")
    if data is None:
        return None
    try:
        return json.loads(data)
    except ValueError:
        return {"holder": "unknown (unreadable holder.json)"}


def release(runner: Runner, state_dir: str, env: str) -> None:
    runner.run(["rm", "-rf", lock_dir(state_dir, env)])
