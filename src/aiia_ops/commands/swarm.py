"""The Swarm runtime (`runtime: swarm`), as data: the stack file, its configs and secrets,
every `docker swarm|node|stack|service` argv, and the parsers of their answers.

The same model as the compose file (commands/compose.py), for a swarm of the stack's hosts:

- every shared service and each environment's app is a Swarm service; an environment's
  replicas are its app containers (`environments.<e>.instances`, else one per host);
- limits and reservations are the stack's (memory in bytes, CPUs as fractions);
- health checks are the stack's; a command check of a service with secrets runs through
  the same secret-loading prelude as the service (Swarm secrets are files, not env vars);
- placement: a service runs only on nodes labelled with its role (`aiia.role.<role>=true`,
  set by `invoke cluster.init/join` from `hosts.<h>.roles`), apps spread over nodes;
- configs are Swarm configs, one per rendered file, mounted where compose bind-mounts the
  rendered directory (/etc/aiia/...); files that hold secrets and every env-file value are
  Swarm secrets. Each object's name ends in its content's hash: a change is a new object,
  and the services that use it roll;
- updates are start-first with `failure_action: rollback` and a monitor window: a new app
  task must turn healthy (its image's HEALTHCHECK, the stack's figures) before an old one
  stops, and a task that fails inside the window rolls the service back (the engine's own
  rollback, `rollback_config`). nginx publishes 80/443 in host mode, so it updates
  stop-first (two tasks cannot hold the same host port);
- the kernel here has no IPVS: every service is `endpoint_mode: dnsrr` (no virtual IP, no
  routing mesh). nginx finds the app tasks through Docker's DNS at 127.0.0.11 with
  `valid=2s` and a variable `proxy_pass` (re-resolved while it serves; nginx 1.26 has no
  `server ... resolve` in an upstream), and a stopping app task waits DRAIN_S seconds
  before gunicorn gets SIGTERM, so no request is sent to an address that has gone
  (docs/swarm.md: why, and the measured window).
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass

import yaml

from aiia_ops.commands import hardening
from aiia_ops.commands.argv import Argv
from aiia_ops.commands.compose import (
    CONFIG_MOUNT,
    NGINX_STATUS_DIR,
    NGINX_STORAGE_ROOT,
    app_environment,
    config_dir_name,
    env_files,
    service_key,
)
from aiia_ops.commands.render import SERVICE_UID, render_stack
from aiia_ops.errors import OpsError
from aiia_ops.model import Environment, Healthcheck, Service, Stack
from aiia_ops.model.placement import SERVICE_ROLES, app_instances, app_spread
from aiia_ops.model.secrets import Secrets

STACK_FILE_VERSION = "3.8"  # what `docker stack deploy` of engine 20.10 reads
LABEL_PREFIX = "aiia.role."
DNS = "127.0.0.11"  # Docker's embedded DNS inside every container on a user network
RESOLVE_VALID_S = 2  # nginx re-asks DNS at most this often: how late it follows a task
DRAIN_S = 3  # > RESOLVE_VALID_S: a stopping app task keeps serving while nginx forgets it
SECRETS_DIR = "/run/secrets"
MONITOR = "20s"  # a new task failing within this after it started rolls the update back
JOB_ATTEMPTS = 3  # a one-off task (migrations) is tried this many times by the engine

# What each image runs (its Dockerfile's ENTRYPOINT + CMD), for the services whose entry
# point the secret-loading prelude wraps. A unit test keeps it equal to the Dockerfiles.
IMAGE_COMMANDS = {
    "postgresql": ["docker-entrypoint", "postgres"],
    "redis": ["redis-server", "/etc/aiia/redis.conf"],
    "app": [
        "/app/bin/docker-entrypoint",
        "gunicorn",
        "-c",
        "/etc/aiia/gunicorn.conf.py",
        "aiia.wsgi",
    ],
}

# Each file in /run/secrets becomes the env var of its name, then the image's own command
# runs. An app also drains: on SIGTERM it waits DRAIN_S s (nginx stops resolving it) before
# gunicorn's own graceful stop.
_LOAD = 'for f in /run/secrets/*; do [ -f "$f" ] && export "${f##*/}=$(cat "$f")"; done; '
PRELUDE = _LOAD + 'exec "$@"'
DRAINING_PRELUDE = (
    _LOAD + '"$@" & pid=$!; '
    f"trap 'sleep {DRAIN_S}; kill -TERM $pid' TERM INT; "
    'wait "$pid"; trap - TERM INT; wait "$pid"'
)


def _lit(text: str) -> str:
    """A literal in the stack file: `docker stack deploy` interpolates ${VAR}; $$ is a $."""
    return text.replace("$", "$$")


def full_name(stack: Stack, key: str) -> str:
    """A stack service's name in `docker service ls`: aiia_django_prod."""
    return f"{stack.project}_{key}"


def role_label(role: str) -> str:
    return f"{LABEL_PREFIX}{role}"


def node_labels(stack: Stack, host: str) -> dict[str, str]:
    """The node labels of a host: one per role (a host without roles may run anything)."""
    roles = stack.hosts[host].roles or [*SERVICE_ROLES.values(), "app"]
    return {role_label(r): "true" for r in sorted(set(roles))}


def swarm_hosts(stack: Stack) -> list[str]:
    """The stack's hosts that form the swarm (every host reached over SSH), first = leader."""
    names = [n for n, h in stack.hosts.items() if h.ssh]
    if not names:
        raise OpsError(
            "runtime: swarm needs the stack's hosts over SSH (hosts.<name>.ssh); none has "
            "one (see deploy/profiles/swarm-lab.yml)"
        )
    return names


def node_address(stack: Stack, host: str) -> str:
    entry = stack.hosts[host]
    if entry.address is None:
        raise OpsError(f"hosts.{host}.address is missing: the swarm advertises that address")
    return str(entry.address)


# --- configs and secrets ---------------------------------------------------------------


@dataclass(frozen=True)
class SwarmObject:
    """A Swarm config or secret: its stack key, engine name, content and where it mounts."""

    kind: str  # "config" | "secret"
    key: str  # the key in the stack file's configs:/secrets:
    name: str  # the engine's name (key + content hash): immutable, a change is a new one
    service: str  # the stack service that mounts it
    target: str  # where in the container
    data: bytes

    @property
    def file(self) -> str:
        """Its file beside the stack file (relative: the stack file's `file:`)."""
        return f"{'secrets' if self.kind == 'secret' else 'configs'}/{self.name}"


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "_", text.lower()).strip("_")


def _object(kind: str, stack: Stack, service: str, what: str, target: str, data: bytes):
    key = f"{_slug(service)}_{_slug(what)}"
    digest = hashlib.sha256(data).hexdigest()[:10]
    name = f"{stack.project}_{key}_{digest}"
    if len(name) > 64:
        raise OpsError(f"swarm object name {name!r} is over 64 characters; shorten {what!r}")
    return SwarmObject(kind, key, name, service, target, data)


def _config_service(stack: Stack, rel: str) -> tuple[str, str]:
    """`nginx/conf.d/prod.conf` -> ("nginx", "conf.d/prod.conf")."""
    top, _, rest = rel.partition("/")
    for item in stack.containers():
        if config_dir_name(item) == top:
            return service_key(item), rest
    raise OpsError(f"rendered file {rel!r} belongs to no service of the stack")


def swarm_upstream(env: Environment) -> str:
    return f"{service_key(env)}:{env.port}"


def nginx_app_conf(text: str, env: Environment) -> str:
    """The rendered vhost of `env`, following the app's tasks through Docker's DNS.

    The static `upstream` block (an address nginx resolves once, at start) becomes a
    variable `proxy_pass` that nginx resolves at request time, re-asking every
    RESOLVE_VALID_S seconds; every server block names the resolver."""
    name = f"aiia_{env.name}"
    block = re.compile(rf"upstream {name} \{{.*?\n\}}\n", re.S)
    if not block.search(text) or f"proxy_pass http://{name};" not in text:
        raise OpsError(f"the nginx vhost of {env.name} has no upstream {name}: template changed?")
    var = f"${name}_upstream"
    dynamic = (
        f"# Swarm (commands/swarm.py): the app's tasks come and go; Docker's DNS lists the\n"
        f"# healthy ones and nginx asks again every {RESOLVE_VALID_S} s while it serves.\n"
        f"map $host {var} {{\n    default {swarm_upstream(env)};\n}}\n"
    )
    text = block.sub(lambda _: dynamic, text, count=1)
    text = text.replace(f"proxy_pass http://{name};", f"proxy_pass http://{var};")
    resolver = (
        f"server {{\n    resolver {DNS} valid={RESOLVE_VALID_S}s ipv6=off;\n"
        "    resolver_timeout 2s;\n"
    )
    return re.sub(r"^server \{\n", resolver, text, flags=re.M)


def swarm_configs(stack: Stack, secrets: Secrets) -> dict[str, tuple[str, bool]]:
    """Every rendered file for the swarm: {rel path: (text, holds secrets)}. Addresses of
    the one-engine network become service names (Swarm gives tasks no fixed address)."""
    pg = stack.services.postgresql
    upstreams = {e.name: swarm_upstream(e) for e in stack.environments.values()}
    out = {}
    for rel, f in render_stack(stack, secrets, upstreams=upstreams).items():
        text = f.text
        if rel == "pgbouncer/pgbouncer.ini":
            text = text.replace(f"host={pg.address} ", f"host={service_key(pg)} ")
        for env in stack.environments.values():
            if rel == f"nginx/conf.d/{env.name}.conf":
                text = nginx_app_conf(text, env)
        out[rel] = (text, f.secret)
    return out


def swarm_objects(stack: Stack, secrets: Secrets) -> list[SwarmObject]:
    """Configs (rendered files), secrets (rendered files that hold secrets, env values)."""
    out = []
    for rel, (text, secret) in sorted(swarm_configs(stack, secrets).items()):
        service, inner = _config_service(stack, rel)
        kind = "secret" if secret else "config"
        target = f"{CONFIG_MOUNT}/{inner}"
        out.append(_object(kind, stack, service, inner, target, text.encode()))
    for service, values in sorted(env_files(stack, secrets).items()):
        for var, value in sorted(values.items()):
            out.append(_object("secret", stack, service, var, var, value.encode()))
    return out


# --- the stack file --------------------------------------------------------------------


def _memory(n: int) -> str:
    mb = 1024 * 1024
    return f"{n // mb}M" if n % mb == 0 else f"{n}b"


def _resources(item: Service | Environment) -> dict:
    return {
        "limits": {"cpus": f"{item.cpu.limit:g}", "memory": _memory(item.memory.limit.bytes)},
        "reservations": {
            "cpus": f"{item.cpu.reservation:g}",
            "memory": _memory(item.memory.reservation.bytes),
        },
    }


def _healthcheck(hc: Healthcheck, wrapped: bool) -> dict:
    out: dict = {"interval": str(hc.interval), "timeout": str(hc.timeout), "retries": hc.retries}
    if hc.command:
        if wrapped:  # the check needs the service's secrets as env vars too
            out["test"] = ["CMD", "/bin/sh", "-c", _lit(PRELUDE), "aiia-health", *hc.command]
        else:
            out["test"] = ["CMD", *hc.command]
    # An http check is the image's own HEALTHCHECK (same path; the stack's figures).
    return out


def _scratch(key: str, s: hardening.Scratch) -> dict:
    """A scratch dir (a tmpfs on compose) as a named volume of the node: `docker stack
    deploy` of engine 20.10 drops a tmpfs mount's mode, and a tmpfs without one is 0755
    root, unwritable by the images' UID 10001. A new named volume takes the image
    directory's owner and mode; it is disk, not memory (docs/swarm.md)."""
    return _named(f"{_slug(key)}_scratch_{_slug(s.path)}", s.path)


def _hardening(key: str) -> dict:
    """The hardening profile as far as `docker stack deploy` 20.10 applies it: capabilities,
    read-only root, tmpfs, pids. (no-new-privileges and ulimits are not service options
    on this engine: the images' non-root users and the pids limit stay.)"""
    p = hardening.profile(key)
    out: dict = {"cap_drop": ["ALL"], "read_only": p.read_only}
    if p.cap_add:
        out["cap_add"] = list(p.cap_add)
    return out


def _placement(roles: list[str], per_node: int | None = None) -> dict:
    out: dict = {"constraints": [f"node.labels.{role_label(r)} == true" for r in roles]}
    if per_node is not None:  # an app: the even spread as a rule (placement.Spread)
        out["preferences"] = [{"spread": "node.id"}]
        out["max_replicas_per_node"] = per_node
    return out


def _update(order: str) -> dict:
    return {
        "parallelism": 1,
        "delay": "0s",
        "order": order,
        "failure_action": "rollback",
        "monitor": MONITOR,
        "max_failure_ratio": 0,
    }


def _rollback(order: str) -> dict:
    return {
        "parallelism": 1,
        "delay": "0s",
        "order": order,
        "failure_action": "pause",
        "monitor": MONITOR,
        "max_failure_ratio": 0,
    }


def swarm_app_environment(stack: Stack, env: Environment, version: str) -> dict[str, str]:
    """The app's settings, with the shared services by their service names."""
    bouncer, redis = stack.services.pgbouncer, stack.services.redis
    out = app_environment(stack, env, version)
    out["DB_HOST"], out["REDIS_HOST"] = service_key(bouncer), service_key(redis)
    out["ALLOWED_HOSTS"] = ",".join([*env.domains, "localhost", "127.0.0.1"])
    return out


def stack_data(
    stack: Stack,
    objects: list[SwarmObject],
    tags: dict[str, str],
    replicas: dict[str, int] | None = None,
) -> dict:
    """The stack file; `tags`: shared service name or environment name -> image tag;
    `replicas`: an environment's replicas when not its app containers' count (0 until
    its setup has made its database)."""
    net = stack.network.name
    services: dict[str, dict] = {}
    secret_env = {o.service for o in objects if o.kind == "secret" and "/" not in o.target}

    def base(
        item: Service | Environment,
        tag: str,
        role: str,
        replicas: int,
        order: str,
        per_node: int | None = None,
    ):
        key = service_key(item)
        hard = "app" if isinstance(item, Environment) else key  # hardening.py's profile
        mine = [o for o in objects if o.service == key]
        wrapped = key in secret_env
        out: dict = {
            "image": f"{item.image}:{tag}",
            "networks": [net],
            "healthcheck": _healthcheck(item.healthcheck, wrapped),
            "labels": {"org.eduaiia.stack": stack.project, "org.eduaiia.service": key},
            "logging": {"driver": "json-file", "options": {"max-size": "10m", "max-file": "3"}},
            **_hardening(hard),
            "volumes": [*(_scratch(key, s) for s in hardening.profile(hard).scratch)],
            "deploy": {
                "mode": "replicated",
                "replicas": replicas,
                "endpoint_mode": "dnsrr",
                "resources": _resources(item),
                "placement": _placement([role], per_node),
                "update_config": _update(order),
                "rollback_config": _rollback(order),
                "restart_policy": {"condition": "any", "delay": "2s"},
            },
        }
        for spill in hardening.profile(hard).spill:
            out["volumes"].append({"type": "volume", "source": spill.volume, "target": spill.path})
        configs = [o for o in mine if o.kind == "config"]
        files = [o for o in mine if o.kind == "secret"]
        if configs:
            out["configs"] = [_mount(o, 0o444) for o in configs]
        if files:
            out["secrets"] = [_mount(o, 0o400) for o in files]
        return out

    s = stack.services
    services["nginx"] = base(s.nginx, tags["nginx"], SERVICE_ROLES["nginx"], 1, "stop-first")
    services["nginx"] |= {
        # host mode: the published port is the node's own; the routing mesh needs IPVS.
        "ports": [
            {
                "target": p,
                "published": stack.local_host.published(p),
                "protocol": "tcp",
                "mode": "host",
            }
            for p in s.nginx.publish
        ],
        "sysctls": {"net.ipv4.ip_unprivileged_port_start": 0},
    }
    for name, target in s.nginx.volumes.items():
        services["nginx"]["volumes"].append(_named(f"nginx_{name}", target))
    for env in stack.environments.values():
        services["nginx"]["volumes"].append(
            _named(env.storage_volume, f"{NGINX_STORAGE_ROOT}/{env.name}", read_only=True)
        )
    services["nginx"]["volumes"].append(_named("nginx_status", NGINX_STATUS_DIR))

    pg = s.postgresql
    services["postgresql"] = base(pg, tags["postgresql"], "database", 1, "stop-first")
    services["postgresql"] |= {
        "stop_grace_period": "60s",
        "entrypoint": ["/bin/sh", "-c", _lit(PRELUDE), "aiia-swarm"],
        "command": IMAGE_COMMANDS["postgresql"],
    }
    services["postgresql"]["volumes"] += [_named(n, p) for n, p in pg.volumes.items()]

    services["pgbouncer"] = base(s.pgbouncer, tags["pgbouncer"], "pooler", 1, "start-first")

    redis = s.redis
    services["redis"] = base(redis, tags["redis"], "cache", 1, "stop-first")
    services["redis"] |= {
        "entrypoint": ["/bin/sh", "-c", _lit(PRELUDE), "aiia-swarm"],
        "command": IMAGE_COMMANDS["redis"],
    }
    services["redis"]["volumes"] += [_named(n, p) for n, p in redis.volumes.items()]

    for env in stack.environments.values():
        tag = tags[env.name]
        count = (replicas or {}).get(env.name, len(app_instances(env)))
        key = service_key(env)
        spread = app_spread(stack, env)  # from the planned replicas, not `count` before setup
        services[key] = base(env, tag, "app", count, spread.order, spread.per_node)
        services[key] |= {
            "environment": swarm_app_environment(stack, env, tag),
            "entrypoint": ["/bin/sh", "-c", _lit(DRAINING_PRELUDE), "aiia-swarm"],
            "command": IMAGE_COMMANDS["app"],
            # the drain, then gunicorn's graceful stop (its timeout), then SIGKILL
            "stop_grace_period": f"{DRAIN_S + int(env.gunicorn.timeout.seconds) + 5}s",
        }
        services[key]["volumes"].append(
            _named(env.storage_volume, env.volumes.get("storage", "/app/storage"))
        )

    volumes = sorted(
        {v["source"] for svc in services.values() for v in svc["volumes"] if v["type"] == "volume"}
    )
    return {
        "version": STACK_FILE_VERSION,
        "services": services,
        "networks": {
            net: {
                "name": net,
                "driver": "overlay",
                "attachable": True,  # one-off tasks (migrations) join it with docker run
                "ipam": {"config": [{"subnet": str(stack.network.subnet)}]},
            }
        },
        "volumes": {v: {"name": f"{stack.project}_{v}"} for v in volumes},
        "configs": {o.key: {"name": o.name, "file": o.file} for o in objects if o.kind == "config"},
        "secrets": {o.key: {"name": o.name, "file": o.file} for o in objects if o.kind == "secret"},
    }


def _mount(o: SwarmObject, mode: int) -> dict:
    return {
        "source": o.key,
        "target": o.target,
        "uid": str(SERVICE_UID),
        "gid": str(SERVICE_UID),
        "mode": mode,
    }


def _named(name: str, target: str, read_only: bool = False) -> dict:
    return {"type": "volume", "source": name, "target": target, "read_only": read_only}


@dataclass(frozen=True)
class StackFile:
    path: str
    data: bytes
    mode: int


def stack_files(
    stack: Stack,
    secrets: Secrets,
    root: str,
    tags: dict[str, str],
    replicas: dict[str, int] | None = None,
) -> list[StackFile]:
    """What `docker stack deploy` reads on the manager: <root>/swarm/{stack.yml, configs/,
    secrets/ (0600)}."""
    objects = swarm_objects(stack, secrets)
    base = f"{root.rstrip('/')}/swarm"
    out = [
        StackFile(f"{base}/{o.file}", o.data, 0o600 if o.kind == "secret" else 0o644)
        for o in objects
    ]
    out.append(
        StackFile(
            f"{base}/stack.yml", dump(stack_data(stack, objects, tags, replicas)).encode(), 0o644
        )
    )
    return out


def stack_file_path(root: str) -> str:
    return f"{root.rstrip('/')}/swarm/stack.yml"


class _PlainDumper(yaml.SafeDumper):
    def ignore_aliases(self, data) -> bool:
        return True


def dump(data: dict) -> str:
    header = (
        "# Rendered from deploy/stack.yml for runtime: swarm (commands/swarm.py); do not edit.\n"
    )
    return header + yaml.dump(data, Dumper=_PlainDumper, sort_keys=False)


# --- argv ------------------------------------------------------------------------------


def swarm_info() -> Argv:
    return ["docker", "info", "--format", "{{json .Swarm}}"]


def swarm_init(address: str) -> Argv:
    return [
        "docker",
        "swarm",
        "init",
        "--advertise-addr",
        address,
        "--listen-addr",
        f"{address}:2377",
    ]


def join_token(role: str = "manager") -> Argv:
    return ["docker", "swarm", "join-token", "-q", role]


def swarm_join(address: str, leader: str) -> Argv:
    """The token comes on stdin (never on a command line): `read` then exec."""
    return [
        "sh",
        "-c",
        'read -r t; exec docker swarm join --token "$t" --advertise-addr '
        f"{address} --listen-addr {address}:2377 {leader}:2377",
    ]


def node_ls() -> Argv:
    return ["docker", "node", "ls", "--format", "{{json .}}"]


def node_inspect(node: str) -> Argv:
    return ["docker", "node", "inspect", node, "--format", "{{json .}}"]


def node_label_add(node: str, labels: dict[str, str]) -> Argv:
    argv = ["docker", "node", "update"]
    for k, v in labels.items():
        argv += ["--label-add", f"{k}={v}"]
    return [*argv, node]


def stack_deploy(stack: Stack, root: str) -> Argv:
    return [
        "docker",
        "stack",
        "deploy",
        "--compose-file",
        stack_file_path(root),
        "--resolve-image",
        "never",
        "--prune",
        stack.project,
    ]


def service_ls(stack: Stack) -> Argv:
    return [
        "docker",
        "service",
        "ls",
        "--filter",
        f"label=com.docker.stack.namespace={stack.project}",
        "--format",
        "{{json .}}",
    ]


def service_ps(name: str) -> Argv:
    return ["docker", "service", "ps", name, "--no-trunc", "--format", "{{json .}}"]


def service_inspect(name: str) -> Argv:
    return ["docker", "service", "inspect", name, "--format", "{{json .}}"]


def service_update_image(name: str, image: str, force: bool) -> Argv:
    argv = ["docker", "service", "update", "--detach", "--image", image]
    argv += ["--env-add", f"APP_VERSION={image.rpartition(':')[2]}"]
    if force:
        argv.append("--force")
    return [*argv, name]


def service_rollback(name: str) -> Argv:
    return ["docker", "service", "rollback", "--detach", name]


def service_scale(name: str, replicas: int) -> Argv:
    return ["docker", "service", "scale", "--detach", f"{name}={replicas}"]


def one_off_service(
    stack: Stack,
    env: Environment,
    tag: str,
    name: str,
    args: list[str],
    secrets: list[tuple[str, str]],
) -> Argv:
    """A job task (migrations) on an app node, with the app's settings and its secrets
    (`secrets`: (engine name, target), as the app's service mounts them)."""
    argv = [
        "docker",
        "service",
        "create",
        "--detach",
        "--name",
        name,
        "--mode",
        "replicated-job",
        "--restart-condition",
        "on-failure",
        "--restart-max-attempts",
        str(JOB_ATTEMPTS - 1),
        "--network",
        stack.network.name,
        "--constraint",
        f"node.labels.{role_label('app')} == true",
        "--no-resolve-image",
        "--entrypoint",
        "/bin/sh",
    ]
    for k, v in swarm_app_environment(stack, env, tag).items():
        argv += ["--env", f"{k}={v}"]
    for source, target in secrets:
        argv += ["--secret", f"source={source},target={target},uid={SERVICE_UID},mode=0400"]
    return [
        *argv,
        f"{env.image}:{tag}",
        "-c",
        PRELUDE,
        "aiia-job",
        "/app/bin/docker-entrypoint",
        *args,
    ]


def task_inspect(ids: list[str]) -> Argv:
    """Per task: `ID NODE-ID CONTAINER-ID` (`docker service ps` names nodes by hostname,
    which several hosts may share)."""
    fmt = "{{.ID}} {{.NodeID}} {{.Status.ContainerStatus.ContainerID}}"
    return ["docker", "inspect", "--format", fmt, *ids]


def service_logs(name: str, tail: int) -> Argv:
    return ["docker", "service", "logs", "--tail", str(tail), name]


def service_rm(name: str) -> Argv:
    return ["docker", "service", "rm", name]


def stack_rm(stack: Stack) -> Argv:
    return ["docker", "stack", "rm", stack.project]


# --- parsers and decisions -------------------------------------------------------------


def json_lines(text: str) -> list[dict]:
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line:
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return out


def parse_replicas(text: str) -> tuple[int, int]:
    """`2/2` (or `1/1 (3/3 completed)`) -> (running, desired)."""
    m = re.match(r"\s*(\d+)/(\d+)", text or "")
    return (int(m.group(1)), int(m.group(2))) if m else (0, 0)


@dataclass(frozen=True)
class Task:
    id: str
    name: str
    image: str
    node: str
    desired: str
    current: str  # "Running 5 seconds ago"
    error: str

    @property
    def state(self) -> str:
        return self.current.split()[0].lower() if self.current else "unknown"


def parse_tasks(text: str) -> list[Task]:
    return [
        Task(
            t.get("ID", ""),
            t.get("Name", ""),
            t.get("Image", ""),
            t.get("Node", ""),
            t.get("DesiredState", ""),
            t.get("CurrentState", ""),
            t.get("Error", ""),
        )
        for t in json_lines(text)
    ]


def live_tasks(tasks: list[Task]) -> list[Task]:
    return [t for t in tasks if t.desired.lower() == "running"]


def service_secrets(inspect: dict) -> list[tuple[str, str]]:
    """(secret name, target) the service mounts as env values (targets without a /)."""
    spec = inspect.get("Spec", {}).get("TaskTemplate", {}).get("ContainerSpec", {})
    out = []
    for s in spec.get("Secrets") or []:
        target = s.get("File", {}).get("Name", "")
        if "/" not in target:
            out.append((s.get("SecretName", ""), target))
    return out


def service_image(inspect: dict) -> str:
    image = inspect.get("Spec", {}).get("TaskTemplate", {}).get("ContainerSpec", {})
    return image.get("Image", "").split("@")[0]


# UpdateStatus states after which the engine does nothing more on its own.
UPDATE_DONE = {"completed", "paused", "rollback_completed", "rollback_paused"}


def update_state(inspect: dict) -> str:
    """The service's UpdateStatus.State: updating, completed, paused, rollback_started,
    rollback_paused, rollback_completed; "" when it never was updated."""
    return (inspect.get("UpdateStatus") or {}).get("State", "")


def converged(tasks: list[Task], image: str, replicas: int) -> bool:
    """Every wanted task of `image` runs, and nothing else is left running."""
    live = live_tasks(tasks)
    running = [t for t in live if t.state == "running"]
    return len(running) == replicas == len(live) and all(
        t.image.split("@")[0] == image for t in running
    )
