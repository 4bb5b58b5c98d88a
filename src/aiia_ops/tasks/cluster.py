"""invoke cluster.init | cluster.join | cluster.status | cluster.services: a Docker Swarm of
the stack's hosts over SSH (runtime: swarm; flows/swarm.py, docs/swarm.md)."""

from __future__ import annotations

import json

from invoke import Collection

from aiia_ops.flows import swarm as flow
from aiia_ops.flows.output import table
from aiia_ops.model import load_stack
from aiia_ops.tasks.common import task

KEY = "first contact with an SSH host: record its key (a changed key is still refused)"
COLUMNS = ["host", "address", "node", "state", "availability", "manager", "labels"]


def _print(rows: list[dict]) -> None:
    print(table(COLUMNS, [[r[k] for k in COLUMNS] for r in rows]))


@task(help={"accept_new_host_key": KEY})
def init(c, accept_new_host_key=False, stack=None, profile=None):
    """Form the swarm on the stack's hosts: the first inits, the others join as managers,
    every node is labelled with its host's roles (idempotent)."""
    _print(flow.cluster_init(load_stack(stack, profile), accept_new_host_key=accept_new_host_key))


@task(help={"host": "the stack's host to join (it joins as a manager)", "accept_new_host_key": KEY})
def join(c, host, accept_new_host_key=False, stack=None, profile=None):
    """Join one host of the stack to the swarm its first host leads, and label it."""
    model = load_stack(stack, profile)
    _print(flow.cluster_join(model, host, accept_new_host_key=accept_new_host_key))


@task(help={"json": "print JSON for machines"})
def status(c, json_=False, stack=None, profile=None):
    """Each host's swarm node: state, availability, manager status, role labels."""
    rows = flow.cluster_status(load_stack(stack, profile))
    if json_:
        print(json.dumps(rows, indent=2))
        return
    _print(rows)


@task(help={"json": "print JSON for machines"})
def services(c, json_=False, stack=None, profile=None):
    """`docker service ls` of the stack on the swarm: replicas and images."""
    rows = flow.service_table(load_stack(stack, profile))
    if json_:
        print(json.dumps(rows, indent=2))
        return
    cols = ["Name", "Mode", "Replicas", "Image"]
    print(table([c.lower() for c in cols], [[r.get(k, "") for k in cols] for r in rows]))


namespace = Collection("cluster", init, join, status, services)
