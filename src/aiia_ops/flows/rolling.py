"""The rolling deploy of one environment across its app hosts (level 3).

Hosts go in batches of `batch` app hosts (1: one host at a time). Each instance of a batch
goes through invoke deploy's procedure on its host (flows/cluster.ClusterDeploy): the new
release starts beside the live one, is health-checked there, the load balancer is pointed
at it (the old instance leaves nginx's upstreams with a graceful reload), the old one drains
and stops. A batch that fails stops the rollout: the instances of that batch already
replaced go back to the release they ran (the failing one was never served), the hosts of
later batches are never touched. Each host's release log records its own result.

Every app host must answer first; `skip_unreachable` deploys to the others and says which
it skipped.
"""

from __future__ import annotations

import time

from aiia_ops.commands import app as apps
from aiia_ops.errors import OpsError
from aiia_ops.flows import cluster as cl
from aiia_ops.host.git import resolve_ref
from aiia_ops.model import Stack
from aiia_ops.model.state import StateDir


def batches(hosts: list[str], size: int) -> list[list[str]]:
    size = max(1, size)
    return [hosts[i : i + size] for i in range(0, len(hosts), size)]


def reachable(c: cl.Cluster, host: str) -> bool:
    try:
        return c.runner(host).query(apps.engine_version(), timeout=10).ok
    except OpsError:
        return False


def rolling_deploy(
    model: Stack,
    state: StateDir,
    env_name: str,
    ref: str | None = None,
    batch: int = 1,
    skip_unreachable: bool = False,
    out=cl._say,
) -> dict:
    """Returns {"release", "hosts": {host: "good" | "bad" | "rolled back" | "untouched" |
    "skipped"}, "seconds": {host: s}}; raises OpsError when a batch failed (after putting
    that batch back)."""
    model.environment(env_name)
    c = cl.connect(model, state, create_secrets=False, out=out)
    _, release = resolve_ref(ref)
    app_hosts = [p.name for p in c.parts if env_name in p.envs]
    down = [h for h in app_hosts if not reachable(c, h)]
    if down and not skip_unreachable:
        raise OpsError(
            f"app host(s) {', '.join(down)} do not answer; nothing was deployed. Bring them "
            f"back, or deploy to the others with --skip-unreachable"
        )
    result = {h: ("skipped" if h in down else "untouched") for h in app_hosts}
    if down:
        out(f"-> skipping unreachable host(s): {', '.join(down)}")
    if not reachable(c, c.lb.name):
        raise OpsError(f"the load balancer {c.lb.name} does not answer; nothing was deployed")
    c.read_live()
    seconds: dict[str, float] = {}
    targets = [h for h in app_hosts if h not in down]
    migrated = False
    for group in batches(targets, batch):
        done: list[tuple[cl.ClusterDeploy, str | None]] = []
        try:
            for host in group:
                started = time.monotonic()
                for part, i, inst in c.instances(env_name):
                    if part.name != host:
                        continue
                    d = cl.instance_deploy(c, part, i, inst, first=not migrated)
                    live = d.live()
                    previous = live.release if live and live.running else None
                    out(f"\n== {host}: {inst.container} {previous or '-'} -> {release} ==")
                    d.deploy(ref)
                    migrated = True
                    done.append((d, previous))
                result[host] = "good"
                seconds[host] = time.monotonic() - started
        except OpsError as exc:
            failed = [h for h in group if result[h] != "good"][:1]
            for h in group:
                result[h] = "bad" if h in failed else "rolled back"
            for d, previous in reversed(done):
                if previous and previous != release:
                    out(f"-> {d.part.name}: {d.env.container} back to {previous}")
                    d.rollback(previous)
            raise OpsError(
                f"the rollout of {release} to {env_name} stopped at {', '.join(failed)}: "
                f"{str(exc).splitlines()[0]}\nper host: "
                + ", ".join(f"{h}: {r}" for h, r in result.items())
            ) from exc
    return {"release": release, "hosts": result, "seconds": seconds}
