"""What each container of the stack may do, in one table: Linux capabilities, privilege
gain, where it may write, how many processes and open files it may hold.

Every container: `--cap-drop ALL` (plus the entry's `cap_add`, none today), `no-new-
privileges` (a setuid binary cannot raise a process above UID 10001), a read-only root
filesystem with a few writable paths, a pids limit and an open-files limit.

Writable paths are tmpfs mounts (`Scratch`) or named volumes (`Spill`). tmpfs pages are
memory charged to the container that writes them: they count against its own memory limit
(never beyond it, so the machine's budget is unchanged, but they shrink the program's
headroom). Each tmpfs is therefore tiny and capped (`size=`), and a unit test keeps the
sum under 1/16 of the container's limit. What can grow past a few KB (nginx's request
bodies and upstream spills, its API cache) goes to a disk volume instead.

None of the programs needs a capability: each runs as UID 10001, and nginx binds 80/443
through `net.ipv4.ip_unprivileged_port_start=0` in its own network namespace (compose.py).
Per-service notes: services/<name>/README.md, "Hardening".
"""

from __future__ import annotations

from dataclasses import dataclass

APP_UID = 10001  # every image's user (docs/architecture.md)
KB = 1024
NO_NEW_PRIVILEGES = "no-new-privileges:true"


@dataclass(frozen=True)
class Scratch:
    """A tmpfs mount: memory, charged to the container, capped at `size` bytes."""

    path: str
    size: int
    why: str
    mode: str = "1777"
    owner: int | None = None  # uid = gid; None: root, with a sticky world-writable mode

    def spec(self) -> str:
        """`PATH:OPTIONS` as `docker run --tmpfs` and compose's `tmpfs:` take it."""
        opts = ["rw", "noexec", "nosuid", "nodev", f"size={self.size // KB}k", f"mode={self.mode}"]
        if self.owner is not None:
            opts += [f"uid={self.owner}", f"gid={self.owner}"]
        return f"{self.path}:{','.join(opts)}"


@dataclass(frozen=True)
class Spill:
    """A named volume (disk) for what may grow: `volume` is the stack's volume key."""

    volume: str
    path: str
    why: str


@dataclass(frozen=True)
class Hardening:
    pids: int
    nofile: int
    why: str  # the sizing of pids/nofile
    scratch: tuple[Scratch, ...] = ()
    spill: tuple[Spill, ...] = ()
    cap_add: tuple[str, ...] = ()  # none needed today (see the module's docstring)
    read_only: bool = True
    writable_root_why: str = ""  # required when read_only is False

    @property
    def tmpfs_bytes(self) -> int:
        return sum(s.size for s in self.scratch)


_TMP_SOCKET = "PgBouncer's unix socket (unix_socket_dir = /tmp); a socket takes no space"

PROFILES: dict[str, Hardening] = {
    "nginx": Hardening(
        pids=32,
        nofile=8192,
        why="master + worker_processes + cache manager/loader, plus the entrypoint, "
        "`nginx -t`/reload and the health check exec'd beside them; open files: two per "
        "proxied connection (client + upstream) x worker_connections 2048, plus "
        "open_file_cache's 1000 descriptors and the logs",
        spill=(
            Spill(
                "nginx_temp",
                "/tmp",
                "pid file, request bodies past 16 KB (up to client_max_body_size), upstream "
                "answers past proxy_buffers, the API cache (max_size 4 MB): on disk, since "
                "in a tmpfs they would count against nginx's 38 MB limit under load",
            ),
        ),
    ),
    "postgresql": Hardening(
        pids=96,
        nofile=4096,
        why="one process per connection (max_connections 50) + ~8 background workers "
        "(autovacuum 2) + pg_dump/psql/bash exec'd by backups; open files: each process "
        "keeps at most max_files_per_process (1000) itself",
        scratch=(
            Scratch(
                "/run/postgresql",
                64 * KB,
                "unix socket and its lock file (unix_socket_directories); owned by the "
                "server's user like the image's own directory",
                mode="0755",
                owner=APP_UID,
            ),
            Scratch(
                "/tmp",
                256 * KB,
                "initdb's 0600 password file (first start only) and here-documents of "
                "the maintenance scripts (backup-database, ensure-database) bash may spill",
            ),
        ),
    ),
    "pgbouncer": Hardening(
        pids=16,
        nofile=1024,
        why="one single-threaded process, plus pg_isready/psql exec'd beside it; open "
        "files: max_client_conn 100 + server connections (10 + 2 per pool, 2 pools) + "
        "listeners",
        scratch=(Scratch("/tmp", 256 * KB, _TMP_SOCKET),),
    ),
    "redis": Hardening(
        pids=32,
        nofile=10240,
        why="main thread + bio threads + the AOF rewrite's child + redis-cli exec'd by "
        "the health check and backups; open files: Redis asks for maxclients (default "
        "10000) + 32 and lowers maxclients with a warning at every start when it cannot",
        # Everything Redis writes (AOF, RDB, rewrite temp files) is under dir /data, the
        # volume: no tmpfs at all.
    ),
    "app": Hardening(
        pids=64,
        nofile=1024,
        why="gunicorn master + workers x (threads + 1), plus the health check and the "
        "backup's sh/tar exec'd beside them; open files: nginx's keep-alive pool and "
        "in-flight requests (at most 16 x workers x threads) and their database and Redis "
        "connections",
        scratch=(
            Scratch(
                "/tmp",
                4 * KB * KB,
                "Python's tempfile (Django spills uploads past 2.5 MB there; the app has no "
                "file upload). Worker heartbeats go to /dev/shm (worker_tmp_dir), static "
                "files and media to the storage volume",
            ),
        ),
    ),
    "certbot": Hardening(
        pids=32,
        nofile=1024,
        why="one Python process and its threads",
        scratch=(
            Scratch(
                "/tmp",
                4 * KB * KB,
                "Python's tempfile; certbot's own state, work and logs dirs are the "
                "letsencrypt bind mount, the challenge files the webroot bind mount",
            ),
        ),
    ),
}


def profile(name: str) -> Hardening:
    """`name`: nginx, postgresql, pgbouncer, redis, app (every app container) or certbot."""
    return PROFILES[name]


def compose_keys(name: str) -> dict:
    """The compose service keys of the profile (volumes of `spill` are added by compose)."""
    p = profile(name)
    out: dict = {"cap_drop": ["ALL"]}
    if p.cap_add:
        out["cap_add"] = list(p.cap_add)
    out |= {
        "security_opt": [NO_NEW_PRIVILEGES],
        "read_only": p.read_only,
        "pids_limit": p.pids,
        "ulimits": {"nofile": {"soft": p.nofile, "hard": p.nofile}},
    }
    if p.scratch:
        out["tmpfs"] = [s.spec() for s in p.scratch]
    return out


def run_flags(name: str) -> list[str]:
    """The same profile as `docker run` flags (app releases, one-offs, certbot)."""
    p = profile(name)
    flags = ["--cap-drop", "ALL"]
    for cap in p.cap_add:
        flags += ["--cap-add", cap]
    flags += ["--security-opt", NO_NEW_PRIVILEGES]
    if p.read_only:
        flags.append("--read-only")
    for s in p.scratch:
        flags += ["--tmpfs", s.spec()]
    flags += ["--pids-limit", str(p.pids), "--ulimit", f"nofile={p.nofile}:{p.nofile}"]
    return flags
