"""A stack on several hosts (level 3), as data: what each host runs, in which order it is
set up, the files and compose project each host gets, the load balancer's upstreams and
each host's firewall rules. Pure: flows/cluster.py runs it over SSH.

- Order: the database host first, then the cache, then the app hosts, the load balancer
  last (it can only point at app instances that exist).
- Each host's engine has its own bridge network (`network.name`); a container of one host
  reaches another host's service at that host's private address (`hosts.<h>.address`), where
  the service publishes its port, and only there (never 0.0.0.0).
- An app instance's container listens on the environment's port inside its own network
  namespace; on its host it is published at the instance's `port` (primary slot) or that
  port + STANDBY_PORT_OFFSET (the standby slot a new release starts on beside the live one).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from aiia_ops.commands.compose import compose_data, config_dir_name, service_key
from aiia_ops.commands.render import HostFile, host_files
from aiia_ops.model import Environment, Host, Service, Stack
from aiia_ops.model.placement import AppInstance, app_instances, service_host
from aiia_ops.model.secrets import Secrets

# Setup order by what a host runs: the lowest rank of its services first.
RANK = {"postgresql": 0, "pgbouncer": 0, "redis": 1, "app": 2, "nginx": 3}
STANDBY_PORT_OFFSET = 100
FIREWALL_CHAIN = "AIIA-FW"
# nginx's passive check of each app instance: one failed attempt takes it out for this long
# (the request itself goes on to the next instance: proxy_next_upstream's default, error
# and timeout, for requests nginx may retry).
UPSTREAM_FAILS = 1
UPSTREAM_FAIL_TIMEOUT = "5s"


def copy(obj, **changes):
    """dataclasses.replace that keeps the fields set after loading (init=False: name,
    source, profile)."""
    new = dataclasses.replace(obj, **changes)
    for f in dataclasses.fields(obj):
        if not f.init and f.name not in changes:
            object.__setattr__(new, f.name, getattr(obj, f.name))
    return new


@dataclass(frozen=True)
class HostPart:
    """One host of the stack and what it runs."""

    name: str
    host: Host
    services: tuple[Service, ...]
    instances: tuple[tuple[int, AppInstance], ...]  # (position in its environment, instance)

    @property
    def address(self) -> str:
        return str(self.host.address)

    @property
    def keys(self) -> list[str]:
        return [s.name for s in self.services]

    @property
    def envs(self) -> list[str]:
        return sorted({inst.env.name for _, inst in self.instances})

    @property
    def rank(self) -> int:
        ranks = [RANK[s.name] for s in self.services] + [RANK["app"]] * bool(self.instances)
        return min(ranks)

    def images(self, tags: dict[str, str]) -> list[str]:
        """The shared-service images this host runs (app release images are the deploy's)."""
        return [f"{s.image}:{tags[s.name]}" for s in self.services]


def host_parts(stack: Stack) -> list[HostPart]:
    """Every host that runs something, in setup order (database ... load balancer)."""
    services: dict[str, list[Service]] = {name: [] for name in stack.hosts}
    for svc in stack.services.all():
        services[service_host(stack, svc)].append(svc)
    instances: dict[str, list] = {name: [] for name in stack.hosts}
    for env in stack.environments.values():
        for i, inst in enumerate(app_instances(env)):
            instances[inst.host].append((i, inst))
    parts = [
        HostPart(name, stack.hosts[name], tuple(services[name]), tuple(instances[name]))
        for name in stack.hosts
        if services[name] or instances[name]
    ]
    return sorted(parts, key=lambda p: p.rank)  # stable: the stack's order within a rank


def part_of(parts: list[HostPart], service: str) -> HostPart:
    return next(p for p in parts if service in p.keys)


def remote_view(stack: Stack) -> Stack:
    """The stack as an app host sees it: PostgreSQL, PgBouncer and Redis at their hosts'
    private addresses (where they publish their ports), not at container addresses."""
    changes = {}
    for name in ("postgresql", "pgbouncer", "redis"):
        svc = getattr(stack.services, name)
        host = stack.hosts[service_host(stack, svc)]
        changes[name] = copy(svc, address=host.address)
    return copy(stack, services=copy(stack.services, **changes))


def instance_env(inst: AppInstance) -> Environment:
    """The environment as one instance runs it: its own container name and addresses on
    its host's network; the environment's port inside the container."""
    return copy(
        inst.env,
        container=inst.container,
        address=inst.address,
        standby_address=inst.standby_address,
    )


def host_port(inst: AppInstance, container_address: str) -> int:
    """Where an instance's container on `container_address` is published on its host."""
    if container_address == str(inst.address):
        return inst.port
    return inst.port + STANDBY_PORT_OFFSET


def publish_flag(host_address: str, port: int, container_port: int) -> list[str]:
    return ["--publish", f"{host_address}:{port}:{container_port}"]


def published_ports(stack: Stack, part: HostPart) -> dict[str, list[str]]:
    """compose `ports` per service of the host, on its private address only."""
    out = {}
    for svc in part.services:
        ports = svc.publish if svc.name == "nginx" else [svc.port]
        out[svc.name] = [f"{part.address}:{p}:{p}" for p in ports]
    return out


def compose_for(stack: Stack, part: HostPart, state_dir: str, tags: dict[str, str]) -> dict:
    """The compose project of one host: only its services, ports on its private address."""
    data = compose_data(stack, state_dir, tags)
    keep = {service_key(s) for s in part.services}
    data["services"] = {k: v for k, v in data["services"].items() if k in keep}
    for key, ports in published_ports(stack, part).items():
        data["services"][key]["ports"] = ports
    if "pgbouncer" in data["services"] and "postgresql" not in data["services"]:
        data["services"]["pgbouncer"].pop("depends_on", None)
    return data


def pg_hba_with_hosts(text: str, stack: Stack, addresses: list[str]) -> str:
    """pg_hba.conf admitting each environment's role from the app hosts' addresses (SCRAM),
    placed before the closing reject lines."""
    rows = [
        f"{'host':<7} {e.database:<15} {e.db_user:<15} {a + '/32':<23} scram-sha-256"
        for e in stack.environments.values()
        for a in addresses
    ]
    lines = text.splitlines()
    closing = ["host", "all", "all", "0.0.0.0/0"]
    at = next((i for i, line in enumerate(lines) if line.split()[:4] == closing), len(lines))
    block = ["# app hosts (level 3): each environment's role from their private addresses", *rows]
    return "\n".join([*lines[:at], *block, *lines[at:]]) + "\n"


def lb_upstreams(stack: Stack, live: dict[tuple[str, int], str]) -> dict[str, str]:
    """nginx's upstream servers per environment from `live` ((env, position) -> host:port).
    The template holds one `server` line: the others join it (same figures each)."""
    out = {}
    for env in stack.environments.values():
        servers = [
            f"{live[(env.name, i)]} max_fails={UPSTREAM_FAILS} fail_timeout={UPSTREAM_FAIL_TIMEOUT}"
            for i, _ in enumerate(app_instances(env))
            if (env.name, i) in live
        ]
        if servers:
            out[env.name] = ";\n    server ".join(servers)
    return out


def files_for(
    stack: Stack,
    part: HostPart,
    parts: list[HostPart],
    secrets: Secrets,
    state_dir: str,
    tags: dict[str, str],
    upstreams: dict[str, str] | None = None,
) -> list[HostFile]:
    """What one host's state dir holds: the configs of what it runs, its compose file (if
    it runs shared services) and the env files of its containers."""
    root = state_dir.rstrip("/")
    view = remote_view(stack) if part.instances else stack
    dirs = {config_dir_name(s) for s in part.services}
    dirs |= {f"app-{e}" for e in part.envs}
    env_keys = {"postgresql", "redis"} & set(part.keys)
    env_keys |= {f"django_{e}" for e in part.envs}
    app_addresses = [p.address for p in parts if p.instances]
    out = []
    for f in host_files(view, secrets, root, tags, upstreams):
        rel = f.path[len(root) + 1 :]
        kind, _, rest = rel.partition("/")
        if kind == "config" and rest.split("/")[0] in dirs:
            if rest == "postgresql/pg_hba.conf":
                text = pg_hba_with_hosts(f.data.decode(), stack, app_addresses)
                f = dataclasses.replace(f, data=text.encode())
            out.append(f)
        elif kind == "env" and rest.removesuffix(".env") in env_keys:
            out.append(f)
    if part.services:
        from aiia_ops.commands.compose import dump

        data = compose_for(stack, part, root, tags)
        out.append(HostFile(f"{root}/compose.yml", dump(data).encode()))
    return out


# -- engine commands a host needs beyond compose --------------------------------------------


def network_inspect(stack: Stack) -> list[str]:
    return ["docker", "network", "inspect", "--format", "{{.Name}}", stack.network.name]


def network_create(stack: Stack) -> list[str]:
    """The stack's bridge network on an app host (no compose project creates it there)."""
    return [
        "docker", "network", "create", "--driver", "bridge",
        "--subnet", str(stack.network.subnet), stack.network.name,
    ]  # fmt: skip


def compose_up(stack: Stack, state_dir: str, services: list[str]) -> list[str]:
    from aiia_ops.commands.docker import up

    return up(stack, state_dir, services)


# -- static files on the load balancer ----------------------------------------------------
# collectstatic writes into the storage volume of the app host that runs it; lb1's nginx
# serves /static/ from its own volume of that name. Each deploy copies the release's static
# tree there (tar over SFTP, a file in each host's state dir) before the load balancer
# points at the release, so every page it serves finds its hashed CSS/JS; older releases'
# files stay (a page of the previous release, still open in a browser, keeps working).
# Uploads (media) are not copied: at level 3 they belong on shared storage or the CDN.

STATIC_SYNC_DIR = "static-sync"


def static_bundle(state_dir: str, env_name: str) -> str:
    return f"{state_dir}/{STATIC_SYNC_DIR}/static-{env_name}.tar"


def _tar_in_volume(stack: Stack, env: Environment, image: str, state_dir: str, pack: bool):
    volume = f"{stack.project}_{env.storage_volume}"
    return [
        "docker", "run", "--rm", "--network", "none", "--user", "0", "--entrypoint", "tar",
        "--mount", f"type=volume,source={volume},target=/storage" + (",readonly" if pack else ""),
        "--mount", f"type=bind,source={state_dir}/{STATIC_SYNC_DIR},target=/sync"
        + ("" if pack else ",readonly"),
        image, "-C", "/storage",
        *(["-cf", f"/sync/static-{env.name}.tar", "static"] if pack
          else ["--no-same-owner", "-xf", f"/sync/static-{env.name}.tar"]),
    ]  # fmt: skip


def static_pack(stack: Stack, env: Environment, image: str, state_dir: str) -> list[str]:
    """On the app host: the environment's collected static tree into a tar in its state dir."""
    return _tar_in_volume(stack, env, image, state_dir, pack=True)


def running_image(container: str) -> list[str]:
    """The image a container runs (empty output when there is no such container)."""
    return ["docker", "inspect", "--format", "{{.Config.Image}}", container]


def static_unpack(stack: Stack, env: Environment, image: str, state_dir: str) -> list[str]:
    """On the load balancer: that tar into its storage volume (added to, never emptied)."""
    return _tar_in_volume(stack, env, image, state_dir, pack=False)


# -- the firewall -------------------------------------------------------------------------


@dataclass(frozen=True)
class Admit:
    port: int
    sources: tuple[str, ...] | None  # None: anyone (the load balancer's 80/443)
    what: str


def admitted(stack: Stack, part: HostPart, parts: list[HostPart]) -> list[Admit]:
    """What may open a connection to this host's published ports, and from where: the
    database, pooler and cache ports from the app hosts only; an app instance's ports from
    the load balancer only; 80/443 on the load balancer from anyone."""
    apps = tuple(p.address for p in parts if p.instances)
    lbs = tuple(p.address for p in parts if "nginx" in p.keys)
    out = []
    for svc in part.services:
        if svc.name == "nginx":
            out += [Admit(p, None, "nginx") for p in svc.publish]
        else:
            out.append(Admit(svc.port, apps, svc.name))
    for _, inst in part.instances:
        for port in (inst.port, inst.port + STANDBY_PORT_OFFSET):
            out.append(Admit(port, lbs, inst.container))
    return out


def firewall_rules(stack: Stack, part: HostPart, parts: list[HostPart]) -> list[list[str]]:
    """iptables argv, run in order on the host (idempotent: the chain is rebuilt whole).
    Docker sends traffic to published ports through FORWARD, where DOCKER-USER comes first;
    the rules match on the connection's original destination (before Docker's DNAT): this
    host's private address and the published port. Anything else new to that address
    through Docker is dropped."""
    chain = FIREWALL_CHAIN
    addr = part.address
    rules = [["iptables", "-w", "-F", chain]]

    def add(*args: str) -> None:
        rules.append(["iptables", "-w", "-A", chain, *args])

    add("-m", "conntrack", "--ctstate", "ESTABLISHED,RELATED", "-j", "RETURN")
    for a in admitted(stack, part, parts):
        match = ["-p", "tcp", "-m", "conntrack", "--ctorigdst", addr]
        match += ["--ctorigdstport", str(a.port)]
        comment = ["-m", "comment", "--comment", f"aiia {a.what}"]
        if a.sources is None:
            add(*match, *comment, "-j", "RETURN")
            continue
        for src in a.sources:
            add(*match, "-s", src, *comment, "-j", "RETURN")
        add(*match, *comment, "-j", "DROP")
    add("-m", "conntrack", "--ctorigdst", addr, "--ctstate", "NEW", "-j", "DROP")
    return rules


def firewall_chain_create() -> list[str]:
    return ["iptables", "-w", "-N", FIREWALL_CHAIN]  # fails when it exists: check=False


def firewall_jump_check() -> list[str]:
    return ["iptables", "-w", "-C", "DOCKER-USER", "-j", FIREWALL_CHAIN]


def firewall_jump_insert() -> list[str]:
    return ["iptables", "-w", "-I", "DOCKER-USER", "1", "-j", FIREWALL_CHAIN]


def firewall_list() -> list[str]:
    return ["iptables", "-w", "-S", FIREWALL_CHAIN]


# -- the monitor of a stack on several hosts ----------------------------------------------


def container_state(name: str) -> list[str]:
    """`running healthy`, `exited`, `running starting` ... (health only if it has one)."""
    fmt = "{{.State.Status}} {{if .State.Health}}{{.State.Health.Status}}{{end}}"
    return ["docker", "inspect", "--type", "container", "--format", fmt, name]


def expected_containers(part: HostPart) -> list[str]:
    return [s.container for s in part.services] + [i.container for _, i in part.instances]


def host_checks(part: HostPart, engine_ok: bool, states: dict[str, str | None]) -> list:
    """The monitor's lines for one host: its engine answers over SSH (CRITICAL when not:
    the host is down for the stack), and each container the stack places there runs and
    is healthy. `states`: container -> `container_state` output (None: no such container)."""
    from aiia_ops.commands.monitor import CRIT, OK, Check

    if not engine_ok:
        return [Check("host", part.name, CRIT, detail=f"{part.address}: engine does not answer")]
    checks = [Check("host", part.name, OK, detail=f"{part.address}: engine answers")]
    for name in expected_containers(part):
        state = (states.get(name) or "missing").split()
        good = state[0] == "running" and state[1:] in ([], ["healthy"])
        checks.append(
            Check("container", f"{part.name}/{name}", OK if good else CRIT, detail=" ".join(state))
        )
    return checks
