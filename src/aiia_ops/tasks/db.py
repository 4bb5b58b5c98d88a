"""invoke db.build | db.tag | db.up | db.status | db.switchover | db.down

Level 4's replicated PostgreSQL: Patroni + etcd + HAProxy on the stack's
`replication.hosts` (flows/patroni.py, docs/patroni.md). Use a profile that sets them:
`AIIA_PROFILE=patroni-lab invoke db.up`.
"""

from __future__ import annotations

import json

from invoke import Collection

from aiia_ops.flows import patroni as flow
from aiia_ops.flows.output import table
from aiia_ops.host.runners import LocalRunner
from aiia_ops.model import load_stack
from aiia_ops.model.state import local_state_dir
from aiia_ops.tasks.common import task


def _load(stack, profile):
    model = load_stack(stack, profile)
    flow.p.members(model)  # refuses a stack without three database hosts, with the fix
    return model, local_state_dir(model).root


@task
def build(c, stack=None, profile=None):
    """Build aiia/patroni (Patroni, etcd, HAProxy: Debian 13) FROM this checkout's aiia/postgres."""
    model, _ = _load(stack, profile)
    print(f"built {flow.build(model, LocalRunner())}", flush=True)


@task
def tag(c, stack=None, profile=None):
    """Print the image this checkout's db.up runs (aiia/patroni:<tag>)."""
    print(flow.image(load_stack(stack, profile)))


@task
def up(c, stack=None, profile=None):
    """Ship the image, render configs, start etcd, Patroni and HAProxy on every database host."""
    model, root = _load(stack, profile)
    states = flow.up(model, root, LocalRunner())
    _print_members(states)
    r = model.replication
    first = model.hosts[r.hosts[0]].address
    print(f"\nwrites: {first}:{r.write_port} (primary), reads: {first}:{r.read_port} (replicas); "
          "any database host's HAProxy serves both", flush=True)  # fmt: skip


@task(help={"json": "machine-readable output"})
def status(c, json_=False, stack=None, profile=None):
    """Each member: role, state, timeline, lag, and its containers' memory."""
    model, _ = _load(stack, profile)
    states, mem = flow.status(model)
    if json_:
        print(json.dumps({"members": [s.__dict__ for s in states], "memory_mib": mem}, indent=2))
        return
    _print_members(states, mem)


@task(name="switchover", help={"to": "the replica to promote (default: Patroni picks)",
                               "yes": "do not ask"})  # fmt: skip
def switchover(c, to=None, yes=False, stack=None, profile=None):
    """A planned change of primary (the old one follows the new one as a replica)."""
    model, _ = _load(stack, profile)
    old, new, took = flow.switchover(model, to, yes)
    print(f"primary {old} -> {new} in {took:.1f}s", flush=True)


@task(help={"wipe": "also delete every member's data (asks for the cluster's name)",
            "yes": "do not ask"})  # fmt: skip
def down(c, wipe=False, yes=False, stack=None, profile=None):
    """Stop and remove the cluster's containers (data kept unless --wipe)."""
    model, _ = _load(stack, profile)
    flow.down(model, wipe, yes)
    print("cluster removed" + (" with its data" if wipe else " (data volumes kept)"), flush=True)


def _print_members(states, mem=None) -> None:
    if not states:
        print("no member answers (invoke db.up starts them)")
        return
    rows = []
    for s in states:
        used = mem.get(s.name, {}) if mem else {}
        extra = [" ".join(f"{k.removeprefix('aiia_')} {v}" for k, v in used.items())] if mem else []
        lag = "" if s.lag_mb is None else f"{s.lag_mb:g} MB"
        rows.append([s.name, s.host, s.role, s.state, s.timeline or "", lag, *extra])
    headers = ["member", "host", "role", "state", "timeline", "lag"]
    print(table(headers + (["memory MiB"] if mem else []), rows), flush=True)


namespace = Collection("db", build, tag, up, status, switchover, down)
