"""`invoke monitor` on a stack on several hosts (level 3): each host's engine over SSH,
each placed container's state and health, and each environment through the load balancer.
A host whose engine does not answer is CRITICAL by name. Reads only: it records no
history and publishes no status page (the one-host monitor does; flows/monitor.py).
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

from aiia_ops.commands import app as apps
from aiia_ops.commands import cluster as plan
from aiia_ops.commands.monitor import CRIT, OK, Check, Report
from aiia_ops.errors import OpsError
from aiia_ops.flows.cluster import connect
from aiia_ops.model import Stack
from aiia_ops.model.state import StateDir

TIMEOUT_S = 10  # an engine that does not answer within this is down


def _host(c, part: plan.HostPart) -> list[Check]:
    runner = c.runner(part.name)
    try:
        ok = runner.query(apps.engine_version(), timeout=TIMEOUT_S).ok
        states = {}
        for name in plan.expected_containers(part) if ok else []:
            result = runner.query(plan.container_state(name), timeout=TIMEOUT_S)
            states[name] = result.stdout.strip() if result.ok else None
    except (OpsError, OSError):
        ok, states = False, {}
    return plan.host_checks(part, ok, states)


def _through_lb(c, env) -> Check:
    domain = env.domains[0]
    try:
        data = c.health(domain)
        status = data.get("http_status")
    except OSError as exc:
        status, data = None, {"error": exc.__class__.__name__}
    state = OK if status == 200 else CRIT
    detail = f"https://{domain}/health/ via {c.lb.name}: {status or data.get('error')}"
    return Check("health", domain, state, env=env.name, detail=detail)


def cluster_report(model: Stack, state: StateDir) -> Report:
    c = connect(model, state, create_secrets=False, out=lambda _line: None)
    with ThreadPoolExecutor(max_workers=len(c.parts)) as pool:
        per_host = list(pool.map(lambda p: _host(c, p), c.parts))
    checks = [check for checks in per_host for check in checks]
    checks += [_through_lb(c, env) for env in model.environments.values()]
    return Report(time.time(), checks)
