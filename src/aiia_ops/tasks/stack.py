"""invoke build | up | down | status | logs | setup: the stack on this machine's engine.
The procedures are flows/stack.py."""

from __future__ import annotations

import json

from aiia_ops.flows import stack as flow
from aiia_ops.flows.output import table
from aiia_ops.flows.status import (
    STATUS_HEADERS,
    stack_status,
    status_json,
    status_runner,
    status_table_rows,
)
from aiia_ops.host.runners import Runner
from aiia_ops.model import Stack, load_stack
from aiia_ops.model.placement import is_multi_host, is_one_remote_host
from aiia_ops.model.state import local_state_dir
from aiia_ops.tasks.common import load, task


@task(
    help={
        "service": "one service folder to build (nginx, postgres, pgbouncer, redis, "
        "django); default all",
    }
)
def build(c, service=None, stack=None):
    """Build the service images, tagged with the git commit (and :latest)."""
    # On this machine whatever the stack's placement: multi-host setups ship these images.
    model, _ = load(stack, any_hosts=True)
    flow.build(flow.local_runner(), model, service)


@task(
    help={
        "env": "also start this environment's app (default: every environment)",
    }
)
def up(c, env=None, stack=None):
    """Start the stack (already set up) and wait until it is healthy."""
    model, state = load(stack)
    flow.up(model, state, env)
    _print_status(model)


@task(
    help={
        "volumes": "also delete the data volumes (database, redis, storage): asks first",
        "yes": "do not ask",
    }
)
def down(c, volumes=False, yes=False, stack=None):
    """Stop and remove the stack's containers (data volumes are kept unless --volumes)."""
    model, state = load(stack)
    flow.down(model, state, volumes=volumes, yes=yes)


@task(
    help={
        "json": "print JSON for machines",
        "host": "a host of the stack, or user@address[:port] over SSH (default: this machine)",
    }
)
def status(c, json_=False, host=None, stack=None):
    """Each service: state, health, memory used/limit, CPU limit, address."""
    model = load_stack(stack)
    runner = status_runner(model, host)
    if json_:
        print(json.dumps(status_json(stack_status(model, runner)), indent=2))
        return
    _print_status(model, runner)


def _print_status(model: Stack, runner: Runner | None = None) -> None:
    print(table(STATUS_HEADERS, status_table_rows(stack_status(model, runner))))


@task(
    help={
        "service": "compose service (nginx, postgresql, pgbouncer, redis, django_prod, "
        "django_staging); default all",
        "tail": "lines per service",
        "follow": "keep following",
    }
)
def logs(c, service=None, tail=100, follow=False, stack=None):
    """Show the containers' logs."""
    model, state = load(stack)
    flow.logs(model, state, service, int(tail), follow)


@task(
    help={
        "env": "environment to set up: prod or staging",
        "skip_build": "use the images already built for this commit",
        "ref": "several hosts: the app release to deploy (git ref; default HEAD)",
    }
)
def setup(c, env="prod", skip_build=False, stack=None, profile=None, ref=None):
    """From nothing to a healthy environment: provision, build, secrets, databases, app.
    A stack on several hosts (a level-3 profile): every host over SSH (flows/cluster.py)."""
    model = load_stack(stack, profile)
    if (is_multi_host(model) or is_one_remote_host(model)) and model.runtime != "swarm":
        from aiia_ops.flows import cluster

        cluster.setup(model, local_state_dir(model), ref=ref)
        return
    model, state = load(stack, profile, swarm=True)
    flow.setup(model, state, env, skip_build)
    if model.runtime != "swarm":  # a swarm's services: invoke cluster.services
        _print_status(model)
