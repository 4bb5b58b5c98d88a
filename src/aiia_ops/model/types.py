"""The stack model's types: deploy/stack.yml as typed data (loading is in model/load.py).

Every problem comes back at once, one line each, as a `StackError`; nothing runs on a
stack that has one.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field
from typing import Annotated, Literal

from aiia_ops.errors import OpsError
from aiia_ops.model.schema import LongText, Match, field_key
from aiia_ops.model.units import Duration, Size

IPv4 = ipaddress.IPv4Address

# --- identifiers and the texts that reach configs, paths and argvs -----------------------
# Each is checked when the stack is built: nothing that can break a config line, a path
# or an argv (newline, `;`, `{`, `..`, a leading `-`) gets through.


def _name(what: str) -> Match:
    return Match(r"[a-z][a-z0-9_-]{0,31}", f"{what} is 1-32 of a-z 0-9 _ -, starting with a letter")


_PATH = r"/(?!.*//)(?:(?!\.\.?(?:/|$))[A-Za-z0-9_.@+-]+(?:/|$))*"
_SEGMENT = r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*"

ENV_NAME = _name("an environment name")
PROJECT_NAME = _name("a project name")
HOST_NAME = _name("a host's name (its key under hosts)")
VOLUME_NAME = _name("a volume name")
ProjectName = Annotated[str, PROJECT_NAME]
HostName = Annotated[str, HOST_NAME]
VolumeName = Annotated[str, VOLUME_NAME]
ContainerName = Annotated[
    str,
    Match(
        r"[a-z0-9][a-z0-9_.-]{0,62}",
        "a container name is 1-63 of a-z 0-9 _ . -, starting with a letter or digit",
    ),
]
NetworkName = Annotated[
    str,
    Match(
        r"[a-z0-9][a-z0-9_.-]{0,62}",
        "a network name is 1-63 of a-z 0-9 _ . -, starting with a letter or digit",
    ),
]
ImageName = Annotated[
    str,
    Match(
        rf"(?=.{{1,200}}$)(?:[a-z0-9][a-z0-9.-]*(?::\d{{1,5}})?/)?{_SEGMENT}(?:/{_SEGMENT})*",
        "an image name is a repository such as aiia/nginx or registry:5000/aiia/nginx "
        "(a-z 0-9 . _ -, no tag)",
    ),
]
SqlName = Annotated[
    str,
    Match(
        r"[a-z_][a-z0-9_]{0,62}",
        "a PostgreSQL name is 1-63 of a-z 0-9 _, starting with a letter or _",
    ),
]
PATH_RULE = Match(
    rf"(?=.{{1,255}}$){_PATH}",
    "expected an absolute path of A-Z a-z 0-9 _ . @ + - and /, without . or .. parts",
)
AbsolutePath = Annotated[str, PATH_RULE]
UrlPath = Annotated[
    str,
    Match(
        rf"(?=.{{1,255}}$){_PATH}",
        "expected a URL path such as /health/ (A-Z a-z 0-9 _ . @ + - and /)",
    ),
]
Ciphers = Annotated[
    str,
    Match(
        r"[A-Za-z0-9:+!@=_-]{1,1000}",
        "an OpenSSL cipher string is 1-1000 of A-Z a-z 0-9 : + ! @ = _ - (such as HIGH:!aNULL)",
    ),
]
Email = Annotated[
    str,
    Match(
        r"(?=.{1,254}$)[A-Za-z0-9_][A-Za-z0-9._%+-]*@(?:[A-Za-z0-9-]+\.)+[A-Za-z]{2,63}",
        "expected an e-mail address such as ops@example.com",
    ),
]
AcmeDirectory = Annotated[
    str,
    Match(
        r"(?=.{1,255}$)https?://[A-Za-z0-9][A-Za-z0-9.-]*(?::\d{1,5})?"
        r"(?:/(?!\.\.?(?:/|$))[A-Za-z0-9_.~%+-]*)*",
        "expected an ACME directory URL such as "
        "https://acme-v02.api.letsencrypt.org/directory (no .. parts, query or spaces)",
    ),
]
Argument = Annotated[
    str,
    Match(r"[^\x00-\x1f\x7f]{1,255}", "an argument is 1-255 printable characters"),
]


class StackError(OpsError):
    def __init__(self, source: str, problems: list[str]):
        self.source, self.problems = source, problems
        noun = "problem" if len(problems) == 1 else "problems"
        body = "\n".join(f"  {p}" for p in problems)
        super().__init__(f"{source}: {len(problems)} {noun}\n{body}")


# --- building blocks -------------------------------------------------------------------


@dataclass(frozen=True)
class Memory:
    limit: Size
    reservation: Size


@dataclass(frozen=True)
class Cpu:
    limit: float
    reservation: float


@dataclass(frozen=True)
class Healthcheck:
    interval: Duration
    timeout: Duration
    retries: int
    http: UrlPath | None = None  # a path probed over HTTP inside the container
    command: list[Argument] | None = None  # or a command run inside the container


@dataclass(frozen=True)
class Machine:
    memory: Size
    cpus: float
    disk: Size
    os_reserve: Size

    @property
    def available_memory(self) -> Size:
        return self.memory - self.os_reserve


# What a host may run (hosts.<name>.roles); an empty list: anything (level 1's one host).
Role = Literal["load_balancer", "database", "pooler", "cache", "app"]


@dataclass(frozen=True)
class Host:
    ssh: str | None = None  # user@address[:port]; None = this machine's engine
    state_dir: AbsolutePath = "/var/lib/aiia"
    publish_address: ipaddress.IPv4Address = ipaddress.IPv4Address("0.0.0.0")
    # Published port = container port + offset. 0 in production; a second stack on one
    # machine (tests beside a running stack) publishes 80/443 elsewhere.
    port_offset: int = 0
    # Several hosts (model/placement.py): what each may run, the private address the
    # others reach it on, and its own machine (None: the stack's `machine`).
    roles: list[Role] = field(default_factory=list)
    address: ipaddress.IPv4Address | None = None
    machine: Machine | None = None

    def published(self, port: int) -> int:
        return port + self.port_offset

    @property
    def is_local(self) -> bool:
        return self.ssh is None


@dataclass(frozen=True)
class Network:
    name: NetworkName
    subnet: ipaddress.IPv4Network


@dataclass(frozen=True)
class Acme:
    directory: AcmeDirectory
    email: Email
    renew_before: Duration
    webroot: AbsolutePath


@dataclass(frozen=True)
class Tls:
    protocols: list[Literal["TLSv1.2", "TLSv1.3"]]
    ciphers: Ciphers
    hsts_max_age: int
    session_timeout: Duration
    session_cache_size: Size
    session_tickets: bool
    acme: Acme


# --- shared services -----------------------------------------------------------------


@dataclass(frozen=True)
class NginxSettings:
    worker_processes: Literal["auto"] | int
    worker_connections: int
    gzip_level: int
    static_max_age: Duration
    access_log_buffer: Size
    access_log_flush: Duration
    client_max_body_size: Size
    keepalive_timeout: Duration
    upstream_keepalive: int
    # Anonymous GET /api/ answers kept by nginx this long (0s = off); see docs/performance.md.
    api_cache: Duration = Duration(0)
    # Requests in flight to an environment's app per gunicorn thread before nginx answers
    # 503 at once (0 = no limit): the queue in front of the app stays bounded.
    app_inflight_per_thread: int = 0
    # Log rotation (commands/logrotate.py): the access log is rotated daily, and hourly when
    # it has grown past access_log_max; this many rotated generations are kept (the newest
    # plain, the others gzipped), so the logs' disk use is bounded whatever the traffic.
    access_log_keep: int = 14
    access_log_max: Size = Size(256 * 1024**2)
    # Bytes of a response nginx encrypts per TLS record and write: 16 KB (OpenSSL's record
    # size) sends a gzipped CSS or a list page in one record; 4 KB split them (static
    # scenario +10-19%, docs/performance.md "Issue 17, sixth pass").
    ssl_buffer_size: Size = Size(16 * 1024)


@dataclass(frozen=True)
class PgbouncerSettings:
    pool_mode: Literal["session", "transaction", "statement"]
    max_client_conn: int
    default_pool_size: int
    reserve_pool_size: int
    server_idle_timeout: Duration


@dataclass(frozen=True)
class PostgresSettings:
    superuser: SqlName
    max_connections: int
    shared_buffers: Size
    effective_cache_size: Size
    work_mem: Size
    maintenance_work_mem: Size
    autovacuum_naptime: Duration
    default_statistics_target: int


RedisPolicy = Literal[
    "noeviction",
    "allkeys-lru",
    "allkeys-lfu",
    "allkeys-random",
    "volatile-lru",
    "volatile-lfu",
    "volatile-random",
    "volatile-ttl",
]


@dataclass(frozen=True)
class RedisSettings:
    maxmemory: Size
    maxmemory_policy: RedisPolicy
    databases: int
    appendonly: bool


@dataclass(frozen=True, kw_only=True)
class Service:
    container: ContainerName
    image: ImageName
    address: IPv4
    memory: Memory
    cpu: Cpu
    healthcheck: Healthcheck
    port: int | None = None
    publish: list[int] = field(default_factory=list)
    volumes: dict[VolumeName, AbsolutePath] = field(default_factory=dict)
    domains: list[str] = field(default_factory=list)
    host: str | None = None  # where it runs (a key of `hosts`); None: the only host
    name: str = field(default="", init=False)  # its key in `services`


@dataclass(frozen=True, kw_only=True)
class NginxService(Service):
    settings: NginxSettings


@dataclass(frozen=True, kw_only=True)
class PgbouncerService(Service):
    port: int  # required: others connect to it
    settings: PgbouncerSettings


@dataclass(frozen=True, kw_only=True)
class PostgresService(Service):
    port: int  # required: others connect to it
    settings: PostgresSettings


@dataclass(frozen=True, kw_only=True)
class RedisService(Service):
    port: int  # required: others connect to it
    settings: RedisSettings


@dataclass(frozen=True)
class Services:
    nginx: NginxService
    pgbouncer: PgbouncerService
    postgresql: PostgresService
    redis: RedisService

    def all(self) -> list[Service]:
        return [self.nginx, self.pgbouncer, self.postgresql, self.redis]


# --- the app, per environment ------------------------------------------------------------


@dataclass(frozen=True)
class Instance:
    """One app container of an environment on one host (`environments.<name>.instances`);
    what it leaves out is the environment's own (container, address, port ...)."""

    host: str
    container: str | None = None
    address: IPv4 | None = None
    standby_address: IPv4 | None = None
    port: int | None = None


@dataclass(frozen=True)
class Gunicorn:
    workers: int
    threads: int
    worker_class: Literal["sync", "gthread", "gevent", "eventlet", "tornado"]
    timeout: Duration
    max_requests: int
    keepalive: Duration
    max_requests_jitter: int = 0
    # One line per request on stdout (docker logs). Off by default: nginx's access log has
    # every request with its upstream time and X-Request-ID; this cost 14% of the app's CPU
    # (docs/performance.md, "Issue 17, fifth pass"). On for debugging the app without nginx.
    access_log: bool = False


@dataclass(frozen=True, kw_only=True)
class Environment:
    """The app in one environment: the `app` block merged with `environments.<name>`."""

    container: ContainerName
    address: IPv4
    standby_address: IPv4
    port: int
    domains: list[str]
    database: SqlName
    redis_db: int
    image: ImageName
    memory: Memory
    cpu: Cpu
    healthcheck: Healthcheck
    gunicorn: Gunicorn
    hosts: list[HostName]
    volumes: dict[str, str] = field(default_factory=dict)
    # Several app containers across hosts; empty: one on each of `hosts` (level 1).
    instances: list[Instance] = field(default_factory=list)
    name: str = field(default="", init=False)  # its key in `environments`

    @property
    def db_user(self) -> str:
        return self.database

    @property
    def storage_volume(self) -> str:
        return f"storage_{self.name}"


# --- policies ----------------------------------------------------------------------------


@dataclass(frozen=True)
class DeployPolicy:
    keep_releases: int = 5
    health_timeout: Duration = Duration(60)
    drain_timeout: Duration = Duration(30)
    # A deploy lock older than this whose holder cannot be checked (its pid is on another
    # machine) is stale and taken over (host/lock.py). Longer than any real deploy.
    lock_max_age: Duration = Duration(6 * 3600)


@dataclass(frozen=True)
class Retention:
    pre_deploy: int = field_key("pre-deploy")
    daily: int = 7
    manual: int = 3
    media: int = 1
    config: int = 1


S3Host = Annotated[
    str,
    Match(
        r"[A-Za-z0-9]([A-Za-z0-9.-]{0,251}[A-Za-z0-9])?",
        "an S3 endpoint is a host name or IPv4 address (no scheme, no port: give `port`)",
    ),
]
BucketName = Annotated[
    str,
    Match(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]", "an S3 bucket name is 3-63 of a-z 0-9 . -"),
]
Stanza = Annotated[
    str, Match(r"[a-z][a-z0-9_-]{0,31}", "a stanza is 1-32 of a-z 0-9 _ -, starting with a letter")
]
Weekday = Literal["mon", "tue", "wed", "thu", "fri", "sat", "sun"]


CaCertificates = Annotated[
    str,
    LongText(20000),
    Match(
        r"(\s*-----BEGIN CERTIFICATE-----\s+[A-Za-z0-9+/=\s]+-----END CERTIFICATE-----\s*)*",
        "expected the PEM text of the CA certificate(s) that signed the store's certificate "
        "(-----BEGIN CERTIFICATE----- ... -----END CERTIFICATE-----), or nothing when a "
        "public CA signed it",
    ),
]


@dataclass(frozen=True)
class S3Repository:
    """pgBackRest's repo1: an S3-compatible object store on another host (off-site)."""

    endpoint: S3Host = "s3.example.net"
    bucket: BucketName = "aiia-backups"
    port: int = 443
    region: str = "us-east-1"
    path: AbsolutePath = "/pgbackrest"
    uri_style: Literal["host", "path"] = "path"
    # The store's certificate is checked against the image's public CAs, or against `ca`
    # when a CA of one's own signed it (the lab's store: `invoke offsite.up` prints it).
    verify_tls: bool = True
    ca: CaCertificates = ""
    retention_full: int = 2  # full backups kept (and the WAL they need)
    retention_diff: int = 7  # differential backups kept


@dataclass(frozen=True)
class Pitr:
    """Continuous WAL archiving and point-in-time recovery (commands/pgbackrest.py)."""

    repo1: S3Repository = field(default_factory=S3Repository)
    enabled: bool = False
    stanza: Stanza = "aiia"
    archive_timeout: Duration = Duration(60)  # bounds the RPO: a partial segment goes then
    full_weekday: Weekday = "sun"
    base_at: str = "01:30"  # UTC: full on full_weekday, differential every other day
    lag_warning: Duration = Duration(300)
    lag_critical: Duration = Duration(900)
    backup_age_warning: Duration = Duration(2 * 86400)
    backup_age_critical: Duration = Duration(8 * 86400)
    # pgBackRest's own processes inside PostgreSQL's container (archive-push, its async
    # sender, a backup's processes at once), measured: the budget check adds it to
    # PostgreSQL's worst case when archiving is on (docs/allocation.md "Archiving on 512 MB").
    memory: Size = Size.mb_(40)
    # The media and configuration set off-site (restic, `invoke backup.media`): copied
    # every hour at files_minute; the monitor's "last off-site media copy" age thresholds.
    files_minute: int = 20
    files_age_warning: Duration = Duration(3 * 3600)
    files_age_critical: Duration = Duration(26 * 3600)


@dataclass(frozen=True)
class Backups:
    daily_at: str
    retention: Retention
    # The longest a restore may hold PgBouncer paused: a restore killed inside the pause
    # (even with SIGKILL) is resumed by a guard in the pgbouncer container after this long.
    pause_limit: Duration = Duration(30)
    pitr: Pitr = field(default_factory=Pitr)


@dataclass(frozen=True)
class PercentMetric:
    warning: float
    critical: float
    every: Duration


@dataclass(frozen=True)
class SizeMetric:
    warning: Size
    critical: Size
    every: Duration


@dataclass(frozen=True)
class LatencyMetric:
    warning: Duration
    critical: Duration
    every: Duration


@dataclass(frozen=True)
class CountMetric:
    warning: int
    critical: int
    every: Duration


@dataclass(frozen=True)
class AvailabilityMetric:
    critical_below: float
    every: Duration


@dataclass(frozen=True)
class Metrics:
    cpu_percent: PercentMetric
    memory_percent: PercentMetric
    disk_percent: PercentMetric
    db_connections: CountMetric
    cache_memory: SizeMetric
    http_error_percent: PercentMetric
    http_latency_p95: LatencyMetric
    availability: AvailabilityMetric


@dataclass(frozen=True)
class Probe:
    interval: Duration
    timeout: Duration
    retries: int


@dataclass(frozen=True)
class Monitoring:
    interval: Duration
    metrics: Metrics
    docker_ps: Probe


# --- level 4: the replicated database (commands/patroni.py, docs/patroni.md) -------------


@dataclass(frozen=True)
class ReplicationMemory:
    """Container limits per database host: Patroni and its PostgreSQL share one."""

    patroni: Size = Size.parse("256MB")
    etcd: Size = Size.parse("64MB")
    haproxy: Size = Size.parse("32MB")


@dataclass(frozen=True)
class Replication:
    """PostgreSQL managed by Patroni on `hosts` (one primary, streaming replicas), etcd on
    the same hosts as Patroni's store (one member each: three survive one loss), HAProxy on
    each of them: `write_port` -> the primary (Patroni's REST `/primary`), `read_port` ->
    the replicas within `replica_max_lag` (`/replica?lag=`). Off while `hosts` is empty."""

    hosts: list[HostName] = field(default_factory=list)
    scope: Stanza = "aiia"  # the Patroni cluster's name (its etcd prefix /service/<scope>)
    image: ImageName = "aiia/patroni"
    # Leader key TTL, HA loop and DCS retry: the failover window is about ttl + loop_wait.
    # Patroni's floors: ttl >= 20 s, loop_wait >= 1 s, retry_timeout >= 3 s, and
    # loop_wait + 2 x retry_timeout <= ttl.
    ttl: Duration = Duration(20)
    loop_wait: Duration = Duration(2)
    retry_timeout: Duration = Duration(5)
    maximum_lag_on_failover: Size = Size.parse("1MB")  # a replica further behind is never promoted
    replica_max_lag: Size = Size.parse("1MB")  # reads leave a replica further behind
    postgres_port: int = 5432
    rest_port: int = 8008
    etcd_client_port: int = 2379
    etcd_peer_port: int = 2380
    write_port: int = 5000
    read_port: int = 5001
    stats_port: int = 7000
    max_connections: int = 100
    shared_buffers: Size = Size.parse("64MB")
    memory: ReplicationMemory = field(default_factory=ReplicationMemory)


# --- the stack ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Stack:
    project: ProjectName
    machine: Machine
    runtime: Literal["compose", "swarm"]
    hosts: dict[HostName, Host]
    network: Network
    tls: Tls
    services: Services
    environments: dict[str, Environment]
    deploy: DeployPolicy
    backups: Backups
    monitoring: Monitoring
    replication: Replication = field(default_factory=Replication)
    source: str = ""
    profile: str = ""  # the profile file laid over `source` (model/profiles.py), if any

    @property
    def local_host(self) -> Host:
        """The host this machine's engine serves (level 1: the only one)."""
        return next(iter(self.hosts.values()))

    def environment(self, name: str) -> Environment:
        if name not in self.environments:
            known = ", ".join(self.environments)
            raise OpsError(f"unknown environment {name!r}; expected one of: {known}")
        return self.environments[name]

    def containers(self) -> list[Service | Environment]:
        return [*self.services.all(), *self.environments.values()]

    @property
    def status_domain(self) -> str:
        return self.services.nginx.domains[0]
