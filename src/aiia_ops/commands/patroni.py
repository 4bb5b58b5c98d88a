"""Level 4's replicated PostgreSQL as data: Patroni's config, HAProxy's config, etcd's argv
and the `docker run` of each of the three containers on every database host, plus the
parsers of what they answer. Nothing runs here (flows/patroni.py runs it over SSH).

Each host of `replication.hosts` runs, in its own network namespace (`--network host`:
every port listens on the host's private address only):
  aiia_etcd     one etcd member; the three form Patroni's store (quorum 2 of 3)
  aiia_patroni  Patroni and the PostgreSQL it starts, promotes, demotes and rewinds
  aiia_haproxy  :write_port -> the member whose Patroni REST answers 200 on /primary,
                :read_port  -> members answering 200 on /replica?lag=<replica_max_lag>
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import yaml

from aiia_ops.errors import OpsError
from aiia_ops.model import Stack

CONFIG_DIR = "/etc/aiia"
PGDATA = "/var/lib/postgresql/data"
ETCD_DATA = "/var/lib/etcd"
BIN_DIR = "/usr/lib/postgresql/17/bin"
SOCKET_DIR = "/var/run/postgresql"
CONTAINERS = ("aiia_etcd", "aiia_patroni", "aiia_haproxy")  # start order; stop reverses it
VOLUMES = {"aiia_etcd": "aiia_etcd_data", "aiia_patroni": "aiia_patroni_data"}
SUPERUSER = "aiia"  # = the OS user 10001 of the image: `local all aiia peer`
REPLICATION_USER = "replicator"
REWIND_USER = "rewinder"
REST_USER = "patroni"
# The database host's secrets (generated once into <state>/secrets/patroni.env, 0600):
# Patroni reads them from its environment, never from the rendered patroni.yml.
SECRET_KEYS = (
    "PATRONI_SUPERUSER_PASSWORD",
    "PATRONI_REPLICATION_PASSWORD",
    "PATRONI_REWIND_PASSWORD",
    "PATRONI_RESTAPI_PASSWORD",
)
MIN_MEMBERS = 3


@dataclass(frozen=True)
class Member:
    name: str
    address: str
    ssh: str
    state_dir: str

    @property
    def config_dir(self) -> str:
        return f"{self.state_dir}/patroni"

    @property
    def env_file(self) -> str:
        return f"{self.state_dir}/secrets/patroni.env"


def members(stack: Stack) -> list[Member]:
    """The database hosts, checked: at least three, each with an address and SSH."""
    r = stack.replication
    if not r.hosts:
        raise OpsError(
            "the stack has no replication.hosts: nothing runs Patroni; use a profile that "
            "sets it (AIIA_PROFILE=patroni-lab, deploy/profiles/patroni-lab.yml)"
        )
    if len(r.hosts) < MIN_MEMBERS:
        raise OpsError(
            f"replication.hosts has {len(r.hosts)} host(s); expected at least {MIN_MEMBERS} "
            "(etcd keeps its quorum, and Patroni its leader, only with a majority alive)"
        )
    ttl, loop, retry = r.ttl.seconds, r.loop_wait.seconds, r.retry_timeout.seconds
    if ttl < 20 or loop < 1 or retry < 3 or loop + 2 * retry > ttl:
        raise OpsError(
            f"replication: ttl {ttl:g}s, loop_wait {loop:g}s, retry_timeout {retry:g}s break "
            "Patroni's rules (ttl >= 20s, loop_wait >= 1s, retry_timeout >= 3s, "
            "loop_wait + 2 x retry_timeout <= ttl); change them in the profile"
        )
    out = []
    for name in r.hosts:
        host = stack.hosts.get(name)
        if host is None:
            raise OpsError(f"replication.hosts: unknown host {name!r}; expected one of: "
                           f"{', '.join(stack.hosts)}")  # fmt: skip
        if host.address is None or host.ssh is None:
            raise OpsError(f"hosts.{name}: a database host needs both ssh and address")
        out.append(Member(name, str(host.address), host.ssh, host.state_dir))
    return out


def member(stack: Stack, name: str) -> Member:
    by_name = {m.name: m for m in members(stack)}
    if name not in by_name:
        raise OpsError(f"{name!r} is not a database host; expected one of: {', '.join(by_name)}")
    return by_name[name]


def _size(n: int) -> str:
    return f"{n // (1024 * 1024)}MB" if n % (1024 * 1024) == 0 else f"{n // 1024}kB"


def app_database_env(stack: Stack) -> dict[str, str]:
    """The app's database settings against the cluster (services/django/app/aiia/settings.py):
    every member's HAProxy as a libpq host list, tried in random order per connection (a
    host that does not answer is skipped for the next), the write port as `default`, the
    read port as `replica` (aiia/dbrouter.py). No single HAProxy is then a point of failure
    for the app."""
    r = stack.replication
    hosts = ",".join(m.address for m in members(stack))
    return {"DB_HOST": hosts, "DB_PORT": str(r.write_port),
            "DB_REPLICA_HOST": hosts, "DB_REPLICA_PORT": str(r.read_port),
            "DB_LOAD_BALANCE_HOSTS": "random"}  # fmt: skip


# --- rendered configs ---------------------------------------------------------------------


def patroni_config(stack: Stack, me: Member) -> str:
    """patroni.yml of one member (no secret: they come from PATRONI_* in its environment)."""
    r = stack.replication
    all_members = members(stack)
    rest = f"{me.address}:{r.rest_port}"
    hba_hosts = [f"{m.address}/32" for m in all_members]
    pg_hba = [f"local all {SUPERUSER} peer", "local all all scram-sha-256"]
    pg_hba += [f"host replication {REPLICATION_USER} {h} scram-sha-256" for h in hba_hosts]
    # Clients arrive through HAProxy, whose source address is one of the members'.
    pg_hba += [f"host all all {h} scram-sha-256" for h in hba_hosts]
    pg_hba += ["host all all 0.0.0.0/0 reject"]
    config = {
        "scope": r.scope,
        "namespace": "/service/",
        "name": me.name,
        "log": {"level": "INFO", "format": "%(asctime)s %(levelname)s: %(message)s"},
        "restapi": {
            "listen": rest,
            "connect_address": rest,
            "authentication": {"username": REST_USER},  # password: PATRONI_RESTAPI_PASSWORD
        },
        "etcd3": {"hosts": [f"{m.address}:{r.etcd_client_port}" for m in all_members]},
        "bootstrap": {
            "dcs": {
                "ttl": int(r.ttl.seconds),
                "loop_wait": int(r.loop_wait.seconds),
                "retry_timeout": int(r.retry_timeout.seconds),
                "maximum_lag_on_failover": r.maximum_lag_on_failover.bytes,
                "postgresql": {
                    "use_pg_rewind": True,
                    "use_slots": True,
                    "parameters": {
                        "max_connections": r.max_connections,
                        "max_wal_senders": 10,
                        "max_replication_slots": 10,
                        "wal_level": "replica",
                        "wal_log_hints": "on",
                        "hot_standby": "on",
                        "wal_keep_size": "128MB",
                        "shared_preload_libraries": "pg_stat_statements",
                        "pg_stat_statements.track": "all",
                    },
                },
            },
            "initdb": [
                {"encoding": "UTF8"},
                "data-checksums",
                {"locale-provider": "builtin"},
                {"builtin-locale": "C.UTF-8"},
                {"auth-local": "peer"},
                {"auth-host": "scram-sha-256"},
            ],
        },
        "postgresql": {
            "listen": f"{me.address}:{r.postgres_port}",
            "connect_address": f"{me.address}:{r.postgres_port}",
            "data_dir": PGDATA,
            "bin_dir": BIN_DIR,
            "pgpass": "/tmp/pgpass",
            "use_unix_socket": True,
            "authentication": {
                "superuser": {"username": SUPERUSER},
                "replication": {"username": REPLICATION_USER},
                "rewind": {"username": REWIND_USER},
            },
            "parameters": {
                "unix_socket_directories": SOCKET_DIR,
                "shared_buffers": _size(r.shared_buffers.bytes),
                "password_encryption": "scram-sha-256",
                "jit": "off",
                "max_parallel_workers_per_gather": 0,
                "log_min_duration_statement": "500ms",
            },
            "pg_hba": pg_hba,
        },
        "tags": {"nofailover": False, "noloadbalance": False, "clonefrom": False, "nosync": False},
    }
    head = f"# Patroni member {me.name} of cluster {r.scope}: rendered by commands/patroni.py\n"
    return head + yaml.safe_dump(config, sort_keys=False)


def haproxy_config(stack: Stack, me: Member) -> str:
    """haproxy.cfg of one member: both ports check every member's Patroni REST API."""
    r = stack.replication
    lag = _size(r.replica_max_lag.bytes)
    servers = [
        f"    server {m.name} {m.address}:{r.postgres_port} maxconn {r.max_connections} "
        f"check port {r.rest_port}"
        for m in members(stack)
    ]
    lines = [
        f"# HAProxy on {me.name}: rendered by aiia_ops (commands/patroni.py)",
        "global",
        f"    maxconn {2 * r.max_connections + 20}",
        "    log stdout format raw local0 notice",
        "",
        "defaults",
        "    mode tcp",
        "    log global",
        "    timeout connect 2s",
        "    timeout client 30m",
        "    timeout server 30m",
        "    timeout check 2s",
        # a member marked down loses its sessions at once: clients reconnect to the new one
        "    default-server inter 1s fastinter 500ms downinter 1s rise 2 fall 2 "
        "on-marked-down shutdown-sessions",
        "",
        "listen primary",
        f"    bind {me.address}:{r.write_port}",
        "    option httpchk GET /primary",
        "    http-check expect status 200",
        *servers,
        "",
        "listen replicas",
        f"    bind {me.address}:{r.read_port}",
        "    balance leastconn",
        f"    option httpchk GET /replica?lag={lag}",
        "    http-check expect status 200",
        *servers,
        "",
        "listen stats",
        "    mode http",
        f"    bind {me.address}:{r.stats_port}",
        "    stats enable",
        "    stats uri /",
        "",
    ]
    return "\n".join(lines)


def etcd_argv(stack: Stack, me: Member, state: str = "new") -> list[str]:
    r = stack.replication
    cluster = ",".join(f"{m.name}=http://{m.address}:{r.etcd_peer_port}" for m in members(stack))
    return [
        "etcd", "--name", me.name, "--data-dir", f"{ETCD_DATA}/{me.name}",
        "--listen-peer-urls", f"http://{me.address}:{r.etcd_peer_port}",
        "--initial-advertise-peer-urls", f"http://{me.address}:{r.etcd_peer_port}",
        "--listen-client-urls", f"http://{me.address}:{r.etcd_client_port},http://127.0.0.1:{r.etcd_client_port}",
        "--advertise-client-urls", f"http://{me.address}:{r.etcd_client_port}",
        "--initial-cluster", cluster, "--initial-cluster-state", state,
        "--initial-cluster-token", f"aiia-{r.scope}",
        # Patroni's keys are a few kB: small snapshots and an hourly compaction keep etcd's
        # memory flat (the default snapshot count, 100000, holds that many entries in RAM).
        "--snapshot-count", "5000", "--auto-compaction-mode", "periodic",
        "--auto-compaction-retention", "1h", "--quota-backend-bytes", str(256 * 1024 * 1024),
        "--heartbeat-interval", "100", "--election-timeout", "1000",
        "--log-level", "warn",
    ]  # fmt: skip


# --- containers ---------------------------------------------------------------------------

# Same rules as every container of the stack (commands/hardening.py): no capability, no new
# privileges, read-only root, tmpfs scratch, pids and open-file limits.
_HARDENING = {
    "aiia_etcd": {"pids": 64, "nofile": 4096, "tmpfs": ["/tmp:size=256k"]},
    "aiia_patroni": {
        "pids": 160,
        "nofile": 4096,
        "tmpfs": ["/tmp:size=1m,mode=1777", f"{SOCKET_DIR}:size=64k,mode=0755,uid=10001,gid=10001"],
    },
    "aiia_haproxy": {"pids": 16, "nofile": 4096, "tmpfs": ["/tmp:size=256k"]},
}


def _limit(stack: Stack, container: str) -> str:
    mem = stack.replication.memory
    size = {"aiia_etcd": mem.etcd, "aiia_patroni": mem.patroni, "aiia_haproxy": mem.haproxy}
    return f"{size[container].bytes // (1024 * 1024)}m"


def run_argv(stack: Stack, me: Member, container: str, image: str, state: str = "new") -> list[str]:
    """`docker run` of one of the member's three containers (on that host's engine)."""
    h = _HARDENING[container]
    limit = _limit(stack, container)
    argv = ["docker", "run", "--detach", "--name", container, "--hostname", me.name,
            "--network", "host", "--restart", "unless-stopped",
            "--memory", limit, "--memory-swap", limit,
            "--label", "org.eduaiia.role=replication", "--label", f"org.eduaiia.member={me.name}",
            "--cap-drop", "ALL", "--security-opt", "no-new-privileges:true", "--read-only",
            "--pids-limit", str(h["pids"]), "--ulimit", f"nofile={h['nofile']}:{h['nofile']}",
            "--env", f"AIIA_ADDRESS={me.address}"]  # fmt: skip
    for t in h["tmpfs"]:
        argv += ["--tmpfs", t]
    if container == "aiia_etcd":
        # Go's heap target under the limit: the collector works before the OOM killer does.
        gomem = stack.replication.memory.etcd.bytes * 3 // 4 // (1024 * 1024)
        argv += ["--env", f"GOMEMLIMIT={gomem}MiB", "--volume", f"{VOLUMES[container]}:{ETCD_DATA}"]
        return [*argv, image, *etcd_argv(stack, me, state)]
    argv += ["--volume", f"{me.config_dir}:{CONFIG_DIR}:ro"]
    if container == "aiia_patroni":
        argv += ["--env-file", me.env_file, "--env", f"PATRONI_RESTAPI_USERNAME={REST_USER}",
                 "--volume", f"{VOLUMES[container]}:{PGDATA}",
                 "--stop-timeout", "30"]  # fmt: skip
        return [*argv, image, "patroni", f"{CONFIG_DIR}/patroni.yml"]
    return [*argv, image, "haproxy", "-W", "-db", "-f", f"{CONFIG_DIR}/haproxy.cfg"]


def state_argv(container: str) -> list[str]:
    """`running` | `exited` | ... of a container, or a failed query when there is none."""
    return ["docker", "inspect", "--format", "{{.State.Status}}", container]


def start_argv(container: str) -> list[str]:
    return ["docker", "start", container]


def stop_argv(container: str) -> list[str]:
    return ["docker", "stop", "--time", "30", container]


def kill_argv(containers: tuple[str, ...] = CONTAINERS) -> list[str]:
    """SIGKILL every process of the member at once: what the host's power loss does."""
    return ["docker", "kill", *containers]


def remove_argv(containers: tuple[str, ...] = CONTAINERS) -> list[str]:
    return ["docker", "rm", "--force", *containers]


def remove_volumes_argv() -> list[str]:
    return ["docker", "volume", "rm", "--force", *VOLUMES.values()]


def image_present_argv(image: str) -> list[str]:
    return ["docker", "image", "inspect", "--format", "{{.Id}}", image]


def patronictl(*args: str) -> list[str]:
    config = f"{CONFIG_DIR}/patroni.yml"
    return ["docker", "exec", "aiia_patroni", "patronictl", "-c", config, *args]


def list_argv() -> list[str]:
    return patronictl("list", "--format", "json")


def switchover_argv(leader: str, candidate: str | None) -> list[str]:
    extra = ["--candidate", candidate] if candidate else []
    return patronictl("switchover", "--leader", leader, *extra, "--force")


def psql_argv(database: str, sql: str) -> list[str]:
    """psql as the superuser over the container's socket (peer: no password anywhere)."""
    return ["docker", "exec", "-i", "aiia_patroni", "psql", "-X", "-q", "-At", "-v",
            "ON_ERROR_STOP=1", "-h", SOCKET_DIR, "-U", SUPERUSER, "-d", database,
            "-c", sql]  # fmt: skip


def ensure_database_argv(database: str, role: str) -> list[str]:
    """The postgres image's own `ensure-database` (password on stdin), on the primary."""
    return ["docker", "exec", "-i", "-e", f"PGHOST={SOCKET_DIR}", "aiia_patroni",
            "ensure-database", database, role]  # fmt: skip


REPLICATION_SQL = (
    "SELECT application_name, state, pg_wal_lsn_diff(pg_current_wal_lsn(), replay_lsn), "
    "coalesce(extract(epoch FROM replay_lag) * 1000, 0) FROM pg_stat_replication;"
)


def replication_argv(database: str = "postgres") -> list[str]:
    """The primary's own view of its replicas (parse_replication): run on the leader."""
    return psql_argv(database, REPLICATION_SQL)


def stats_argv(containers: tuple[str, ...] = CONTAINERS) -> list[str]:
    return ["docker", "stats", "--no-stream", "--format", "{{.Name}} {{.MemUsage}}", *containers]


# --- parsers ------------------------------------------------------------------------------


@dataclass(frozen=True)
class MemberState:
    name: str
    host: str
    role: str  # Leader | Replica | Sync Standby | Standby Leader
    state: str  # running | streaming | starting | stopped ...
    timeline: int | None
    lag_mb: float | None  # Patroni's "Lag in MB" (None for the leader, or unknown)


def parse_list(text: str) -> list[MemberState]:
    """`patronictl list --format json` -> one MemberState per member."""
    try:
        rows = json.loads(text or "[]")
    except json.JSONDecodeError:
        shown = text[:200]
        raise OpsError(f"patronictl list answered something that is not JSON: {shown!r}") from None
    out = []
    for row in rows:
        lag = row.get("Lag in MB")
        tl = row.get("TL")
        out.append(MemberState(
            name=row.get("Member", ""), host=str(row.get("Host", "")), role=row.get("Role", ""),
            state=row.get("State", ""), timeline=int(tl) if isinstance(tl, int) else None,
            lag_mb=float(lag) if isinstance(lag, (int, float)) else None,
        ))  # fmt: skip
    return out


def parse_replication(text: str) -> dict[str, tuple[str, float | None, float | None]]:
    """`replication_argv` rows `member|state|bytes|ms` -> {member: (state, bytes, ms)}
    (Patroni names each replica's connection after its member)."""
    out: dict[str, tuple[str, float | None, float | None]] = {}
    for line in text.splitlines():
        parts = line.split("|")
        if len(parts) != 4 or not parts[0]:
            continue

        def num(v: str) -> float | None:
            try:
                return float(v)
            except ValueError:
                return None

        out[parts[0]] = (parts[1], num(parts[2]), num(parts[3]))
    return out


def leader(states: list[MemberState]) -> MemberState | None:
    return next((s for s in states if s.role == "Leader" and s.state == "running"), None)


def parse_mem(text: str) -> dict[str, float]:
    """`docker stats` lines `name 41.2MiB / 256MiB` -> {name: MiB used}."""
    units = {"B": 1 / 2**20, "KiB": 1 / 1024, "kB": 1 / 1024, "MiB": 1.0, "MB": 1.0,
             "GiB": 1024.0, "GB": 1024.0}  # fmt: skip
    out = {}
    for line in text.splitlines():
        parts = line.split()
        if len(parts) < 2:
            continue
        used = parts[1]
        for unit in sorted(units, key=len, reverse=True):
            if used.endswith(unit):
                number = used[: -len(unit)]
                if number.replace(".", "", 1).isdigit():
                    out[parts[0]] = round(float(number) * units[unit], 1)
                break
    return out


# --- the image and the probe ----------------------------------------------------------------


def build_argv(image: str, tag: str, postgres_image: str, folder: str) -> list[str]:
    """services/patroni FROM the stack's own postgres image (the tag `invoke build` gave it)."""
    return ["docker", "build", "--tag", f"{image}:{tag}", "--tag", f"{image}:latest",
            "--build-arg", f"POSTGRES_IMAGE={postgres_image}",
            "--label", f"org.eduaiia.version={tag}", folder]  # fmt: skip


def client_argv(image: str, *command: str) -> list[str]:
    """A client command of the image (`db-probe` of services/patroni/scripts, psql,
    pgbench) in a throwaway container on this machine's engine, in this machine's network
    (the lab hosts' addresses are on its bridge). libpq reads host, port, user, database
    and password from the PG* variables passed through: no secret on a command line."""
    env = ["PGHOST", "PGPORT", "PGUSER", "PGDATABASE", "PGPASSWORD", "PGCONNECT_TIMEOUT",
           "PGTARGETSESSIONATTRS"]  # fmt: skip
    flags = [x for name in env for x in ("--env", name)]
    return ["docker", "run", "--rm", "--network", "host", "--memory", "64m", "--read-only",
            "--cap-drop", "ALL", "--security-opt", "no-new-privileges:true", *flags,
            image, *command]  # fmt: skip


def probe_argv(image: str, *args: str) -> list[str]:
    return client_argv(image, "db-probe", *args)
