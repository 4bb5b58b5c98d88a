"""The monitor's pure core: facts in, states out. No engine, no network, no files.

Everything here is data → data so it is tested as data (tests/unit/test_monitor.py):

- `evaluate()`: a value against a warning/critical pair → OK / WARN / CRIT / UNKNOWN;
- parsers of the facts the collector gathers (/proc/stat, /proc/meminfo, Docker stats,
  `redis-cli INFO memory`, psql output, `openssl x509 -enddate`);
- the nginx access log → per virtual host request counts, 5xx counts and a latency
  histogram per minute, merged over a window into an error rate and a p95;
- availability from the probe history;
- alert decisions with rate limiting, as a function of the previous alert memory;
- the overall state and its Nagios exit code.

States are compared with `>=`: a value *at* the warning threshold is WARN (the document's
"Warning 60 %"). Availability is the exception the document writes: CRIT *below* 99.9 %.
"""

from __future__ import annotations

import datetime as _dt
import json
import math
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field

from aiia_ops.commands import accesslog
from aiia_ops.commands.accesslog import AccessLine
from aiia_ops.commands.engine import memory_used
from aiia_ops.model import Metrics

OK, WARN, CRIT, UNKNOWN = "OK", "WARN", "CRIT", "UNKNOWN"
STATES = (OK, WARN, CRIT, UNKNOWN)
# Nagios plugin exit codes.
EXIT_CODES = {OK: 0, WARN: 1, CRIT: 2, UNKNOWN: 3}
# Which state wins when several are combined: a known problem outranks an unknown one
# (CRIT > WARN > UNKNOWN > OK), so one unreadable metric never hides a real alarm.
_RANK = {OK: 0, UNKNOWN: 1, WARN: 2, CRIT: 3}

# The monitor's own HTTPS probes carry this User-Agent; they are excluded from the error
# rate and latency (their failures already count in health and availability, and a probe
# answered 503 while Redis was down must not keep the error rate red after it is back).
MONITOR_USER_AGENT = "aiia-monitor/1"

# Window of the access log over which the error rate and p95 are computed.
HTTP_WINDOW_S = 300
# Window of the availability metric (the status page also shows 7 days).
AVAILABILITY_WINDOW_S = 24 * 3600
# Certificates: WARN once fewer days are left than the renewal point (certbot should
# already have renewed), CRIT under a week. Not in the document's table; see
# docs/monitoring.md.
CERT_CRITICAL_DAYS = 7

LABELS = {
    "health": "health",
    "availability": "availability",
    "cpu_percent": "CPU",
    "memory_percent": "memory",
    "disk_percent": "disk",
    "db_connections": "db connections",
    "cache_memory": "cache memory",
    "http_error_percent": "HTTP errors",
    "http_latency_p95": "HTTP p95",
    "cert_days": "certificate",
    "archive_lag": "WAL archive lag",
    "base_backup_age": "base backup age",
    "repository": "off-site repository",
    "offsite_files_age": "last off-site media copy",
    "db_primary": "database primary",
    "replication_lag": "replication lag",
}
ORDER = list(LABELS)


def worst(states: Iterable[str]) -> str:
    return max(states, key=lambda s: _RANK[s], default=OK)


def exit_code(state: str) -> int:
    return EXIT_CODES[state]


def evaluate(
    value: float | None, warning: float | None, critical: float | None, below: bool = False
) -> str:
    """`below`: thresholds are lower bounds (days left): WARN under warning, CRIT under critical."""
    if value is None:
        return UNKNOWN
    if below:
        if critical is not None and value < critical:
            return CRIT
        if warning is not None and value < warning:
            return WARN
        return OK
    if critical is not None and value >= critical:
        return CRIT
    if warning is not None and value >= warning:
        return WARN
    return OK


@dataclass
class Check:
    """One line of the monitor's answer."""

    metric: str  # a key of LABELS
    subject: str  # host, redis, django_prod, eduaiia.com, /
    state: str
    value: float | None = None
    unit: str = ""
    warning: float | None = None
    critical: float | None = None
    env: str | None = None
    detail: str = ""
    below: bool = False  # thresholds are lower bounds

    @property
    def key(self) -> str:
        return f"{self.metric}:{self.subject}"

    @property
    def label(self) -> str:
        return LABELS.get(self.metric, self.metric)

    def value_text(self) -> str:
        if self.value is None:
            return "-"
        return f"{_num(self.value)}{_unit_sep(self.unit)}{self.unit}"

    def threshold_text(self) -> str:
        if self.warning is None and self.critical is None:
            return ""
        sep = _unit_sep(self.unit)
        if self.below:
            parts = []
            if self.warning is not None:
                parts.append(f"warn <{_num(self.warning)}{sep}{self.unit}")
            parts.append(f"crit <{_num(self.critical)}{sep}{self.unit}")
            return ", ".join(parts)
        w = "-" if self.warning is None else _num(self.warning)
        return f"{w} / {_num(self.critical)}{sep}{self.unit}"

    def to_json(self) -> dict:
        out = asdict(self)
        out["key"] = self.key
        out["label"] = self.label
        out["threshold"] = self.threshold_text()
        out["value_text"] = self.value_text()
        return out


def _num(v: float) -> str:
    if float(v).is_integer():
        return str(int(v))
    if 99 <= abs(v) < 100:  # availability: 99.93, 99.9
        return f"{v:.3f}".rstrip("0").rstrip(".")
    return f"{v:.1f}"


def _unit_sep(unit: str) -> str:
    return "" if unit in ("%", "") else " "


def sort_checks(checks: list[Check]) -> list[Check]:
    return sorted(checks, key=lambda c: ORDER.index(c.metric) if c.metric in ORDER else 99)


# --- thresholds from the model ------------------------------------------------------------


@dataclass(frozen=True)
class Thresholds:
    """The document's table in plain numbers (%, count, MB, ms), from stack.monitoring."""

    cpu: tuple[float, float]
    memory: tuple[float, float]
    disk: tuple[float, float]
    db_connections: tuple[float, float]
    cache_mb: tuple[float, float]
    error_percent: tuple[float, float]
    p95_ms: tuple[float, float]
    availability_below: float

    @classmethod
    def from_metrics(cls, m: Metrics) -> Thresholds:
        return cls(
            cpu=(m.cpu_percent.warning, m.cpu_percent.critical),
            memory=(m.memory_percent.warning, m.memory_percent.critical),
            disk=(m.disk_percent.warning, m.disk_percent.critical),
            db_connections=(m.db_connections.warning, m.db_connections.critical),
            cache_mb=(m.cache_memory.warning.mb, m.cache_memory.critical.mb),
            error_percent=(m.http_error_percent.warning, m.http_error_percent.critical),
            p95_ms=(m.http_latency_p95.warning.ms, m.http_latency_p95.critical.ms),
            availability_below=m.availability.critical_below,
        )


def schedule(m: Metrics) -> dict[str, float]:
    """How often each metric is collected (seconds), as the document's table says."""
    return {
        "cpu_percent": m.cpu_percent.every.seconds,
        "memory_percent": m.memory_percent.every.seconds,
        "disk_percent": m.disk_percent.every.seconds,
        "db_connections": m.db_connections.every.seconds,
        "cache_memory": m.cache_memory.every.seconds,
        "http_error_percent": m.http_error_percent.every.seconds,
        "http_latency_p95": m.http_latency_p95.every.seconds,
        "availability": m.availability.every.seconds,
    }


def percent_check(
    metric: str, subject: str, used: float | None, total: float | None, pair, **kw
) -> Check:
    value = None if used is None or not total else round(100.0 * used / total, 1)
    return Check(metric, subject, evaluate(value, *pair), value, "%", *pair, **kw)


# --- parsers of facts --------------------------------------------------------------------


def parse_proc_stat(text: str) -> tuple[int, int]:
    """/proc/stat → (busy, total) jiffies of all CPUs together (idle and iowait are not busy)."""
    for line in text.splitlines():
        if line.startswith("cpu "):
            values = [int(v) for v in line.split()[1:]]
            # user nice system idle iowait irq softirq steal (guest* are inside user/nice)
            total = sum(values[:8])
            idle = values[3] + (values[4] if len(values) > 4 else 0)
            return total - idle, total
    raise ValueError("no aggregate 'cpu' line in /proc/stat")


def cpu_percent_between(prev: tuple[int, int] | None, cur: tuple[int, int]) -> float | None:
    if prev is None:
        return None
    busy, total = cur[0] - prev[0], cur[1] - prev[1]
    if total <= 0 or busy < 0:
        return None
    return round(100.0 * busy / total, 1)


def parse_meminfo(text: str) -> tuple[int, int]:
    """/proc/meminfo → (used, total) bytes; used = MemTotal - MemAvailable (as `free`)."""
    values = {}
    for line in text.splitlines():
        name, _, rest = line.partition(":")
        parts = rest.split()
        if parts:
            values[name] = int(parts[0]) * 1024
    total = values["MemTotal"]
    return total - values.get("MemAvailable", values.get("MemFree", 0)), total


def container_memory_used(stats: dict) -> int | None:
    """Docker stats → bytes used, like `docker stats`: reclaimable page cache not counted."""
    mem = stats.get("memory_stats") or {}
    extra = mem.get("stats") or {}
    return memory_used(
        mem.get("usage"), extra.get("total_inactive_file", extra.get("inactive_file"))
    )


def container_cpu_ns(stats: dict) -> int | None:
    """Docker stats → the container's cumulative CPU time (ns)."""
    usage = ((stats.get("cpu_stats") or {}).get("cpu_usage") or {}).get("total_usage")
    return int(usage) if usage is not None else None


def container_cpu_percent(
    prev: tuple[float, int] | None, cur: tuple[float, int], cpu_limit: float | None
) -> float | None:
    """(time s, cpu ns) samples → % of the container's own CPU limit (1.0 = one core)."""
    if prev is None:
        return None
    seconds, used = cur[0] - prev[0], cur[1] - prev[1]
    if seconds <= 0 or used < 0:
        return None  # restarted in between: its counter began again
    cores = cpu_limit or 1.0
    return round(100.0 * used / 1e9 / seconds / cores, 1)


def parse_redis_info(text: str) -> dict[str, str]:
    out = {}
    for line in text.splitlines():
        if ":" in line and not line.startswith("#"):
            k, v = line.strip().split(":", 1)
            out[k] = v
    return out


def parse_psql_rows(text: str) -> list[list[str]]:
    """`psql -tA` output: one row per line, fields separated by '|'."""
    return [line.split("|") for line in text.strip().splitlines() if line.strip()]


# "Active connections": every client backend, busy or idle, because each holds one of
# max_connections (50) and the thresholds (40/48) are about running out of them. The
# count of those running a query right now is reported beside it. The monitor's own
# connection is excluded.
DB_CONNECTIONS_SQL = (
    "select coalesce(datname, '-'), count(*), count(*) filter (where state = 'active') "
    "from pg_stat_activity where backend_type = 'client backend' "
    "and pid <> pg_backend_pid() group by 1 order by 1"
)


def db_connections(rows: list[list[str]]) -> tuple[int, int, dict[str, int]]:
    """Rows of DB_CONNECTIONS_SQL → (connections, running a query, per database)."""
    per_db = {r[0]: int(r[1]) for r in rows}
    return sum(per_db.values()), sum(int(r[2]) for r in rows), per_db


def openssl_enddate(pem: str) -> list[str]:
    return ["openssl", "x509", "-enddate", "-noout", "-in", pem]


def parse_enddate(text: str) -> _dt.datetime:
    """`openssl x509 -enddate -noout` → 'notAfter=Feb 24 14:17:02 2027 GMT' → aware UTC."""
    value = text.strip().split("=", 1)[-1]
    parsed = _dt.datetime.strptime(" ".join(value.split()), "%b %d %H:%M:%S %Y %Z")
    return parsed.replace(tzinfo=_dt.UTC)


def days_left(not_after: _dt.datetime, now: float) -> float:
    return round((not_after.timestamp() - now) / 86400, 1)


# --- the access log ------------------------------------------------------------------------

# Latency histogram edges (ms). Bucket i holds EDGES[i-1] <= t < EDGES[i] (the first from 0,
# the last up to infinity). The thresholds (500 ms, 2000 ms) are edges, so the state drawn
# from a histogram is exact; the value inside a bucket is interpolated.
LATENCY_EDGES_MS = (
    1, 2, 3, 5, 7, 10, 15, 20, 30, 40, 50, 75, 100, 150, 200, 300, 400, 500,
    750, 1000, 1500, 2000, 3000, 5000, 10000, 30000, 60000,
)  # fmt: skip
NBUCKETS = len(LATENCY_EDGES_MS) + 1


def bucket_of(ms: float) -> int:
    for i, edge in enumerate(LATENCY_EDGES_MS):
        if ms < edge:
            return i
    return len(LATENCY_EDGES_MS)


@dataclass
class HttpStats:
    """Requests of one virtual host in some period: counts and a latency histogram."""

    requests: int = 0
    errors: int = 0  # status >= 500
    hist: list[int] = field(default_factory=lambda: [0] * NBUCKETS)

    def add(self, status: int, ms: float) -> None:
        self.requests += 1
        if status >= 500:
            self.errors += 1
        self.hist[bucket_of(ms)] += 1

    def merge(self, other: HttpStats) -> HttpStats:
        return HttpStats(
            self.requests + other.requests,
            self.errors + other.errors,
            [a + b for a, b in zip(self.hist, other.hist, strict=True)],
        )

    @property
    def error_percent(self) -> float | None:
        return round(100.0 * self.errors / self.requests, 2) if self.requests else None

    def percentile(self, q: float = 0.95) -> float | None:
        return percentile(self.hist, q)

    def to_json(self) -> str:
        return json.dumps(self.hist, separators=(",", ":"))


def percentile(hist: list[int], q: float) -> float | None:
    """Nearest-rank percentile from the histogram, interpolated inside its bucket (ms)."""
    n = sum(hist)
    if n == 0:
        return None
    rank = max(1, math.ceil(q * n))
    seen = 0
    for i, count in enumerate(hist):
        if count and seen + count >= rank:
            lo = 0 if i == 0 else LATENCY_EDGES_MS[i - 1]
            if i == len(LATENCY_EDGES_MS):
                return float(lo)
            hi = LATENCY_EDGES_MS[i]
            return round(lo + (hi - lo) * (rank - seen - 0.5) / count, 1)
        seen += count
    return None  # pragma: no cover


def counted(line: AccessLine) -> bool:
    """Site traffic the monitor counts: not the catch-all servers (vhost "_", scanners),
    not a line without a status, not the monitor's own probes."""
    return (
        bool(line.vhost)
        and line.vhost != "_"
        and line.status != 0
        and not line.user_agent.startswith(MONITOR_USER_AGENT)
    )


def aggregate(lines: Iterable[str]) -> dict[tuple[str, int], HttpStats]:
    """Access log lines → {(vhost, minute): HttpStats}. Streams: memory is per minute."""
    out: dict[tuple[str, int], HttpStats] = {}
    for line in accesslog.parse_lines(lines):
        if counted(line):
            out.setdefault((line.vhost, line.minute), HttpStats()).add(
                line.status, line.request_time_ms
            )
    return out


def window(
    minutes: Iterable[tuple[str, int, HttpStats]], vhost: str, start: float, end: float
) -> HttpStats:
    total = HttpStats()
    for v, minute, stats in minutes:
        if v == vhost and start <= minute <= end:
            total = total.merge(stats)
    return total


def http_checks(
    vhost: str, env: str | None, stats: HttpStats, t: Thresholds, window_s: int = HTTP_WINDOW_S
) -> list[Check]:
    """Error rate and p95 of one vhost. No requests in the window: 0 % and OK, not UNKNOWN
    (a quiet site is not a problem), with the request count in the detail."""
    span = f"{stats.requests} requests in {window_s // 60} min"
    err = stats.error_percent
    err_value = 0.0 if err is None else err
    p95 = stats.percentile(0.95)
    return [
        Check(
            "http_error_percent",
            vhost,
            evaluate(err_value, *t.error_percent),
            err_value,
            "%",
            *t.error_percent,
            env=env,
            detail=f"{stats.errors} of {span}",
        ),
        Check(
            "http_latency_p95",
            vhost,
            OK if p95 is None else evaluate(p95, *t.p95_ms),
            p95,
            "ms",
            *t.p95_ms,
            env=env,
            detail=span if p95 is not None else f"no requests in {window_s // 60} min",
        ),
    ]


# --- health and availability -----------------------------------------------------------


def container_health_state(state: str, health: str) -> str:
    """Docker's view → our state: running+healthy OK; starting WARN; anything else CRIT."""
    if state != "running":
        return CRIT
    return {"healthy": OK, "none": OK, "starting": WARN}.get(health, CRIT)


def availability(
    probes: list[tuple[float, bool]], now: float, window_s: float, interval_s: float
) -> float | None:
    """Percentage of the window the target was up, from probe results (time, ok) in order.

    A failed probe counts as down until the next probe, at most one interval: beyond
    that the monitor did not look. Unobserved time (before the monitor was installed, or
    while it did not run) is not counted as downtime: a self-hosted monitor cannot know.
    So one failed minute in 24 h is 99.93 %, two are 99.86 % (CRIT under 99.9 %).
    """
    start = now - window_s
    probes = [p for p in probes if p[0] >= start]
    if not probes:
        return None
    down = 0.0
    for i, (ts, ok) in enumerate(probes):
        if ok:
            continue
        nxt = probes[i + 1][0] if i + 1 < len(probes) else now
        down += min(interval_s, max(0.0, nxt - ts))
    return availability_percent(down, window_s)


def availability_percent(down_s: float, window_s: float) -> float:
    return round(100.0 * (1 - down_s / window_s), 3)


def availability_check(subject: str, env: str | None, value: float | None, below: float) -> Check:
    state = OK if value is None else evaluate(value, None, below, below=True)
    return Check(
        "availability",
        subject,
        state,
        value,
        "%",
        None,
        below,
        env=env,
        detail="24 h" if value is not None else "no probes yet",
        below=True,
    )


# --- alerts ------------------------------------------------------------------------------

ALERT_LIMIT = 3  # messages about one check ...
ALERT_PERIOD_S = 3600  # ... per hour; changes beyond that wait and are summarised


@dataclass
class AlertMemory:
    """What Slack was last told about one check, and when."""

    notified: str = OK
    sent: list[float] = field(default_factory=list)
    held: int = 0  # changes not sent because of the rate limit


@dataclass
class AlertEvent:
    key: str
    label: str
    subject: str
    old: str
    new: str
    value: str
    threshold: str
    detail: str
    held: int = 0

    @property
    def recovery(self) -> bool:
        return self.new == OK


def decide_alerts(
    checks: list[Check],
    memory: dict[str, AlertMemory],
    now: float,
    limit: int = ALERT_LIMIT,
    period_s: float = ALERT_PERIOD_S,
) -> tuple[list[AlertEvent], dict[str, AlertMemory]]:
    """Which changes to announce, and the new memory. Pure.

    - A check moving to WARN or CRIT (from what Slack was last told), or back to OK after
      a WARN/CRIT was announced, is an event. UNKNOWN announces nothing and is forgotten
      only once a real state returns.
    - Rate limit per check: at most `limit` messages per `period_s`. A flapping check
      past that is held: nothing is sent, the count of held changes grows, and the next
      message about it (once its budget frees) says how many were held.
    - The caller sends all events of one run as a single message.
    """
    events: list[AlertEvent] = []
    new_memory = {k: AlertMemory(m.notified, list(m.sent), m.held) for k, m in memory.items()}
    for c in checks:
        mem = new_memory.setdefault(c.key, AlertMemory())
        mem.sent = [t for t in mem.sent if now - t < period_s]
        if c.state == UNKNOWN or c.state == mem.notified:
            continue
        if len(mem.sent) >= limit:
            mem.held += 1
            continue
        events.append(
            AlertEvent(
                c.key,
                c.label,
                c.subject,
                mem.notified,
                c.state,
                c.value_text(),
                c.threshold_text(),
                c.detail,
                mem.held,
            )
        )
        mem.notified, mem.held = c.state, 0
        mem.sent.append(now)
    return events, new_memory


_ICON = {CRIT: ":red_circle:", WARN: ":large_yellow_circle:", OK: ":large_green_circle:"}


def alert_message(events: list[AlertEvent], overall: str, where: str, page_url: str) -> str:
    """One Slack message for the events of one run: problems first, then recoveries."""
    lines = [f"*AI-IA monitor* on {where}: overall *{overall}*"]
    for e in sorted(events, key=lambda e: (e.recovery, -_RANK[e.new], e.key)):
        what = "recovered" if e.recovery else f"{e.old} → {e.new}"
        value = f" {e.value}" if e.value != "-" else ""
        limit = f" (threshold {e.threshold})" if e.threshold and not e.recovery else ""
        detail = f": {e.detail}" if e.detail and not e.recovery else ""
        held = f" [{e.held} more changes held back: flapping]" if e.held else ""
        lines.append(f"{_ICON[e.new]} {e.label} {e.subject} {what}{value}{limit}{detail}{held}")
    lines.append(page_url)
    return "\n".join(lines)


# --- the answer ------------------------------------------------------------------------


@dataclass
class Report:
    time: float
    checks: list[Check]
    info: dict = field(default_factory=dict)

    @property
    def state(self) -> str:
        return worst(c.state for c in self.checks)

    @property
    def exit_code(self) -> int:
        return exit_code(self.state)

    def problems(self) -> list[Check]:
        return [c for c in self.checks if c.state != OK]

    def summary(self) -> str:
        bad = sorted(self.problems(), key=lambda c: -_RANK[c.state])
        if not bad:
            return f"OK: {len(self.checks)} checks"
        names = ", ".join(f"{c.label} {c.subject} {c.state}" for c in bad[:6])
        more = f" (+{len(bad) - 6} more)" if len(bad) > 6 else ""
        return f"{self.state}: {names}{more}"

    def to_json(self) -> dict:
        return {
            "time": _dt.datetime.fromtimestamp(self.time, _dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
            "state": self.state,
            "exit_code": self.exit_code,
            "summary": self.summary(),
            "checks": [c.to_json() for c in self.checks],
            "info": self.info,
        }


def table_rows(checks: list[Check]) -> list[list[str]]:
    return [
        [c.label, c.subject, c.env or "", c.state, c.value_text(), c.threshold_text(), c.detail]
        for c in sort_checks(checks)
    ]


TABLE_HEADERS = ["check", "subject", "env", "state", "value", "warn / crit", "detail"]


def archive_checks(facts: dict, pitr) -> list[Check]:
    """Continuous archiving (flows/pitr.status facts; `pitr`: the stack's backups.pitr):
    how long the oldest finished WAL segment has waited for the repository (0 when none
    waits), age of the newest base backup, and whether the repository answers at all. A
    stopped archive is CRITICAL after lag_critical; never archived is CRITICAL at once; an
    unreachable repository is CRITICAL at once (the status page's repo1 card shows the
    last two)."""
    lag, age = facts.get("archive_lag_s"), facts.get("backup_age_s")
    w, c = pitr.lag_warning.seconds, pitr.lag_critical.seconds
    failed = facts.get("archive_failed") or 0
    waiting = facts.get("waiting_segments") or 0
    last = facts.get("last_archived_wal") or "none"
    detail = f"{waiting} waiting; last {last}; {failed} failed pushes"
    lag_state = CRIT if lag is None else evaluate(lag, w, c)
    bw, bc = pitr.backup_age_warning.seconds, pitr.backup_age_critical.seconds
    age_state = CRIT if age is None else evaluate(age, bw, bc)
    age_detail = str(facts.get("status") or "")[:120] if age is None else "repo1"
    return [
        Check("archive_lag", "postgresql", lag_state, lag, "s", w, c, detail=detail),
        Check("base_backup_age", "repo1", age_state, age, "s", bw, bc, detail=age_detail),
        Check(
            "repository",
            "repo1",
            OK if facts.get("reachable") else CRIT,
            detail=str(facts.get("repository") if facts.get("reachable") else facts.get("status"))[
                :120
            ],
        ),
    ]


def files_copy_check(record: dict | None, now: float, pitr) -> Check:
    """Age of the last off-site copy of the media and configuration set (the record
    `invoke backup.media` writes); never copied is CRITICAL at once."""
    w, c = pitr.files_age_warning.seconds, pitr.files_age_critical.seconds
    if not record or not record.get("time"):
        return Check("offsite_files_age", "restic", CRIT, None, "s", w, c, detail="never copied")
    from datetime import datetime

    age = max(0.0, now - datetime.fromisoformat(record["time"]).timestamp())
    detail = f"snapshot {record.get('snapshot', '?')}, {record.get('files', 0)} files"
    return Check("offsite_files_age", "restic", evaluate(age, w, c), age, "s", w, c, detail=detail)


REPLICATION_SUBJECT = "patroni"  # the primary's line; each replica's: "patroni/<member>"


def replication_checks(
    members: list[str], states: list, lag: dict[str, tuple[str, float | None, float | None]],
    replica_max_lag_mb: float,
) -> list[Check]:  # fmt: skip
    """Level 4's replicated PostgreSQL (docs/patroni.md). `members`: replication.hosts;
    `states`: Patroni's view (commands/patroni.MemberState); `lag`: the primary's own
    pg_stat_replication per member (state, bytes behind, replay lag in ms).
    - the primary: OK with one running leader, CRIT with none (writes fail);
    - each other member: its replay lag in MB, WARN at half of replica_max_lag, CRIT at it
      (HAProxy no longer sends it reads; with maximum_lag_on_failover equal, Patroni would
      not promote it); CRIT when it does not stream from the primary at all (one loss
      more and there is no failover)."""
    leaders = [s for s in states if s.role == "Leader" and s.state == "running"]
    lead = leaders[0] if len(leaders) == 1 else None
    seen = {s.name: s for s in states}
    if lead is None:
        shown = ", ".join(f"{s.name} {s.role} {s.state}" for s in states) or "no member answers"
        primary = Check("db_primary", REPLICATION_SUBJECT, CRIT, detail=f"no primary: {shown}")
    else:
        primary = Check("db_primary", REPLICATION_SUBJECT, OK, lead.timeline, "",
                        detail=f"{lead.name} ({lead.host}), timeline {lead.timeline}; "
                        f"{len(seen)} of {len(members)} members answer")  # fmt: skip
    out = [primary]
    w, c = replica_max_lag_mb / 2, replica_max_lag_mb
    for name in members:
        if lead is not None and name == lead.name:
            continue
        subject = f"{REPLICATION_SUBJECT}/{name}"
        member, row = seen.get(name), lag.get(name)
        if member is None or member.state != "streaming" or row is None or row[1] is None:
            what = "not in the cluster" if member is None else f"{member.role} {member.state}"
            if member is not None and member.state == "streaming" and lead is not None:
                what = "streaming, but not in the primary's pg_stat_replication"
            out.append(Check("replication_lag", subject, CRIT, None, "MB", w, c, detail=what))
            continue
        mb = round(row[1] / 2**20, 3)
        ms = "" if row[2] is None else f", replay {row[2]:.0f} ms"
        out.append(Check("replication_lag", subject, evaluate(mb, w, c), mb, "MB", w, c,
                         detail=f"{row[0]}{ms}, timeline {member.timeline}"))  # fmt: skip
    return out
