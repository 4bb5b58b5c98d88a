"""invoke cluster.*: a stack on several hosts over SSH.

- Swarm (runtime: swarm; flows/swarm.py, docs/swarm.md): cluster.init | join | status | services.
- Level 3 on compose (flows/rolling.py, flows/cluster.py, docs/level3.md): cluster.deploy |
  cluster.firewall; `invoke setup --profile NAME` sets such a stack up.
"""

from __future__ import annotations

import json

from invoke import Collection

from aiia_ops.errors import OpsError
from aiia_ops.flows import swarm as flow
from aiia_ops.flows.output import table
from aiia_ops.model import load_stack
from aiia_ops.model.placement import is_multi_host
from aiia_ops.model.state import local_state_dir
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


def _load(stack, profile):
    model = load_stack(stack, profile)
    if not is_multi_host(model):
        raise OpsError("the stack runs on one host: use invoke deploy (cluster.* is level 3)")
    return model, local_state_dir(model)


@task(
    help={
        "env": "environment: prod or staging",
        "ref": "git ref of the release (default HEAD)",
        "batch": "app hosts replaced at once (default 1)",
        "skip_unreachable": "deploy to the app hosts that answer; say which were skipped",
    }
)
def deploy(c, env="prod", ref=None, batch=1, skip_unreachable=False, stack=None, profile=None):
    """Rolling deploy across the app hosts: batch by batch, each health-gated."""
    from aiia_ops.flows.rolling import rolling_deploy

    model, state = _load(stack, profile)
    result = rolling_deploy(model, state, env, ref, int(batch), skip_unreachable)
    print(f"\n{env} runs {result['release']}:")
    for host, outcome in result["hosts"].items():
        took = result["seconds"].get(host)
        print(f"  {host}: {outcome}" + (f" ({took:.0f}s)" if took else ""))


@task
def firewall(c, stack=None, profile=None):
    """Install each host's firewall rules (iptables, Docker's DOCKER-USER chain)."""
    from aiia_ops.flows.cluster import firewall as apply

    model, state = _load(stack, profile)
    for host, rules in apply(model, state).items():
        print(f"{host}: {len(rules) - 1} rules in AIIA-FW")


namespace = Collection("cluster", init, join, status, services, deploy, firewall)
