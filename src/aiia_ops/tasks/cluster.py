"""invoke cluster.deploy | cluster.firewall: a stack on several hosts (level 3) over SSH.
`invoke setup --profile NAME` sets such a stack up. The procedures: flows/rolling.py and
flows/cluster.py."""

from __future__ import annotations

from invoke import Collection

from aiia_ops.errors import OpsError
from aiia_ops.model import load_stack
from aiia_ops.model.placement import is_multi_host
from aiia_ops.model.state import local_state_dir
from aiia_ops.tasks.common import task


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


namespace = Collection("cluster", deploy, firewall)
