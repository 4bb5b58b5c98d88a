"""Does the stack fit the machine? Memory, CPU, connections, and the deploy overlap moment.

Each check yields a Finding: ok, warning (worth knowing, not fatal) or error (the stack
must not run like this). Limits are caps the kernel enforces; reservations are what each
container is expected to use. Steady-state limits must fit the machine less its OS reserve;
during a zero-downtime deploy a second app container runs beside the first, and that moment
must fit too (reservations strictly, limits as a warning: both containers at their caps at
once is the unlikely worst case).

With several hosts (model/placement.py) memory, CPU and the deploy overlap are checked per
host, against that host's machine and what is placed on it; each finding's check names
the host. With one host the findings are the same as ever.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from aiia_ops.model.placement import HostLoad, app_instances, app_spread, host_loads
from aiia_ops.model.types import Stack
from aiia_ops.model.units import Size

Severity = Literal["ok", "warning", "error"]

# PostgreSQL keeps this many connections for superusers (superuser_reserved_connections).
PG_SUPERUSER_RESERVED = 3
# Below this much room above maxmemory, Redis (allocator overhead, fragmentation, the
# fork of an AOF rewrite) is OOM-killed by its container limit before eviction helps.
REDIS_MIN_HEADROOM = Size.mb_(16)


@dataclass(frozen=True)
class Finding:
    severity: Severity
    check: str
    message: str


def _mb(size: Size) -> str:
    return f"{size.mb:g}MB"


def check_budget(stack: Stack) -> list[Finding]:
    loads = host_loads(stack)
    if len(loads) == 1:
        (load,) = loads
        return [
            *_memory(load),
            *_cpu(load),
            *_redis(stack),
            *_postgres(stack),
            *_connections(stack),
            *_deploy_overlap(load),
            *_thresholds(stack),
            *_swarm_spread(stack),
        ]
    per_host = []
    for load in loads:
        prefix = f"{load.name} "
        if not load.items:
            per_host.append(Finding("warning", f"{prefix}placement", "nothing is placed here"))
            continue
        per_host += [*_memory(load, prefix), *_cpu(load, prefix), *_deploy_overlap(load, prefix)]
    return [
        *per_host,
        *_redis(stack),
        *_postgres(stack),
        *_connections(stack),
        *_thresholds(stack),
        *_swarm_spread(stack),
    ]


def _memory(load: HostLoad, prefix: str = "") -> list[Finding]:
    machine = load.machine
    items = load.items
    limits = sum((i.memory.limit for i in items), Size(0))
    reservations = sum((i.memory.reservation for i in items), Size(0))
    available = machine.available_memory
    out = []
    if limits > machine.memory:
        out.append(
            Finding(
                "error",
                f"{prefix}memory limits",
                f"memory limits add up to {_mb(limits)} on "
                f"a {_mb(machine.memory)} host: lower the limits or raise "
                f"{load.machine_path}.memory",
            )
        )
    elif limits > available:
        out.append(
            Finding(
                "error",
                f"{prefix}memory limits",
                f"memory limits add up to {_mb(limits)}, "
                f"more than the {_mb(available)} left after the OS reserve "
                f"({_mb(machine.os_reserve)}) on a {_mb(machine.memory)} host",
            )
        )
    else:
        out.append(
            Finding(
                "ok",
                f"{prefix}memory limits",
                f"limits {_mb(limits)} fit in {_mb(available)}"
                f" ({_mb(machine.memory)} less {_mb(machine.os_reserve)} OS reserve)",
            )
        )
    if reservations > available:
        out.append(
            Finding(
                "error",
                f"{prefix}memory reservations",
                f"reservations add up to "
                f"{_mb(reservations)}, more than the {_mb(available)} available",
            )
        )
    else:
        out.append(
            Finding(
                "ok",
                f"{prefix}memory reservations",
                f"reservations {_mb(reservations)} fit in {_mb(available)}",
            )
        )
    return out


def _item_path(item) -> str:
    env = getattr(item, "env", None)
    return f"environments.{env.name}" if env is not None else f"services.{item.name}"


def _cpu(load: HostLoad, prefix: str = "") -> list[Finding]:
    items = load.items
    cpus = load.machine.cpus
    reserved = round(sum(i.cpu.reservation for i in items), 3)
    limits = round(sum(i.cpu.limit for i in items), 3)
    out = []
    if reserved > cpus:
        out.append(
            Finding(
                "error",
                f"{prefix}cpu reservations",
                f"CPU reservations add up to "
                f"{reserved:g} on {cpus:g} vCPUs: lower them or raise {load.machine_path}.cpus",
            )
        )
    else:
        out.append(
            Finding(
                "ok", f"{prefix}cpu reservations", f"reservations {reserved:g} of {cpus:g} vCPUs"
            )
        )
    over = [i for i in items if i.cpu.limit > cpus]
    for item in over:
        # validate.py holds every limit to the stack's machine; a smaller host is this check's.
        out.append(
            Finding(
                "error",
                f"{prefix}cpu limits",
                f"{item.container} may use {item.cpu.limit:g} CPUs on a {cpus:g}-vCPU host: "
                f"lower {_item_path(item)}.cpu.limit or raise {load.machine_path}.cpus",
            )
        )
    if over:
        return out
    # Limits may oversubscribe: the services are mostly I/O-bound (the document allows it).
    out.append(
        Finding(
            "ok",
            f"{prefix}cpu limits",
            f"limits add up to {limits:g} on {cpus:g} vCPUs"
            + (" (oversubscribed, allowed for I/O-bound services)" if limits > cpus else ""),
        )
    )
    return out


def _redis(stack: Stack) -> list[Finding]:
    redis = stack.services.redis
    maxmemory, limit = redis.settings.maxmemory, redis.memory.limit
    headroom = limit - maxmemory
    # With AOF on, a rewrite forks; pages the parent writes meanwhile are copied, inside the
    # same cgroup. Under a write burst the copy reached the whole dataset (services/redis
    # tests: 36MB of data in a 56MB limit was OOM-killed in 2 of 3 bursts).
    need = max(REDIS_MIN_HEADROOM, maxmemory) if redis.settings.appendonly else REDIS_MIN_HEADROOM
    if headroom.bytes <= 0:
        return [
            Finding(
                "error",
                "redis maxmemory",
                f"maxmemory {_mb(maxmemory)} is not below "
                f"the container limit {_mb(limit)}: Redis is OOM-killed before "
                f"eviction starts; leave at least {_mb(need)} between them",
            )
        ]
    if headroom < need:
        why = (
            "an AOF rewrite during a write burst can copy the whole dataset"
            if redis.settings.appendonly
            else "allocator overhead and client buffers"
        )
        return [
            Finding(
                "warning",
                "redis maxmemory",
                f"only {_mb(headroom)} between maxmemory "
                f"{_mb(maxmemory)} and the limit {_mb(limit)}; {why}: leave "
                f"{_mb(need)}",
            )
        ]
    return [
        Finding(
            "ok",
            "redis maxmemory",
            f"maxmemory {_mb(maxmemory)} leaves {_mb(headroom)}"
            f" below the {_mb(limit)} limit"
            + (" (room for an AOF rewrite's copy)" if redis.settings.appendonly else ""),
        )
    ]


def _postgres(stack: Stack) -> list[Finding]:
    pg = stack.services.postgresql
    s = pg.settings
    worst = s.shared_buffers + s.work_mem * s.max_connections + s.maintenance_work_mem
    terms = (
        f"shared_buffers {_mb(s.shared_buffers)} + max_connections {s.max_connections} "
        f"x work_mem {_mb(s.work_mem)} + maintenance_work_mem {_mb(s.maintenance_work_mem)}"
    )
    pitr = stack.backups.pitr
    if pitr is not None and pitr.enabled:  # pgBackRest runs inside PostgreSQL's container
        worst = worst + pitr.memory
        terms += f" + pgBackRest {_mb(pitr.memory)} (backups.pitr.memory)"
    formula = f"{terms} = {_mb(worst)}"
    if worst > pg.memory.limit:
        return [
            Finding(
                "error",
                "postgresql memory",
                f"{formula}, over the container limit {_mb(pg.memory.limit)}: raise "
                "services.postgresql.memory.limit or lower maintenance_work_mem",
            )
        ]
    return [Finding("ok", "postgresql memory", f"{formula}, within {_mb(pg.memory.limit)}")]


def _connections(stack: Stack) -> list[Finding]:
    bouncer = stack.services.pgbouncer.settings
    pg = stack.services.postgresql.settings
    envs = list(stack.environments.values())
    pairs = len(envs)  # each environment: its own (database, role) pair
    server_side = (bouncer.default_pool_size + bouncer.reserve_pool_size) * pairs
    usable = pg.max_connections - PG_SUPERUSER_RESERVED
    out = []
    text = (
        f"PgBouncer pools (default_pool_size {bouncer.default_pool_size} + reserve "
        f"{bouncer.reserve_pool_size}) x {pairs} (database, user) pairs = {server_side} "
        f"server connections"
    )
    if server_side > usable:
        out.append(
            Finding(
                "error",
                "pgbouncer pools",
                f"{text}, more than PostgreSQL's "
                f"max_connections {pg.max_connections} less {PG_SUPERUSER_RESERVED} "
                "superuser slots",
            )
        )
    else:
        out.append(Finding("ok", "pgbouncer pools", f"{text}; PostgreSQL allows {usable}"))
    clients = 0
    for env in envs:
        g = env.gunicorn
        # Every app container of the environment shares its (database, user) pool.
        count = len(app_instances(env))
        threads = count * g.workers * g.threads
        # Twice during a deploy: the new container runs beside the old one.
        clients += 2 * threads
        many = f"{count} instances x " if count > 1 else ""
        if threads > bouncer.default_pool_size:
            out.append(
                Finding(
                    "warning",
                    f"{env.name} gunicorn vs pool",
                    f"{many}{g.workers} workers "
                    f"x {g.threads} threads = {threads} concurrent queries, more "
                    f"than the pool of {bouncer.default_pool_size}: requests queue",
                )
            )
        else:
            out.append(
                Finding(
                    "ok",
                    f"{env.name} gunicorn vs pool",
                    f"{many}{g.workers} workers x "
                    f"{g.threads} threads = {threads} within the pool of "
                    f"{bouncer.default_pool_size}",
                )
            )
    if clients > bouncer.max_client_conn:
        out.append(
            Finding(
                "error",
                "pgbouncer clients",
                f"app threads (counting deploy overlap)"
                f" need {clients} client connections, over max_client_conn "
                f"{bouncer.max_client_conn}",
            )
        )
    return out


def _deploy_overlap(load: HostLoad, prefix: str = "") -> list[Finding]:
    """One more app container of an environment beside the others on its host: a deploy
    replaces the containers of a host one at a time."""
    machine = load.machine
    items = load.items
    limits = sum((i.memory.limit for i in items), Size(0))
    reservations = sum((i.memory.reservation for i in items), Size(0))
    available = machine.available_memory
    envs = list({i.env.name: i.env for i in load.instances}.values())
    out = []
    for env in envs:
        peak_res = reservations + env.memory.reservation
        peak_lim = limits + env.memory.limit
        name = f"{prefix}{env.name} deploy overlap"
        if peak_res > available:
            out.append(
                Finding(
                    "error",
                    name,
                    f"a second {env.name} app container brings "
                    f"reservations to {_mb(peak_res)}, over the {_mb(available)} "
                    "available",
                )
            )
        elif peak_lim > machine.memory:
            out.append(
                Finding(
                    "warning",
                    name,
                    f"reservations {_mb(peak_res)} fit in "
                    f"{_mb(available)}, but limits reach {_mb(peak_lim)} on a "
                    f"{_mb(machine.memory)} host while two {env.name} containers "
                    "run: it relies on usage staying near reservations",
                )
            )
        else:
            out.append(
                Finding(
                    "ok",
                    name,
                    f"reservations {_mb(peak_res)} and limits "
                    f"{_mb(peak_lim)} fit while two {env.name} containers run",
                )
            )
    return out


def _swarm_spread(stack: Stack) -> list[Finding]:
    """On a swarm, each environment's replicas at most `per_node` to a node (placement.Spread):
    say what that costs when the app nodes have no spare room."""
    if stack.runtime != "swarm":
        return []
    out = []
    for env in stack.environments.values():
        spread = app_spread(stack, env)
        check = f"{env.name} spread"
        if spread.per_node is None:
            continue
        head = (
            f"{spread.replicas} replica(s) on {spread.nodes} app node(s), "
            f"at most {spread.per_node} per node"
        )
        if spread.order == "stop-first":
            why = (
                "no free slot, so an update stops a replica before starting its successor "
                "(one fewer serving meanwhile); another app node gives start-first updates"
            )
            out.append(Finding("warning", check, f"{head}: {why}"))
        if not spread.survives_node_loss:
            why = (
                "a lost node's replicas wait for it to come back (the other nodes are "
                "full); another app node gives them room"
            )
            out.append(Finding("warning", check, f"{head}: {why}"))
        if spread.order == "start-first" and spread.survives_node_loss:
            why = "start-first updates, and a lost node's replicas move to the others"
            out.append(Finding("ok", check, f"{head}: {why}"))
    return out


def _thresholds(stack: Stack) -> list[Finding]:
    metrics = stack.monitoring.metrics
    out = []
    max_conn = stack.services.postgresql.settings.max_connections
    if metrics.db_connections.critical > max_conn:
        out.append(
            Finding(
                "warning",
                "db connections threshold",
                f"critical at "
                f"{metrics.db_connections.critical} can never fire: max_connections "
                f"is {max_conn}",
            )
        )
    redis_limit = stack.services.redis.memory.limit
    if metrics.cache_memory.critical > redis_limit:
        out.append(
            Finding(
                "warning",
                "cache memory threshold",
                f"critical at "
                f"{_mb(metrics.cache_memory.critical)} is above the Redis limit "
                f"{_mb(redis_limit)}: the container dies first",
            )
        )
    return out


def has_errors(findings: list[Finding]) -> bool:
    return any(f.severity == "error" for f in findings)
