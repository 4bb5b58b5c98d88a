"""The monitor's facts and one run: read the engine, /proc, the access log, certificates,
backups and releases; evaluate with the pure core (monitor.py); record history, publish
the status page and send alerts.

One run is what cron starts every minute (`invoke monitor --quiet`): it reads, writes and
exits; nothing stays resident. `collect()` alone (no store writes, no page, no Slack) is
what `invoke monitor --watch` repeats.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import datetime as _dt
import json
import os
import resource
import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from aiia_ops.commands import monitor as m
from aiia_ops.commands import statuspage
from aiia_ops.commands.compose import service_key
from aiia_ops.commands.monitor import CRIT, OK, UNKNOWN, WARN, Check, Report, Thresholds
from aiia_ops.errors import OpsError
from aiia_ops.host import lock as locks
from aiia_ops.host.engine import Engine
from aiia_ops.host.http import https_get
from aiia_ops.host.monitor_store import Store
from aiia_ops.host.releases import read_releases
from aiia_ops.host.runners import LocalRunner, Runner
from aiia_ops.model import Environment, Stack
from aiia_ops.model.state import StateDir

EXEC_TIMEOUT_S = 5  # the document's timeout for pg_isready / redis-cli
PROBE_TIMEOUT_S = 10  # ... and for the HTTP health checks
RESAMPLE_S = 1.0  # CPU: when there is no recent sample to compare with, wait this long
MAX_LOG_READ = 64 * 1024**2  # a first run reads at most the last 64 MB of the access log
RUN_LOCK = "monitor"  # host/lock's name for one recording run at a time
RUN_LOCK_WAIT_S = 50  # cron starts one a minute: wait for a slow one, not for a stuck one


def store_path(state: StateDir) -> Path:
    return state.root / "monitor" / "history.sqlite3"


def status_dir(state: StateDir) -> Path:
    return state.root / "status"


def access_log(state: StateDir) -> Path:
    return state.root / "logs" / "nginx" / "access.log"


# --- small readers (facts) ---------------------------------------------------------------


def read_host_cpu() -> tuple[int, int]:
    return m.parse_proc_stat(Path("/proc/stat").read_text())


def read_host_memory() -> tuple[int, int]:
    return m.parse_meminfo(Path("/proc/meminfo").read_text())


def mount_point(path: Path) -> Path:
    path = path.resolve()
    dev = path.stat().st_dev
    while path.parent != path and path.parent.stat().st_dev == dev:
        path = path.parent
    return path


def disk_usage(paths: dict[str, Path]) -> list[tuple[str, int, int, str]]:
    """(mount point, used, used+available, what lives there), one per file system."""
    seen: dict[Path, list[str]] = {}
    for what, p in paths.items():
        with contextlib.suppress(OSError):
            seen.setdefault(mount_point(p), []).append(what)
    out = []
    for mount, whats in seen.items():
        st = os.statvfs(mount)
        used = (st.f_blocks - st.f_bfree) * st.f_frsize
        avail = st.f_bavail * st.f_frsize  # as `df`: Use% = used / (used + available)
        out.append((str(mount), used, used + avail, ", ".join(whats)))
    return out


def cert_end_date(pem: Path, runner: Runner | None = None) -> _dt.datetime:
    """Expiry of a certificate file via `openssl x509 -enddate`."""
    result = (runner or LocalRunner()).query(m.openssl_enddate(str(pem)), timeout=10)
    if not result.ok:
        raise OpsError(f"openssl cannot read {pem}: {result.stderr.strip()}")
    return m.parse_enddate(result.stdout)


def certificates(state: StateDir, now: float) -> list[tuple[str, str, float | None, str]]:
    live = state.root / "ssl" / "live"
    checks = []
    for pem in sorted(live.glob("*/fullchain.pem")) if live.is_dir() else []:
        name = pem.parent.name
        placeholder = (pem.parent / "PLACEHOLDER").exists()
        try:
            end = cert_end_date(pem)
            days = m.days_left(end, now)
            detail = f"until {end:%Y-%m-%d}" + (" (self-signed placeholder)" if placeholder else "")
        except (OpsError, ValueError, OSError) as exc:
            days, detail = None, str(exc)[:120]
        checks.append(("cert_days", name, days, detail))
    return checks


def backups_info(state: StateDir, envs: list[str]) -> dict[str, dict]:
    """The newest backup per environment and its verification; {} fields when none yet.
    Read defensively: the backup task owns the format (<env>/<id>/, VERIFY.json,
    last-run.json)."""
    out = {}
    for env in envs:
        folder = state.root / "backups" / env
        info: dict = {"last": None}
        last_run = folder / "last-run.json"
        if last_run.is_file():
            with contextlib.suppress(OSError, ValueError):
                info["last_run"] = json.loads(last_run.read_text())
        sets = (
            sorted(
                (p for p in folder.iterdir() if p.is_dir() and not p.name.endswith(".partial")),
                key=lambda p: p.name,
            )
            if folder.is_dir()
            else []
        )
        if sets:
            newest = sets[-1]
            verify = None
            with contextlib.suppress(OSError, ValueError):
                verify = json.loads((newest / "VERIFY.json").read_text())
            when = None
            with contextlib.suppress(ValueError, IndexError):
                when = _dt.datetime.strptime(newest.name[:16], "%Y%m%dT%H%M%SZ").strftime(
                    "%Y-%m-%dT%H:%M:%SZ"
                )
            info["last"] = {
                "id": newest.name,
                "time": when,
                "verified": None if verify is None else bool(verify.get("ok")),
                "verified_at": (verify or {}).get("time") or (verify or {}).get("verified_at"),
                "count": len(sets),
            }
        out[env] = info
    return out


def deploys_info(state: StateDir, envs: list[str], limit: int = 8) -> list[dict]:
    rows = []
    for env in envs:
        rows += read_releases(state.root, env)
    rows.sort(key=lambda r: r.get("time", ""), reverse=True)
    return rows[:limit]


# --- the engine --------------------------------------------------------------------------
# Through the one engine client (host/engine.py): the docker CLI via a runner, no SDK (which
# cost ~18 MB of resident memory per run). Per run: one `docker info`, one `docker inspect`
# of every container, one `grep` of their cgroup counters (two when CPU is resampled).


@dataclass
class ContainerFacts:
    key: str
    container: str
    env: str | None
    state: str = "absent"
    health: str = "-"
    started: str = ""
    memory_used: int | None = None
    memory_limit: int | None = None
    cpu_limit: float | None = None
    cpu: tuple[float, int] | None = None  # (time, cumulative ns)
    id: str = ""


def read_usage(engine: Engine, facts: list[ContainerFacts]) -> None:
    """The running containers' memory (the one formula) and CPU counters, in place."""
    running = {f.container: f.id for f in facts if f.state == "running" and f.id}
    usage = engine.usage(running)
    now = time.time()
    for f in facts:
        u = usage.get(f.container)
        f.memory_used = u.memory_used if u else None
        f.cpu = (now, u.cpu_ns) if u and u.cpu_ns is not None else None


def containers(stack: Stack, engine: Engine) -> list[ContainerFacts]:
    wanted = {
        item.container: ContainerFacts(
            service_key(item), item.container, item.name if isinstance(item, Environment) else None
        )
        for item in stack.containers()
    }
    for name, c in engine.inspect(list(wanted)).items():
        facts = wanted.get(name)
        if facts is None:
            continue
        facts.id, facts.state, facts.health, facts.started = c.id, c.state, c.health, c.started_at
        facts.memory_limit, facts.cpu_limit = c.memory_limit, c.cpu_limit
    found = list(wanted.values())
    read_usage(engine, found)
    return found


def exec_in(engine: Engine, container: str, argv: list[str]) -> str:
    """Run argv inside a container (bounded by `timeout`), return stdout; OpsError if it fails."""
    result = engine.exec(container, argv, EXEC_TIMEOUT_S)
    if not result.ok:
        why = (result.stderr or result.stdout or "").strip().splitlines()
        raise OpsError(f"{argv[0]} in {container} failed ({result.code}): {why[-1] if why else ''}")
    return result.stdout


def probe(domain: str, path: str, port: int, expect_env: str | None) -> tuple[str, str]:
    """GET https://domain/path through nginx on 127.0.0.1 → (state, detail)."""
    started = time.monotonic()
    try:
        status, _, body = https_get(
            domain,
            path,
            port=port,
            timeout=PROBE_TIMEOUT_S,
            extra_headers={"User-Agent": m.MONITOR_USER_AGENT},
        )
    except OSError as exc:  # TimeoutError included
        return CRIT, f"no answer: {exc.__class__.__name__}"
    ms = round((time.monotonic() - started) * 1000)
    if status != 200:
        detail = f"HTTP {status} in {ms} ms"
        with contextlib.suppress(ValueError, AttributeError):
            data = json.loads(body)
            failing = [k for k, v in (data.get("checks") or {}).items() if not v.get("ok")]
            if failing:
                detail += f" ({', '.join(failing)} failing)"
        return CRIT, detail
    if expect_env:
        with contextlib.suppress(ValueError):
            data = json.loads(body)
            if data.get("environment") != expect_env:
                return CRIT, f"answered by {data.get('environment')!r}, not {expect_env}"
    return OK, f"HTTP 200 in {ms} ms"


# --- the access log ------------------------------------------------------------------------


def new_log_lines(path: Path, offset: dict | None, new_offset: dict) -> Iterator[str]:
    """Lines appended since `offset` ({inode, pos}), one at a time (memory stays flat
    whatever the traffic); `new_offset` is updated as they are consumed. A rotated or
    truncated log is read from its start; a half-written last line waits for next time."""
    try:
        st = path.stat()
    except OSError:
        new_offset.update(offset or {})
        return
    pos = 0
    if offset and offset.get("inode") == st.st_ino and offset.get("pos", 0) <= st.st_size:
        pos = offset["pos"]
    elif not offset:
        pos = max(0, st.st_size - MAX_LOG_READ)
    skip_first = bool(pos and not offset)  # started mid-line
    new_offset.update(inode=st.st_ino, pos=pos)
    with path.open("rb") as f:
        f.seek(pos)
        for raw in f:
            if not raw.endswith(b"\n"):
                break
            new_offset["pos"] += len(raw)
            if skip_first:
                skip_first = False
                continue
            yield raw.decode(errors="replace").rstrip("\n")


def read_new_log(path: Path, offset: dict | None) -> tuple[list[str], dict]:
    new_offset: dict = {}
    lines = list(new_log_lines(path, offset, new_offset))
    return lines, new_offset


# --- one run -----------------------------------------------------------------------------


@dataclass
class Collected:
    report: Report
    probes: dict[str, bool] = field(default_factory=dict)
    counters: dict = field(default_factory=dict)
    http_minutes: dict = field(default_factory=dict)
    log_offset: dict = field(default_factory=dict)


def _vhosts(stack: Stack) -> dict[str, str | None]:
    out: dict[str, str | None] = {e.domains[0]: e.name for e in stack.environments.values()}
    out[stack.status_domain] = "status"
    return out


def collect(
    stack: Stack,
    state: StateDir,
    store: Store | None,
    previous: dict | None = None,
    now: float | None = None,
    runner: Runner | None = None,
) -> Collected:
    """Every fact → checks. Reads the store (history) but writes nothing. `runner`: the
    engine's host (default this machine's)."""
    now = now or time.time()
    t = Thresholds.from_metrics(stack.monitoring.metrics)
    checks: list[Check] = []
    probes: dict[str, bool] = {}
    port = stack.local_host.published(443)
    vhosts = _vhosts(stack)

    # HTTPS probes run while the engine is read.
    pool = concurrent.futures.ThreadPoolExecutor(max_workers=4)
    probe_futures = {
        domain: pool.submit(probe, domain, "/health/" if env != "status" else "/", port,
                            env if env != "status" else None)
        for domain, env in vhosts.items()
    }  # fmt: skip

    # The engine (the document's `docker ps` check).
    client: Engine | None = None
    facts: list[ContainerFacts] = []
    docker_root = None
    try:
        reader = Engine(runner or LocalRunner(), timeout=stack.monitoring.docker_ps.timeout.seconds)
        reader.ping()
        client = reader  # it answers
        # The engine's data dir (for the disk check) hardly ever moves: `docker info` costs
        # twice `docker version`'s memory, so it is asked once and kept with the counters.
        docker_root = (previous or {}).get("docker_root")
        if not docker_root:
            with contextlib.suppress(OpsError):
                docker_root = reader.info().get("DockerRootDir")
        facts = containers(stack, client)
        present = sum(f.state == "running" for f in facts)
        state_ = OK if present == len(facts) else CRIT
        checks.append(
            Check("health", "docker", state_, detail=f"{present}/{len(facts)} containers running")
        )
    except Exception as exc:
        checks.append(Check("health", "docker", CRIT, detail=f"engine: {exc.__class__.__name__}"))
    probes["docker"] = checks[-1].state != CRIT

    for f in facts:
        s = m.container_health_state(f.state, f.health)
        detail = f.state if f.state != "running" else f"running, {f.health}"
        checks.append(Check("health", f.key, s, env=f.env, detail=detail))
        probes[f.key] = s != CRIT

    for domain, fut in probe_futures.items():
        s, detail = fut.result()
        checks.append(Check("health", domain, s, env=vhosts[domain], detail=f"https {detail}"))
        probes[domain] = s != CRIT
    pool.shutdown()

    # CPU: compare with the previous run's counters (about a minute ago), else resample.
    host_cpu = read_host_cpu()
    counters = {"time": now, "host": list(host_cpu), "containers": {}}
    prev = previous or {}
    fresh = prev.get("time") and now - prev["time"] <= 5 * stack.monitoring.interval.seconds
    prev_host = tuple(prev["host"]) if fresh and prev.get("host") else None
    prev_cont = {
        k: tuple(v[:2])
        for k, v in (prev.get("containers") or {}).items()
        if fresh and isinstance(v, list)
    }
    starts = (prev.get("starts") or {}) if fresh else {}
    need_resample = prev_host is None or any(
        f.cpu
        and (
            f.key not in prev_cont
            or starts.get(f.key) != f.started  # restarted: its counter began again
            or f.cpu[1] < prev_cont[f.key][1]
        )
        for f in facts
    )
    if need_resample:
        prev_host = host_cpu
        prev_cont = {f.key: f.cpu for f in facts if f.cpu}
        time.sleep(RESAMPLE_S)
        host_cpu = read_host_cpu()
        counters["host"] = list(host_cpu)
        if client is not None and facts:
            read_usage(client, facts)  # health was read above; only the counters again
    counters["containers"] = {f.key: list(f.cpu) for f in facts if f.cpu}
    counters["starts"] = {f.key: f.started for f in facts}
    if docker_root:
        counters["docker_root"] = docker_root
    counters["time"] = time.time()

    host_pct = m.cpu_percent_between(prev_host, host_cpu)
    checks.append(
        Check(
            "cpu_percent",
            "host",
            m.evaluate(host_pct, *t.cpu),
            host_pct,
            "%",
            *t.cpu,
            detail=f"{os.cpu_count()} CPUs, since the last run"
            if not need_resample
            else f"{os.cpu_count()} CPUs, {RESAMPLE_S:g} s sample",
        )
    )
    used, total = read_host_memory()
    checks.append(
        m.percent_check(
            "memory_percent",
            "host",
            used,
            total,
            t.memory,
            detail=f"{used / 1024**2:.0f} of {total / 1024**2:.0f} MB",
        )
    )
    paths = {"state dir": state.root}
    if docker_root:
        paths["docker"] = Path(docker_root)
    for mount, used_b, total_b, what in disk_usage(paths):
        checks.append(
            m.percent_check(
                "disk_percent",
                mount,
                used_b,
                total_b,
                t.disk,
                detail=f"{used_b / 1024**3:.1f} of {total_b / 1024**3:.1f} GB; {what}",
            )
        )

    for f in facts:
        pct = None
        if f.cpu and f.key in prev_cont and prev_cont[f.key]:
            pct = m.container_cpu_percent(prev_cont[f.key], f.cpu, f.cpu_limit)
        limit = f"of {f.cpu_limit:g} CPU" if f.cpu_limit else "of 1 CPU (no limit)"
        checks.append(
            Check(
                "cpu_percent",
                f.key,
                m.evaluate(pct, *t.cpu) if f.state == "running" else UNKNOWN,
                pct,
                "%",
                *t.cpu,
                env=f.env,
                detail=limit if f.state == "running" else f.state,
            )
        )
        mem_detail = (
            f"{(f.memory_used or 0) / 1024**2:.1f} of {(f.memory_limit or 0) / 1024**2:.0f} MB"
            if f.memory_used is not None and f.memory_limit
            else f.state
        )
        checks.append(
            m.percent_check(
                "memory_percent",
                f.key,
                f.memory_used,
                f.memory_limit,
                t.memory,
                env=f.env,
                detail=mem_detail,
            )
        )

    # PostgreSQL connections and Redis memory, inside their containers.
    pg, redis = stack.services.postgresql, stack.services.redis
    try:
        if client is None:
            raise OpsError("engine unavailable")
        rows = m.parse_psql_rows(
            exec_in(
                client,
                pg.container,
                ["psql", "-U", pg.settings.superuser, "-d", "postgres", "-tAc",
                 m.DB_CONNECTIONS_SQL],
            )
        )  # fmt: skip
        total_c, busy, per_db = m.db_connections(rows)
        parts = ", ".join(f"{k} {v}" for k, v in per_db.items() if k != "-") or "none"
        checks.append(
            Check(
                "db_connections",
                "postgresql",
                m.evaluate(total_c, *t.db_connections),
                total_c,
                "",
                *t.db_connections,
                detail=f"{busy} running a query; {parts}; max {pg.settings.max_connections}",
            )
        )
    except OpsError as exc:
        checks.append(Check("db_connections", "postgresql", UNKNOWN, None, "",
                            *t.db_connections, detail=str(exc)[:120]))  # fmt: skip
    try:
        if client is None:
            raise OpsError("engine unavailable")
        info = m.parse_redis_info(exec_in(client, redis.container, ["redis-cli", "INFO", "memory"]))
        mb = round(int(info["used_memory"]) / 1024**2, 1)
        checks.append(
            Check(
                "cache_memory",
                "redis",
                m.evaluate(mb, *t.cache_mb),
                mb,
                "MB",
                *t.cache_mb,
                detail=f"maxmemory {redis.settings.maxmemory}, {info.get('maxmemory_policy', '?')}",
            )
        )
    except (OpsError, KeyError, ValueError) as exc:
        checks.append(Check("cache_memory", "redis", UNKNOWN, None, "MB", *t.cache_mb,
                            detail=str(exc)[:120] or "no used_memory"))  # fmt: skip

    # HTTP: the access log since the last run, merged with stored minutes over the window.
    offset = store.get("access_log") if store else None
    new_offset: dict = {}
    minutes = m.aggregate(new_log_lines(access_log(state), offset, new_offset))
    stored = store.http(now - m.HTTP_WINDOW_S - 60) if store else []
    merged: dict[tuple[str, int], m.HttpStats] = {(v, mi): s for v, mi, s in stored}
    for k, s in minutes.items():
        merged[k] = merged[k].merge(s) if k in merged else s
    rows = [(v, mi, s) for (v, mi), s in merged.items()]
    start = (now - m.HTTP_WINDOW_S) // 60 * 60
    for vhost, env in vhosts.items():
        checks += m.http_checks(vhost, env, m.window(rows, vhost, start, now), t)

    checks += _archive_checks(stack, runner)  # pgBackRest archiving, when the stack has it
    checks += _files_checks(stack, state, now)  # the media off-site, same condition
    checks += _replication_checks(stack)  # Patroni's primary and each replica's lag

    # Availability over 24 h: the stored probes (summed in SQL) then this run's, which
    # ends the last stored one's interval and adds no downtime of its own yet.
    interval = stack.monitoring.interval.seconds
    window_s = m.AVAILABILITY_WINDOW_S
    down = store.downtime(now - window_s, now, interval) if store else {}
    for subject in probes:
        value = m.availability_percent(down.get(subject, (0, 0.0, now))[1], window_s)
        env = next((c.env for c in checks if c.metric == "health" and c.subject == subject), None)
        checks.append(m.availability_check(subject, env, value, t.availability_below))

    # Certificates.
    renew_days = stack.tls.acme.renew_before.seconds / 86400
    for metric, name, days, detail in certificates(state, now):
        checks.append(
            Check(
                metric,
                name,
                m.evaluate(days, renew_days, m.CERT_CRITICAL_DAYS, below=True),
                days,
                "days",
                renew_days,
                m.CERT_CRITICAL_DAYS,
                detail=detail,
                below=True,
            )
        )

    envs = list(stack.environments)
    info = {
        "stack": stack.project,
        "backups": backups_info(state, envs),
        "deploys": deploys_info(state, envs),
        "vhosts": vhosts,
    }
    return Collected(
        Report(now, m.sort_checks(checks), info), probes, counters, minutes, new_offset
    )


def peak_rss_kb() -> int:
    """Peak resident memory of this process and of the children it waited for (KB)."""
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    kids = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return max(own, kids)


def run_lock(state: StateDir, wait_s: float = RUN_LOCK_WAIT_S, runner: Runner | None = None):
    """One recording run at a time (a slow run must not overlap the next cron start): the
    one lock (host/lock.py), `monitor`, waited for up to `wait_s`, then LockHeld (an
    OpsError: `invoke monitor` exits UNKNOWN saying who holds it)."""
    return locks.holding(
        runner or LocalRunner(), str(state.root), RUN_LOCK, action="monitor run", wait=wait_s
    )


def publish(directory: Path, page: dict, runner: Runner | None = None) -> Path:
    """Write index.html and status.json atomically (the one atomic write, through the
    runner), world-readable: nginx reads them as UID 10001."""
    writer = runner or LocalRunner()
    for name, text in statuspage.page_files(page).items():
        writer.write_file(str(directory / name), text, mode=0o644)
    return directory / "index.html"


def run_once(stack: Stack, state: StateDir, page_url: str | None = None) -> tuple[Report, dict]:
    """Collect, record history, publish the status page, send alerts. Returns the report
    and what happened (alerts sent, page path, store size)."""
    from aiia_ops.host.notify import notify

    started = time.monotonic()
    with run_lock(state), Store(store_path(state)) as store:
        collected = collect(stack, state, store, store.get("cpu"))
        report = collected.report
        now = report.time
        store.begin()
        store.add_probes(now, collected.probes)
        store.add_http(collected.http_minutes)
        store.put("access_log", collected.log_offset)
        store.put("cpu", collected.counters)
        events, memory = m.decide_alerts(report.checks, store.alert_memory(), now)
        store.save_alert_memory(memory)
        store.prune(now)
        store.commit()
        store.vacuum()

        outcome: dict = {"alerts": [e.key for e in events], "alert_result": None}
        if events:
            url = page_url or f"https://{stack.status_domain}/"
            text = m.alert_message(events, report.state, socket.gethostname(), url)
            outcome["alert_result"] = notify(text, state.root)

        duration_ms = round((time.monotonic() - started) * 1000)
        rss = peak_rss_kb()
        report.info["run"] = {"duration_ms": duration_ms, "peak_rss_kb": rss}
        page = statuspage.build_page_data(stack, report, store, now)
        outcome["page"] = str(publish(status_dir(state), page))
        duration_ms = round((time.monotonic() - started) * 1000)
        report.info["run"] = {"duration_ms": duration_ms, "peak_rss_kb": peak_rss_kb()}
        store.add_run(now, report.state, duration_ms, report.info["run"]["peak_rss_kb"])
        outcome["store_bytes"] = store.size()
    return report, outcome


__all__ = ["CRIT", "OK", "UNKNOWN", "WARN", "collect", "run_once"]


def _files_checks(stack: Stack, state: StateDir, now: float) -> list[Check]:

    from aiia_ops.commands import offsite_files, pgbackrest

    policy = pgbackrest.pitr_of(stack)
    if policy is None:
        return []
    path = state.root / offsite_files.STATUS_FILE
    try:
        record = json.loads(path.read_text()) if path.exists() else None
    except (OSError, ValueError):
        record = None
    return [m.files_copy_check(record, now, policy)]


def _archive_checks(stack: Stack, runner: Runner | None) -> list[Check]:
    from aiia_ops.commands import pgbackrest
    from aiia_ops.flows import pitr

    policy = pgbackrest.pitr_of(stack)
    if policy is None:
        return []
    try:
        return m.archive_checks(pitr.status(stack, runner or LocalRunner()), policy)
    except OpsError as exc:
        return [Check("archive_lag", "postgresql", UNKNOWN, None, "s", detail=str(exc)[:120])]


def _replication_checks(stack: Stack) -> list[Check]:
    """The current primary and each replica's lag, when the stack has replication.hosts."""
    from aiia_ops.flows import patroni

    r = stack.replication
    if not r.hosts:
        return []
    try:
        states, lag = patroni.replication(stack)
    except OpsError as exc:
        return [Check("db_primary", m.REPLICATION_SUBJECT, UNKNOWN, detail=str(exc)[:120])]
    return m.replication_checks(list(r.hosts), states, lag, r.replica_max_lag.bytes / 2**20)
