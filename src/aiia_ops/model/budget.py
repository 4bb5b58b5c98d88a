"""Does the stack fit the machine? Memory, CPU, connections, and the deploy overlap moment.

Each check yields a Finding: ok, warning (worth knowing, not fatal) or error (the stack
must not run like this). Limits are caps the kernel enforces; reservations are what each
container is expected to use. Steady-state limits must fit the machine less its OS reserve;
during a zero-downtime deploy a second app container runs beside the first, and that moment
must fit too (reservations strictly, limits as a warning: both containers at their caps at
once is the unlikely worst case).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

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
    return [
        *_memory(stack),
        *_cpu(stack),
        *_redis(stack),
        *_postgres(stack),
        *_connections(stack),
        *_deploy_overlap(stack),
        *_thresholds(stack),
    ]


def _memory(stack: Stack) -> list[Finding]:
    machine = stack.machine
    items = stack.containers()
    limits = sum((i.memory.limit for i in items), Size(0))
    reservations = sum((i.memory.reservation for i in items), Size(0))
    available = machine.available_memory
    out = []
    if limits > machine.memory:
        out.append(
            Finding(
                "error",
                "memory limits",
                f"memory limits add up to {_mb(limits)} on "
                f"a {_mb(machine.memory)} host: lower the limits or raise "
                "machine.memory",
            )
        )
    elif limits > available:
        out.append(
            Finding(
                "error",
                "memory limits",
                f"memory limits add up to {_mb(limits)}, "
                f"more than the {_mb(available)} left after the OS reserve "
                f"({_mb(machine.os_reserve)}) on a {_mb(machine.memory)} host",
            )
        )
    else:
        out.append(
            Finding(
                "ok",
                "memory limits",
                f"limits {_mb(limits)} fit in {_mb(available)}"
                f" ({_mb(machine.memory)} less {_mb(machine.os_reserve)} OS reserve)",
            )
        )
    if reservations > available:
        out.append(
            Finding(
                "error",
                "memory reservations",
                f"reservations add up to "
                f"{_mb(reservations)}, more than the {_mb(available)} available",
            )
        )
    else:
        out.append(
            Finding(
                "ok",
                "memory reservations",
                f"reservations {_mb(reservations)} fit in {_mb(available)}",
            )
        )
    return out


def _cpu(stack: Stack) -> list[Finding]:
    items = stack.containers()
    cpus = stack.machine.cpus
    reserved = round(sum(i.cpu.reservation for i in items), 3)
    limits = round(sum(i.cpu.limit for i in items), 3)
    out = []
    if reserved > cpus:
        out.append(
            Finding(
                "error",
                "cpu reservations",
                f"CPU reservations add up to "
                f"{reserved:g} on {cpus:g} vCPUs: lower them or raise machine.cpus",
            )
        )
    else:
        out.append(
            Finding("ok", "cpu reservations", f"reservations {reserved:g} of {cpus:g} vCPUs")
        )
    # Limits may oversubscribe: the services are mostly I/O-bound (the document allows it).
    out.append(
        Finding(
            "ok",
            "cpu limits",
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
    formula = (
        f"shared_buffers {_mb(s.shared_buffers)} + max_connections {s.max_connections} "
        f"x work_mem {_mb(s.work_mem)} + maintenance_work_mem "
        f"{_mb(s.maintenance_work_mem)} = {_mb(worst)}"
    )
    if worst > pg.memory.limit:
        return [
            Finding(
                "error",
                "postgresql memory",
                f"{formula}, over the container limit {_mb(pg.memory.limit)}",
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
        # Twice during a deploy: the new container runs beside the old one.
        threads = g.workers * g.threads
        clients += 2 * threads
        if threads > bouncer.default_pool_size:
            out.append(
                Finding(
                    "warning",
                    f"{env.name} gunicorn vs pool",
                    f"{g.workers} workers "
                    f"x {g.threads} threads = {threads} concurrent queries, more "
                    f"than the pool of {bouncer.default_pool_size}: requests queue",
                )
            )
        else:
            out.append(
                Finding(
                    "ok",
                    f"{env.name} gunicorn vs pool",
                    f"{g.workers} workers x "
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


def _deploy_overlap(stack: Stack) -> list[Finding]:
    machine = stack.machine
    items = stack.containers()
    limits = sum((i.memory.limit for i in items), Size(0))
    reservations = sum((i.memory.reservation for i in items), Size(0))
    available = machine.available_memory
    out = []
    for env in stack.environments.values():
        peak_res = reservations + env.memory.reservation
        peak_lim = limits + env.memory.limit
        name = f"{env.name} deploy overlap"
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
