"""The compose file, built as data from the model (never templated text) and dumped as YAML.

It holds the long-lived shared services (nginx, PostgreSQL, PgBouncer, Redis), the network
and the volumes. The app containers are releases, started and replaced by `invoke deploy`.

Memory limits and reservations are exact byte counts; CPU limits are `cpus`; a CPU
reservation becomes `cpu_shares` (1024 x reservation), the weight the kernel uses when the
CPUs are contended, because a plain engine has no hard CPU reservation.
"""

from __future__ import annotations

from pathlib import PurePosixPath

import yaml

from aiia_ops.commands import hardening, pgbackrest
from aiia_ops.commands.redis_acl import app_user
from aiia_ops.model import Environment, Healthcheck, Service, Stack
from aiia_ops.model.secrets import Secrets

# Host folders (relative to the state dir) bind-mounted for nginx's volumes of these names.
NGINX_BINDS = {"logs": "logs/nginx", "ssl": "ssl", "acme": "acme"}
NGINX_STORAGE_ROOT = "/srv/storage"
NGINX_STATUS_DIR = "/srv/status"
CONFIG_MOUNT = "/etc/aiia"
LOGGING = {"driver": "json-file", "options": {"max-size": "10m", "max-file": "3"}}


def service_key(item: Service | Environment) -> str:
    """The compose service name: the doc's `postgresql`, `django_prod`, ..."""
    return f"django_{item.name}" if isinstance(item, Environment) else item.name


def config_dir_name(item: Service | Environment) -> str:
    return f"app-{item.name}" if isinstance(item, Environment) else item.name


def _healthcheck(hc: Healthcheck) -> dict:
    out: dict = {"interval": str(hc.interval), "timeout": str(hc.timeout), "retries": hc.retries}
    if hc.command:
        out["test"] = ["CMD", *hc.command]
    # An http check runs the image's own HEALTHCHECK command (same path, kept equal by a test).
    return out


def _resources(item: Service | Environment) -> dict:
    return {
        "mem_limit": item.memory.limit.bytes,
        "mem_reservation": item.memory.reservation.bytes,
        "memswap_limit": item.memory.limit.bytes,  # no swap beyond the limit
        "cpus": item.cpu.limit,
        "cpu_shares": max(2, round(1024 * item.cpu.reservation)),
    }


def _bind(source: PurePosixPath, target: str, read_only: bool) -> dict:
    return {"type": "bind", "source": str(source), "target": target, "read_only": read_only}


def _volume(name: str, target: str, read_only: bool = False) -> dict:
    return {"type": "volume", "source": name, "target": target, "read_only": read_only}


def app_environment(stack: Stack, env: Environment, version: str) -> dict[str, str]:
    """The app's non-secret settings (secrets come from its 0600 env file)."""
    bouncer, redis = stack.services.pgbouncer, stack.services.redis
    hosts = [*env.domains, "localhost", "127.0.0.1", str(env.address), str(env.standby_address)]
    return {
        "AIIA_ENV": env.name,
        "APP_VERSION": version,
        "ALLOWED_HOSTS": ",".join(hosts),
        "DB_HOST": str(bouncer.address),
        "DB_PORT": str(bouncer.port),
        "DB_NAME": env.database,
        "DB_USER": env.db_user,
        "REDIS_HOST": str(redis.address),
        "REDIS_PORT": str(redis.port),
        "REDIS_DB": str(env.redis_db),
        "STORAGE_DIR": env.volumes.get("storage", "/app/storage"),
        "PORT": str(env.port),
    }


def env_files(stack: Stack, secrets: Secrets) -> dict[str, dict[str, str]]:
    """Secret env vars per compose service, written to <state>/env/<service>.env (0600)."""
    out = {
        # + pgBackRest's keys when archiving is on (archive_command inherits them)
        "postgresql": {
            "POSTGRES_PASSWORD": secrets.postgres_password,
            **pgbackrest.env(stack, secrets),
        },
        "redis": {"REDISCLI_AUTH": secrets.redis_password},
    }
    for env in stack.environments.values():
        s = secrets.environments[env.name]
        out[service_key(env)] = {
            "DJANGO_SECRET_KEY": s.secret_key,
            "DB_PASSWORD": s.db_password,
            # Its own Redis ACL user (commands/redis_acl.py), not the default user.
            "REDIS_USERNAME": app_user(env),
            "REDIS_PASSWORD": s.redis_password,
            "API_WRITE_TOKEN": s.api_write_token,
        }
    return out


def compose_data(stack: Stack, state_dir: str, tags: dict[str, str]) -> dict:
    """The compose project of the shared services; `tags`: service name -> image tag."""
    state = PurePosixPath(state_dir)
    net = stack.network.name
    host = stack.local_host
    services: dict[str, dict] = {}
    secret_services = set(env_files_keys(stack))

    def base(item: Service | Environment, image_tag: str) -> dict:
        key = service_key(item)
        out = {
            "image": f"{item.image}:{image_tag}",
            "container_name": item.container,
            "restart": "unless-stopped",
            "networks": {net: {"ipv4_address": str(item.address)}},
            **_resources(item),
            "healthcheck": _healthcheck(item.healthcheck),
            "logging": LOGGING,
            "labels": {"org.eduaiia.stack": stack.project, "org.eduaiia.service": key},
            "volumes": [_bind(state / "config" / config_dir_name(item), CONFIG_MOUNT, True)],
            # cap_drop ALL, no-new-privileges, read-only root, tmpfs, pids, nofile.
            **hardening.compose_keys(key),
        }
        for spill in hardening.profile(key).spill:
            out["volumes"].append(_volume(spill.volume, spill.path))
        if key in secret_services:
            out["env_file"] = [str(state / "env" / f"{key}.env")]
        return out

    nginx = stack.services.nginx
    services["nginx"] = base(nginx, tags.get("nginx", "latest")) | {
        "ports": [f"{host.publish_address}:{host.published(p)}:{p}" for p in nginx.publish],
        # Non-root nginx binds 80/443 inside its own network namespace.
        "sysctls": {"net.ipv4.ip_unprivileged_port_start": 0},
    }
    nginx_volumes = services["nginx"]["volumes"]
    for name, target in nginx.volumes.items():
        source = state / NGINX_BINDS.get(name, name)
        nginx_volumes.append(_bind(source, target, read_only=name == "acme"))
    for env in stack.environments.values():
        nginx_volumes.append(_volume(env.storage_volume, f"{NGINX_STORAGE_ROOT}/{env.name}", True))
    nginx_volumes.append(_bind(state / "status", NGINX_STATUS_DIR, True))

    pg = stack.services.postgresql
    services["postgresql"] = base(pg, tags.get("postgresql", "latest")) | {
        "stop_grace_period": "60s"
    }
    services["postgresql"]["volumes"] += [_volume(n, p) for n, p in pg.volumes.items()]

    bouncer = stack.services.pgbouncer
    services["pgbouncer"] = base(bouncer, tags.get("pgbouncer", "latest")) | {
        "depends_on": {"postgresql": {"condition": "service_healthy"}},
    }

    redis = stack.services.redis
    services["redis"] = base(redis, tags.get("redis", "latest"))
    services["redis"]["volumes"] += [_volume(n, p) for n, p in redis.volumes.items()]

    # The app containers are not here: `invoke deploy` owns them (app.py), so a release can
    # start beside the running one and take over without downtime.

    storage = [e.storage_volume for e in stack.environments.values()]
    spills = [s.volume for k in shared_keys(stack) for s in hardening.profile(k).spill]
    volumes = [*pg.volumes, *redis.volumes, *storage, *spills]
    return {
        "name": stack.project,
        "services": services,
        "networks": {
            net: {
                "name": net,
                "driver": "bridge",
                "ipam": {"config": [{"subnet": str(stack.network.subnet)}]},
            }
        },
        "volumes": {v: {"name": f"{stack.project}_{v}"} for v in volumes},
    }


def shared_keys(stack: Stack) -> list[str]:
    """The compose services of the shared services (each names its hardening profile)."""
    return [service_key(s) for s in stack.services.all()]


def env_files_keys(stack: Stack) -> list[str]:
    """Services whose secrets come from an env file (apps included: deploy uses theirs)."""
    return ["postgresql", "redis", *(service_key(e) for e in stack.environments.values())]


class _PlainDumper(yaml.SafeDumper):
    """No &anchors/*aliases: each service reads complete on its own."""

    def ignore_aliases(self, data) -> bool:
        return True


def dump(data: dict) -> str:
    header = "# Rendered from deploy/stack.yml by `invoke config.render`; do not edit.\n"
    return header + yaml.dump(data, Dumper=_PlainDumper, sort_keys=False)
