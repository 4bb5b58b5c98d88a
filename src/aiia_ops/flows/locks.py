"""invoke lock.status / lock.release: every lock held on a host, and clearing one a dead
operation left behind (after asking)."""

from __future__ import annotations

from aiia_ops.errors import OpsError
from aiia_ops.flows.output import table
from aiia_ops.flows.steps import confirm
from aiia_ops.flows.targets import Target, host_target, target
from aiia_ops.host import lock as locks
from aiia_ops.model import Stack

COLUMNS = ["lock", "holder", "since", "action", "version", "pid", "from"]


def stack_hosts(model: Stack) -> list[str]:
    """The hosts the environments run on, in the stack's order."""
    return list(dict.fromkeys(h for env in model.environments.values() for h in env.hosts))


def status(model: Stack, host: str | None = None, out=print) -> dict[str, dict[str, dict]]:
    """Print the held locks of --host (default: every host of the stack); return them."""
    held_by_host = {}
    for name in [host] if host else stack_hosts(model):
        where = host_target(model, name)
        held = locks.held_locks(where.runner, where.state_dir)
        held_by_host[name] = held
        out(f"{name} ({where.state_dir}/locks):")
        if not held:
            out("  no lock held")
            continue
        rows = [[lock, *(h.get(k, "") or "-" for k in COLUMNS[1:])] for lock, h in held.items()]
        out("\n".join("  " + line for line in table(COLUMNS, rows).splitlines()))
    return held_by_host


def release(
    model: Stack,
    env: str | None = None,
    name: str | None = None,
    host: str | None = None,
    yes: bool = False,
    out=print,
) -> bool:
    """Clear lock `name` (or the deploy lock of `env`); True if one was held and cleared."""
    if bool(env) == bool(name):
        raise OpsError(
            "say which lock: --env=ENV (its deploy lock) or --name=NAME (see invoke lock.status)"
        )
    lock = locks.deploy_lock(model.environment(env).name) if env else name
    where: Target = target(model, env, host) if env else host_target(model, host or _only(model))
    held = locks.read(where.runner, where.state_dir, lock)
    if not held:
        out(f"{lock} on {where.label}: not locked")
        return False
    out(f"{lock} on {where.label} is held by {locks.describe(held)}")
    confirm("Release it? Only if that operation is dead.", yes=yes, what=f"release {lock}")
    locks.release(where.runner, where.state_dir, lock)
    out(f"{lock} on {where.label}: released")
    return True


def _only(model: Stack) -> str:
    hosts = stack_hosts(model)
    if len(hosts) != 1:
        raise OpsError(f"the stack has several hosts ({', '.join(hosts)}); pass --host")
    return hosts[0]
