"""Placement: which host runs each service and each app container, and the checks of it.

Level 1 has one host and nothing to place: every service and each environment's one app
container run on it, and nothing here changes what the stack says. With several hosts
(level 3, deploy/profiles/2gb-4cpu.yml) every service names its host (`services.<s>.host`),
each environment lists its app containers (`environments.<e>.instances`, each with a
`host`), every host has a private `address` and may say what it runs (`roles`) and what
it is (`machine`). `host_loads` is what the budget check and `config.show` read per host.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field

from aiia_ops.errors import OpsError
from aiia_ops.model.schema import Problems
from aiia_ops.model.types import Cpu, Environment, Machine, Memory, Service, Stack
from aiia_ops.model.units import Size

# The role a host needs to run each shared service (hosts.<name>.roles).
SERVICE_ROLES = {
    "nginx": "load_balancer",
    "postgresql": "database",
    "pgbouncer": "pooler",
    "redis": "cache",
}
APP_ROLE = "app"


@dataclass(frozen=True)
class AppInstance:
    """One app container of an environment, resolved: the instance's own values, else the
    environment's. `index` is its place in `environments.<e>.instances`; None when the
    environment lists no instances (one container per host of `hosts`, as at level 1)."""

    env: Environment
    index: int | None
    host: str
    container: str
    address: ipaddress.IPv4Address
    standby_address: ipaddress.IPv4Address
    port: int

    @property
    def memory(self) -> Memory:
        return self.env.memory

    @property
    def cpu(self) -> Cpu:
        return self.env.cpu

    @property
    def publish(self) -> list[int]:
        return []

    @property
    def explicit(self) -> bool:
        return self.index is not None

    def path(self, key: str | None = None) -> str:
        """The key path of the container, or of one of its values."""
        base = f"environments.{self.env.name}"
        if self.index is not None:
            base = f"{base}.instances[{self.index}]"
        return f"{base}.{key}" if key else base

    def inherits(self, key: str) -> bool:
        """Whether an instance takes `key` from its environment (it left it out)."""
        return self.index is not None and getattr(self.env.instances[self.index], key) is None


@dataclass(frozen=True)
class ReplicationContainer:
    """One of the Patroni cluster's containers on a database host (`replication.hosts`).
    commands/patroni.py runs each with --memory = --memory-swap = its `replication.memory`
    size and no CPU limit, so the budget counts that size as both limit and reservation,
    and no CPU."""

    container: str
    size: Size
    address: ipaddress.IPv4Address | None = None
    port: int | None = None
    env: None = None  # not an app container
    publish: tuple = ()

    @property
    def name(self) -> str:
        return self.container

    @property
    def memory(self) -> Memory:
        return Memory(self.size, self.size)

    @property
    def cpu(self) -> Cpu:
        return Cpu(0.0, 0.0)


def replication_containers(stack: Stack, host: str) -> list[ReplicationContainer]:
    r = stack.replication
    if host not in r.hosts:
        return []
    address = stack.hosts[host].address
    return [
        ReplicationContainer("aiia_etcd", r.memory.etcd, address, r.etcd_client_port),
        ReplicationContainer("aiia_patroni", r.memory.patroni, address, r.postgres_port),
        ReplicationContainer("aiia_haproxy", r.memory.haproxy, address, r.write_port),
    ]


@dataclass(frozen=True)
class HostLoad:
    """What runs on one host, against that host's machine."""

    name: str
    machine: Machine
    machine_path: str  # "machine" or "hosts.<name>.machine": what to raise
    services: list[Service] = field(default_factory=list)
    instances: list[AppInstance] = field(default_factory=list)
    replication: list[ReplicationContainer] = field(default_factory=list)

    @property
    def items(self) -> list[Service | AppInstance | ReplicationContainer]:
        return [*self.services, *self.instances, *self.replication]


def placed_hosts(stack: Stack) -> set[str]:
    """The hosts the stack places something on. Listing a second host alone (an SSH
    target a deploy may name with --host) places nothing there."""
    first = next(iter(stack.hosts), None)
    placed = {s.host or first for s in stack.services.all()}
    for env in stack.environments.values():
        placed.update(env.hosts)
        placed.update(i.host for i in env.instances)
    return {h for h in placed if h in stack.hosts}


def is_multi_host(stack: Stack) -> bool:
    return len(placed_hosts(stack)) > 1


def is_one_remote_host(stack: Stack) -> bool:
    """Everything on one host reached over SSH (level 2 on a server of its own): set up,
    like several hosts, by flows/cluster.py."""
    placed = placed_hosts(stack)
    return len(placed) == 1 and stack.hosts[next(iter(placed))].ssh is not None


def service_host(stack: Stack, service: Service) -> str:
    return service.host if service.host is not None else next(iter(stack.hosts))


def app_instances(env: Environment) -> list[AppInstance]:
    if not env.instances:
        return [
            AppInstance(env, None, h, env.container, env.address, env.standby_address, env.port)
            for h in env.hosts
        ]
    return [
        AppInstance(
            env,
            i,
            inst.host,
            inst.container or env.container,
            inst.address or env.address,
            inst.standby_address or env.standby_address,
            inst.port if inst.port is not None else env.port,
        )
        for i, inst in enumerate(env.instances)
    ]


@dataclass(frozen=True)
class Spread:
    """How a swarm spreads an environment's replicas over its app nodes.

    Swarm's `spread` placement is only a preference: a start-first update counts the old
    task beside the new one, so ties put both replicas on one node (seen in tests/lab_swarm),
    and a node's loss then takes the whole environment. `per_node` (the stack file's
    `max_replicas_per_node`) makes the even spread a rule. A start-first update needs a free
    slot for the new task, else the update has to stop a replica first; a lost node's
    replicas move only if the other nodes have room for them."""

    replicas: int
    nodes: int
    per_node: int | None  # None: no rule (no replicas, or no app node)

    @classmethod
    def of(cls, replicas: int, nodes: int) -> Spread:
        """The even spread: ceil(replicas / nodes) to a node."""
        return cls(replicas, nodes, -(-replicas // nodes) if replicas and nodes else None)

    @property
    def order(self) -> str:
        if self.per_node is None or self.nodes * self.per_node > self.replicas:
            return "start-first"
        return "stop-first"

    @property
    def survives_node_loss(self) -> bool:
        return self.per_node is None or (self.nodes - 1) * self.per_node >= self.replicas


def swarm_app_nodes(stack: Stack) -> list[str]:
    """The swarm nodes that may run app replicas: reached over SSH, role app or no roles."""
    return [n for n, h in stack.hosts.items() if h.ssh and (not h.roles or APP_ROLE in h.roles)]


def app_spread(stack: Stack, env: Environment) -> Spread:
    return Spread.of(len(app_instances(env)), len(swarm_app_nodes(stack)))


def host_machine(stack: Stack, name: str) -> tuple[Machine, str]:
    machine = stack.hosts[name].machine
    if machine is None:
        return stack.machine, "machine"
    return machine, f"hosts.{name}.machine"


def host_loads(stack: Stack) -> list[HostLoad]:
    """Per host, in the stack's order: its machine, the services and app containers on it."""
    loads = {}
    for name in stack.hosts:
        machine, path = host_machine(stack, name)
        loads[name] = HostLoad(name, machine, path, replication=replication_containers(stack, name))
    for service in stack.services.all():
        loads[service_host(stack, service)].services.append(service)
    for env in stack.environments.values():
        for inst in app_instances(env):
            loads[inst.host].instances.append(inst)
    return list(loads.values())


def refuse_multi_host(stack: Stack, what: str) -> None:
    """Runtime tasks drive one engine today: a stack placed on several hosts is refused."""
    if is_multi_host(stack):
        names = ", ".join(stack.hosts)
        raise OpsError(
            f"the stack places its services on {len(stack.hosts)} hosts ({names}); {what} "
            "runs on one host so far: `invoke config.check` and `config.show` take several"
        )


# --- checks (called by model/load.py after the cross-field checks) ---------------------


def placement_checks(stack: Stack, problems: Problems) -> None:
    if not stack.hosts:
        problems.add("hosts", "empty; expected at least one host (local: {ssh: null})")
        return
    _hosts(stack, problems)
    _services(stack, problems)
    _environments(stack, problems)
    _per_host(stack, problems)


def _known(stack: Stack) -> str:
    return ", ".join(stack.hosts)


def _role_problem(stack: Stack, host: str, role: str, what: str) -> str | None:
    roles = stack.hosts[host].roles
    if not roles or role in roles:
        return None
    return (
        f"host {host!r} has roles {', '.join(roles)}; {what} needs a host with role {role} "
        f"(add it to hosts.{host}.roles or place it elsewhere)"
    )


def _hosts(stack: Stack, problems: Problems) -> None:
    seen: dict = {}
    for name, host in stack.hosts.items():
        if host.machine is not None and host.machine.os_reserve >= host.machine.memory:
            problems.add(
                f"hosts.{name}.machine.os_reserve",
                f"{host.machine.os_reserve} leaves nothing of hosts.{name}.machine.memory "
                f"{host.machine.memory}; expected less than the machine has",
            )
        if not is_multi_host(stack):
            continue
        if host.address is None:
            problems.add(
                f"hosts.{name}.address",
                f"missing; the stack has {len(stack.hosts)} hosts and each reaches the others "
                "at its private address: expected an IPv4 address such as 10.77.0.11",
            )
        elif host.address in seen:
            problems.add(
                f"hosts.{name}.address",
                f"{host.address} is already the address of hosts.{seen[host.address]}; "
                "expected a unique address",
            )
        else:
            seen[host.address] = name


def _services(stack: Stack, problems: Problems) -> None:
    for service in stack.services.all():
        path = f"services.{service.name}.host"
        if service.host is None:
            if is_multi_host(stack):
                problems.add(
                    path,
                    f"missing; the stack has {len(stack.hosts)} hosts: expected one of: "
                    f"{_known(stack)}",
                )
            continue
        if service.host not in stack.hosts:
            problems.add(
                path,
                f"unknown host {service.host!r}; expected one of: {_known(stack)} "
                "(defined under hosts)",
            )
            continue
        role = _role_problem(stack, service.host, SERVICE_ROLES[service.name], service.name)
        if role:
            problems.add(path, role)


def _environments(stack: Stack, problems: Problems) -> None:
    for env in stack.environments.values():
        base = f"environments.{env.name}"
        for i, host in enumerate(env.hosts):
            if host not in stack.hosts:
                continue  # validate.py names it
            role = _role_problem(stack, host, APP_ROLE, f"an app container of {env.name}")
            if role:
                problems.add(f"{base}.hosts[{i}]", role)
        if not env.instances:
            continue
        placed = set()
        for i, inst in enumerate(env.instances):
            placed.add(inst.host)
            if inst.host not in env.hosts:
                listed = ", ".join(env.hosts) or "none"
                problems.add(
                    f"{base}.instances[{i}].host",
                    f"{inst.host!r} is not one of {base}.hosts ({listed}); "
                    f"expected one of them, or add it to {base}.hosts",
                )
        for i, host in enumerate(env.hosts):
            if host not in placed:
                problems.add(
                    f"{base}.hosts[{i}]",
                    f"{host} runs no app container of {env.name}; add one under "
                    f"{base}.instances or remove it from {base}.hosts",
                )


def _per_host(stack: Stack, problems: Problems) -> None:
    """Per host: container names, addresses (each host's engine has its own network) and
    ports unique. Services and level-1 environments are unique stack-wide already
    (validate.py); what is checked here is every instance an environment lists."""
    subnet = stack.network.subnet
    gateway = next(subnet.hosts(), None)
    registry: dict[str, dict[tuple, str]] = {name: {} for name in stack.hosts}
    for service in stack.services.all():
        host = service_host(stack, service)
        if host not in registry:
            continue
        path = f"services.{service.name}"
        registry[host][("container", service.container)] = f"{path}.container"
        registry[host][("address", service.address)] = f"{path}.address"
        if service.port is not None:
            registry[host][("port", service.port)] = f"{path}.port"
        for j, port in enumerate(service.publish):
            registry[host].setdefault(("port", port), f"{path}.publish[{j}]")
    explicit = []
    for env in stack.environments.values():
        for inst in app_instances(env):
            if inst.host not in registry:
                continue
            if inst.explicit:
                explicit.append(inst)
                continue
            taken = registry[inst.host]
            taken.setdefault(("container", inst.container), inst.path("container"))
            taken.setdefault(("address", inst.address), inst.path("address"))
            taken.setdefault(("address", inst.standby_address), inst.path("standby_address"))
            taken.setdefault(("port", inst.port), inst.path("port"))
    for inst in explicit:
        taken = registry[inst.host]
        slots = [
            ("container", "container", inst.container),
            ("address", "address", inst.address),
            ("address", "standby_address", inst.standby_address),
            ("port", "port", inst.port),
        ]
        for kind, key, value in slots:
            path = inst.path(key)
            if key.endswith("address") and not inst.inherits(key):
                if value not in subnet:
                    problems.add(
                        path,
                        f"{value} is outside network.subnet {subnet}; "
                        f"expected an address in {subnet}",
                    )
                elif value in (subnet.network_address, subnet.broadcast_address, gateway):
                    problems.add(
                        path,
                        f"{value} is reserved (network, broadcast or the bridge gateway "
                        f"{gateway}); expected another address in {subnet}",
                    )
            if kind == "port" and not 1 <= value <= 65535:
                problems.add(path, f"{value} is not a TCP port; expected 1-65535")
                continue
            holder = taken.get((kind, value))
            if holder is not None:
                what = {"container": "container name", "address": "address", "port": "port"}
                hint = (
                    f" (it takes environments.{inst.env.name}.{key}: set its own)"
                    if inst.inherits(key)
                    else ""
                )
                problems.add(
                    path,
                    f"{what[kind]} {value} on host {inst.host} is already used by {holder}; "
                    f"expected a unique {what[kind]} on {inst.host}{hint}",
                )
            else:
                taken[(kind, value)] = path
