"""Cross-field checks: what types alone cannot say (addresses, uniqueness, references)."""

from __future__ import annotations

import re
from collections import defaultdict

from aiia_ops.model.schema import Problems, child_path, shown
from aiia_ops.model.types import (
    ENV_NAME,
    PATH_RULE,
    VOLUME_NAME,
    Environment,
    Service,
    Stack,
)

_HOSTNAME = re.compile(r"^(?=.{1,253}$)([a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?\.)+[a-z]{2,63}$")
# No leading dash in the user or the address: neither can become an option.
_SSH = re.compile(
    r"(?:[A-Za-z0-9_][A-Za-z0-9._-]{0,31}@)?[A-Za-z0-9][A-Za-z0-9.-]{0,252}(?::\d{1,5})?"
)
# Words pg_hba.conf and PgBouncer read as keywords, not as the name of a database or user.
_SQL_KEYWORDS = {"all", "sameuser", "samerole", "samegroup", "replication", "pgbouncer"}


def valid_name(name: object, parent: str, problems: Problems) -> bool:
    """An environment's name: it becomes file names, container names and config lines."""
    if not isinstance(name, str):
        problems.add(parent, f"{shown(name)}: {ENV_NAME.says}")
        return False
    problem = ENV_NAME.problem(name)
    if problem:
        problems.add(parent, problem)
    return not problem


def _path(item: Service | Environment) -> str:
    return f"environments.{item.name}" if isinstance(item, Environment) else f"services.{item.name}"


def cross_checks(stack: Stack, problems: Problems) -> None:
    _addresses(stack, problems)
    _names_and_ports(stack, problems)
    _resources(stack, problems)
    _references(stack, problems)
    _settings(stack, problems)
    _metrics(stack, problems)


def _addresses(stack: Stack, problems: Problems) -> None:
    subnet = stack.network.subnet
    gateway = next(subnet.hosts(), None)
    seen: dict = {}
    for item in stack.containers():
        slots = [("address", item.address)]
        if isinstance(item, Environment):
            slots.append(("standby_address", item.standby_address))
        for key, address in slots:
            path = f"{_path(item)}.{key}"
            if address not in subnet:
                problems.add(
                    path,
                    f"{address} is outside network.subnet {subnet}; "
                    f"expected an address in {subnet}",
                )
            elif address in (subnet.network_address, subnet.broadcast_address, gateway):
                problems.add(
                    path,
                    f"{address} is reserved (network, broadcast or the bridge "
                    f"gateway {gateway}); expected another address in {subnet}",
                )
            if address in seen:
                problems.add(
                    path, f"{address} is already used by {seen[address]}; expected a unique address"
                )
            else:
                seen[address] = path


def _names_and_ports(stack: Stack, problems: Problems) -> None:
    containers: dict[str, str] = {}
    ports: dict[int, str] = {}
    published: dict[int, str] = {}
    for item in stack.containers():
        path = _path(item)
        if item.container in containers:
            problems.add(
                f"{path}.container",
                f"{item.container!r} is already the container "
                f"of {containers[item.container]}; expected a unique name",
            )
        containers.setdefault(item.container, path)
        listening = [item.port] if item.port is not None else []
        for port in listening:
            if not 1 <= port <= 65535:
                problems.add(f"{path}.port", f"{port} is not a TCP port; expected 1-65535")
            elif port in ports:
                problems.add(
                    f"{path}.port",
                    f"port {port} is already used by {ports[port]}; expected a unique port",
                )
            ports.setdefault(port, f"{path}.port")
        for i, port in enumerate(getattr(item, "publish", [])):
            if not 1 <= port <= 65535:
                problems.add(f"{path}.publish[{i}]", f"{port} is not a TCP port; expected 1-65535")
            elif port in published:
                problems.add(
                    f"{path}.publish[{i}]",
                    f"port {port} is already published by "
                    f"{published[port]}; expected a unique port",
                )
            published.setdefault(port, path)


def _resources(stack: Stack, problems: Problems) -> None:
    cpus = stack.machine.cpus
    if stack.machine.os_reserve >= stack.machine.memory:
        problems.add(
            "machine.os_reserve",
            f"{stack.machine.os_reserve} leaves nothing of "
            f"machine.memory {stack.machine.memory}; expected less than the machine has",
        )
    for item in stack.containers():
        path = _path(item)
        mem, cpu = item.memory, item.cpu
        if mem.limit.bytes < 6 * 1024**2:
            problems.add(
                f"{path}.memory.limit",
                f"{mem.limit} is below Docker's 6MB minimum; expected at least 6MB",
            )
        if mem.reservation > mem.limit:
            problems.add(
                f"{path}.memory.reservation",
                f"{mem.reservation} is above the limit {mem.limit}; expected at most the limit",
            )
        if not 0 < cpu.limit <= cpus:
            problems.add(
                f"{path}.cpu.limit",
                f"{cpu.limit:g} is outside the machine's "
                f"{cpus:g} CPUs; expected more than 0 and at most {cpus:g}",
            )
        if not 0 <= cpu.reservation <= cpu.limit:
            problems.add(
                f"{path}.cpu.reservation",
                f"{cpu.reservation:g} is not between 0 and the limit {cpu.limit:g}",
            )
        hc = item.healthcheck
        if (hc.http is None) == (hc.command is None):
            problems.add(
                f"{path}.healthcheck",
                "expected exactly one of http (a path) or "
                "command (a list), got " + ("both" if hc.http else "neither"),
            )
        if hc.timeout > hc.interval:
            problems.add(
                f"{path}.healthcheck.timeout",
                f"{hc.timeout} is longer than the "
                f"interval {hc.interval}; expected at most the interval",
            )


def _references(stack: Stack, problems: Problems) -> None:
    if not stack.hosts:
        problems.add("hosts", "empty; expected at least one host (local: {ssh: null})")
    for name, host in stack.hosts.items():
        top = max(stack.services.nginx.publish, default=0) + host.port_offset
        if host.port_offset < 0 or top > 65535:
            problems.add(
                f"hosts.{name}.port_offset",
                f"{host.port_offset} puts published ports outside 1-65535",
            )
        if host.ssh is not None and not _SSH.fullmatch(host.ssh):
            problems.add(f"hosts.{name}.ssh", f"{shown(host.ssh)} is not user@address[:port]")
        if not host.state_dir.startswith("/"):
            problems.add(
                f"hosts.{name}.state_dir",
                f"{host.state_dir!r} is relative; expected an absolute path",
            )
    domains: dict[str, str] = {}
    owners = [("services.nginx.domains", stack.services.nginx.domains)] + [
        (f"environments.{e.name}.domains", e.domains) for e in stack.environments.values()
    ]
    for path, names in owners:
        for i, domain in enumerate(names):
            if not _HOSTNAME.fullmatch(domain):
                problems.add(f"{path}[{i}]", f"{shown(domain)} is not a lower-case host name")
            if domain in domains:
                problems.add(f"{path}[{i}]", f"{domain} is already served by {domains[domain]}")
            domains.setdefault(domain, path)
    if not stack.services.nginx.domains:
        problems.add("services.nginx.domains", "missing; expected the status page's domain")
    databases: dict[str, str] = defaultdict(str)
    redis_dbs = stack.services.redis.settings.databases
    for env in stack.environments.values():
        path = f"environments.{env.name}"
        for i, host in enumerate(env.hosts):
            if stack.hosts and host not in stack.hosts:  # (none: said above)
                known = ", ".join(stack.hosts)
                problems.add(
                    f"{path}.hosts[{i}]",
                    f"unknown host {host!r}; expected one of: {known} (defined under hosts)",
                )
        for key, target in env.volumes.items():  # the app's volumes, merged from `app`
            problem = VOLUME_NAME.problem(key) or PATH_RULE.problem(target)
            if problem:
                problems.add(child_path(f"{path}.volumes", key), problem)
        if not env.hosts:
            known = ", ".join(stack.hosts)
            problems.add(f"{path}.hosts", f"empty; expected at least one of: {known}")
        if "storage" not in env.volumes:
            problems.add(
                f"{path}.volumes.storage",
                "missing; expected where the app keeps its files, such as /app/storage",
            )
        if not env.domains:
            problems.add(f"{path}.domains", "missing; expected at least one domain")
        if env.database in databases:
            problems.add(
                f"{path}.database",
                f"{env.database} is already the database of "
                f"{databases[env.database]}; environments never share a database",
            )
        databases[env.database] = path
        if env.database in _SQL_KEYWORDS | {"pgbouncer_admin"}:
            problems.add(
                f"{path}.database",
                f"{env.database!r} is a keyword of pg_hba.conf or PgBouncer; expected another name",
            )
        elif env.database == stack.services.postgresql.settings.superuser:
            problems.add(
                f"{path}.database",
                f"{env.database!r} is the superuser's name; expected a name of its own",
            )
        if not 0 <= env.redis_db < redis_dbs:
            problems.add(
                f"{path}.redis_db",
                f"{env.redis_db} is not a Redis database; "
                f"expected 0 to {redis_dbs - 1} (services.redis.settings.databases)",
            )
    superuser = stack.services.postgresql.settings.superuser
    if superuser in _SQL_KEYWORDS | {"pgbouncer_admin"}:
        problems.add(
            "services.postgresql.settings.superuser",
            f"{superuser!r} is a keyword of pg_hba.conf or PgBouncer; expected another name",
        )


def _settings(stack: Stack, problems: Problems) -> None:
    nginx = stack.services.nginx.settings
    if not 1 <= nginx.gzip_level <= 9:
        problems.add(
            "services.nginx.settings.gzip_level",
            f"{nginx.gzip_level} is not a gzip level; expected 1-9",
        )
    if not 1 <= nginx.access_log_keep <= 366:
        problems.add(
            "services.nginx.settings.access_log_keep",
            f"{nginx.access_log_keep} rotated logs; expected 1-366 (one a day at most)",
        )
    if nginx.access_log_max.bytes < 1024**2:
        problems.add(
            "services.nginx.settings.access_log_max",
            f"{nginx.access_log_max} is too small to rotate at; expected 1MB or more",
        )
    if not stack.tls.protocols:
        problems.add("tls.protocols", "empty; expected TLSv1.2 and/or TLSv1.3")
    if not re.fullmatch(r"([01]\d|2[0-3]):[0-5]\d", stack.backups.daily_at):
        problems.add(
            "backups.daily_at",
            f'{stack.backups.daily_at!r} is not a time; expected HH:MM (UTC), such as "02:00"',
        )
    if not 3 <= stack.backups.pause_limit.seconds <= 300:
        problems.add(
            "backups.pause_limit",
            f"{stack.backups.pause_limit} is not a pause bound; expected 3s-300s (requests wait"
            " at most this long when a restore is killed inside its PgBouncer pause)",
        )
    pitr = stack.backups.pitr
    if pitr is not None and not re.fullmatch(r"([01]\d|2[0-3]):[0-5]\d", pitr.base_at):
        problems.add(
            "backups.pitr.base_at",
            f'{pitr.base_at!r} is not a time; expected HH:MM (UTC), such as "01:30"',
        )
    if pitr is not None and pitr.lag_warning.seconds >= pitr.lag_critical.seconds:
        problems.add("backups.pitr.lag_warning", "must be below lag_critical")
    for env in stack.environments.values():
        g = env.gunicorn
        for key in ("workers", "threads", "max_requests"):
            if getattr(g, key) < 1:
                problems.add(
                    f"environments.{env.name}.gunicorn.{key}",
                    f"{getattr(g, key)} is below 1; expected a positive number",
                )
    if not 600 <= stack.deploy.lock_max_age.seconds <= 7 * 86400:
        problems.add(
            "deploy.lock_max_age",
            f"{stack.deploy.lock_max_age} is not a lock age limit; expected 10m-7d (a deploy "
            "lock held from another machine this long is taken over: longer than any deploy)",
        )
    if stack.deploy.keep_releases < 1:
        problems.add(
            "deploy.keep_releases",
            f"{stack.deploy.keep_releases} keeps nothing to roll back to; expected at least 1",
        )
    for key, kept in vars(stack.backups.retention).items():
        if kept < 1:
            problems.add(
                f"backups.retention.{key.replace('_', '-')}", f"{kept}; expected at least 1"
            )


def _metrics(stack: Stack, problems: Problems) -> None:
    for name, metric in vars(stack.monitoring.metrics).items():
        if hasattr(metric, "warning") and metric.warning >= metric.critical:
            problems.add(
                f"monitoring.metrics.{name}.warning",
                f"{metric.warning} is not below "
                f"critical {metric.critical}; expected warning < critical",
            )
