"""Load tests as data: scenarios, the wrk command and its Lua script, parsers, the report.

Nothing here runs a process or opens a socket; `flows/loadtest.py` does, and passes what it
saw (wrk's output, the engine's counters, nginx's access log lines) back in here.

The load tool is wrk (Debian's `wrk`, C + LuaJIT, epoll): on a 2-core machine the load
generator's own CPU is taken from the stack under test, and wrk costs a few percent of a
core where a Python generator (locust) would take most of one. The Lua script builds every
request (a weighted mix, unique slugs for writes) and prints one JSON line at the end.

A "user" is one keep-alive HTTPS connection sending requests back to back (no think time),
a harsher model than people browsing.

Every connection goes to 127.0.0.1: the script replaces wrk's name resolution, so the
URL's host name (eduaiia.com) only sets TLS SNI and the Host header and is never looked
up. The flow proves that first with a probe whose host name cannot resolve (.invalid).
"""

from __future__ import annotations

import json
import math
import re
from collections import defaultdict
from dataclasses import asdict, dataclass, field
from datetime import datetime

from aiia_ops.commands.accesslog import AccessLine
from aiia_ops.commands.charts import Chart, Series, document, panel
from aiia_ops.commands.compose import CONFIG_MOUNT, config_dir_name
from aiia_ops.commands.engine import Container
from aiia_ops.commands.engine import Usage as Counters
from aiia_ops.commands.hardening import run_flags

# --- scenarios -----------------------------------------------------------------------

# Request kinds the Lua script knows how to build.
KINDS = ("health", "list", "detail", "write", "static", "ceiling_static", "bare")

# Where the "static" kinds point (files `collectstatic` puts in every environment's
# storage; the originals are kept beside the hashed names).
STATIC_FILES = (
    "/static/admin/css/base.css",  # 22 KB, its .gz (~5 KB) from collectstatic (gzip_static)
    "/static/admin/js/core.js",  # 6 KB, gzipped
    "/static/admin/img/icon-yes.svg",  # 436 B
)
SMALL_STATIC_FILE = "/static/admin/img/icon-yes.svg"
LIST_PAGES = (1, 2, 3)  # page_size 20: the first three pages of the course list
SEED_COURSES = 60  # detail reads pick from these; 3 full pages for the list reads
SEED_PREFIX = "loadtest-seed-"


@dataclass(frozen=True)
class Mix:
    kind: str
    weight: int  # percent of the requests
    why: str


@dataclass(frozen=True)
class Scenario:
    name: str
    description: str
    mix: tuple[Mix, ...]
    # A ceiling runs against its own virtual host (the bare app) or a file only nginx serves.
    vhost: str = "app"  # "app" (the environment's domain) or "bare"
    # Reads carry a bearer token, which nginx never answers from its edge cache: every
    # request reaches the app (what Django itself can do, for the ratio to bare gunicorn).
    bypass_edge_cache: bool = False

    @property
    def writes(self) -> bool:
        return any(m.kind == "write" for m in self.mix)

    @property
    def app_share(self) -> float:
        """The fraction of requests that reach the app (not nginx alone)."""
        app = sum(m.weight for m in self.mix if m.kind in ("health", "list", "detail", "write"))
        return app / sum(m.weight for m in self.mix)


MIXED = (
    Mix("list", 42, "course list pages 1-3 (Redis-cached JSON; misses after writes)"),
    Mix("detail", 25, "one course with its lessons (Redis-cached JSON per course)"),
    Mix("static", 30, "CSS/JS/SVG a first visit fetches (later visits: 30-day cache)"),
    # Real monitors call /health/ a few times a minute; 1% is still ~40/s at 4,000
    # req/s (3% made health checks half of the app's requests).
    Mix("health", 1, "/health/ (database and cache probes)"),
    Mix("write", 2, "POST a course with 2 lessons (transaction + cache invalidation)"),
)

SCENARIOS: dict[str, Scenario] = {
    "mixed": Scenario("mixed", "what a day of the product looks like, per 100 requests", MIXED),
    "static": Scenario(
        "static",
        "static files only (nginx, CSS/JS pre-compressed at collectstatic)",
        (Mix("static", 100, "CSS/JS/SVG from the storage volume"),),
    ),
    "app": Scenario(
        "app",
        "the mixed scenario's app requests only, none answered by nginx's edge cache "
        "(API clients with a token): what Django itself serves",
        (
            Mix("list", 60, "course list pages 1-3 (Redis-cached JSON in the app)"),
            Mix("detail", 36, "one course with its lessons (2 queries through PgBouncer)"),
            Mix("health", 1, "/health/"),
            Mix("write", 3, "POST a course with 2 lessons"),
        ),
        bypass_edge_cache=True,
    ),
    "reads": Scenario(
        "reads",
        "the mixed scenario without its writes (for stacks that refuse writes)",
        (
            Mix("list", 43, "course list pages 1-3 (Redis-cached JSON)"),
            Mix("detail", 26, "one course with its lessons (2 queries through PgBouncer)"),
            Mix("static", 30, "CSS/JS/SVG"),
            Mix("health", 1, "/health/"),
        ),
    ),
    # The same mix with nginx's edge cache out of the way (reads carry a token): its
    # figures beside mixed's, so nobody credits Django with what the edge cache answers.
    "mixed-no-edge": Scenario(
        "mixed-no-edge",
        "the mixed scenario with the edge cache bypassed: every API read reaches the app",
        MIXED,
        bypass_edge_cache=True,
    ),
}

CEILINGS: dict[str, Scenario] = {
    "nginx-static": Scenario(
        "nginx-static",
        "ceiling: nginx alone serving a 436-byte static file",
        (Mix("ceiling_static", 100, SMALL_STATIC_FILE),),
    ),
    "bare-gunicorn": Scenario(
        "bare-gunicorn",
        "ceiling: a bare WSGI app (no Django) in gunicorn with the environment's config "
        "and limits, behind nginx",
        (Mix("bare", 100, "GET / on the bare app's virtual host"),),
        vhost="bare",
    ),
}

# The bare app of the ceiling: the smallest thing gunicorn can serve.
BARE_APP = '''"""The bare WSGI app of the load test's ceiling: gunicorn with nothing behind it."""

BODY = b'{"status": "ok", "app": "bare"}'


def application(environ, start_response):
    start_response(
        "200 OK", [("Content-Type", "application/json"), ("Content-Length", str(len(BODY)))]
    )
    return [BODY]
'''

# A host name that can never resolve (RFC 2606): the bare app's virtual host, and the probe
# that proves wrk never looks a name up.
BARE_DOMAIN = "bare.loadtest.invalid"
PROBE_DOMAIN = "probe.loadtest.invalid"


def scenario(name: str) -> Scenario:
    from aiia_ops.errors import OpsError

    if name not in SCENARIOS:
        raise OpsError(f"unknown scenario {name!r}; expected one of: {', '.join(SCENARIOS)}")
    return SCENARIOS[name]


def parse_users(text: str | int) -> list[int]:
    """`100` or `10,50,100,200,400` (a growth series)."""
    from aiia_ops.errors import OpsError

    try:
        users = [int(part) for part in str(text).split(",") if part.strip()]
    except ValueError:
        users = []
    if not users or any(u < 1 or u > 5000 for u in users):
        raise OpsError(
            f"--users must be a number from 1 to 5000 or a list like 10,50,100: {text!r}"
        )
    return users


# --- the target and the wrk command ---------------------------------------------------


@dataclass(frozen=True)
class Target:
    """Where the load goes: always 127.0.0.1, with a domain for SNI and Host."""

    domain: str
    port: int
    detail_slugs: tuple[str, ...] = ()
    static_files: tuple[str, ...] = STATIC_FILES
    token: str | None = field(default=None, repr=False)  # API_WRITE_TOKEN (never printed)

    def url(self, domain: str | None = None) -> str:
        return f"https://{domain or self.domain}:{self.port}/"


def seed_slugs(n: int = SEED_COURSES) -> tuple[str, ...]:
    return tuple(f"{SEED_PREFIX}{i:02d}" for i in range(1, n + 1))


def seed_course(slug: str) -> dict:
    n = slug.rsplit("-", 1)[-1]
    return {
        "title": f"Load test course {n}",
        "slug": slug,
        "summary": "Seeded by invoke loadtest: the courses detail reads pick from.",
        "lessons": [
            {"title": f"Lesson {i}", "body": "Text of the lesson. " * 20} for i in (1, 2, 3)
        ],
    }


WRITE_PREFIX = "lt-"  # slugs of the courses the writes create (lt-<run>-<thread>-<n>)
# In batches of 200 courses: one delete() of 20,000 courses (and their lessons) took the
# app container past its memory limit.
CLEANUP = f"""from courses.models import Course
mine = Course.objects.filter(slug__startswith={WRITE_PREFIX!r})
n = 0
while ids := list(mine.values_list("id", flat=True)[:200]):
    n += Course.objects.filter(id__in=ids).delete()[0]
print(n)
"""


def cleanup_args() -> list[str]:
    """Arguments for a one-off app container (commands.one_off_app) that deletes what the
    writes created, through the app's own models (lessons cascade, the list cache is
    invalidated by its signals): every run starts from the same data. Not `docker exec` in
    the live container: a second Django process there took it past its memory limit."""
    return ["manage.py", "shell", "--command", CLEANUP]


def wrk_argv(
    users: int, duration: int, script: str, url: str, threads: int = 2, timeout: int = 5
) -> list[str]:
    threads = max(1, min(threads, users))  # wrk needs at least one connection per thread
    return [
        "wrk",
        "--threads", str(threads),
        "--connections", str(users),
        "--duration", f"{duration}s",
        "--timeout", f"{timeout}s",
        "--script", script,
        url,
    ]  # fmt: skip


def lua_str(text: str) -> str:
    """A Lua string literal."""
    out = text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n").replace("\r", "\\r")
    return f'"{out}"'


def _lua_list(items: list[str]) -> str:
    return "{" + ", ".join(items) + "}"


EDGE_BYPASS = {"Authorization": "Bearer edge-cache-bypass"}  # reads ignore it; nginx does not


def _requests_of(
    kind: str, target: Target, bypass: bool = False
) -> list[tuple[str, dict[str, str]]]:
    """(path, extra headers) for the fixed requests of one kind."""
    gzip = {"Accept-Encoding": "gzip", **(EDGE_BYPASS if bypass else {})}
    if kind == "health":
        return [("/health/", gzip)]
    if kind == "list":
        return [(f"/api/courses/?page={p}", gzip) for p in LIST_PAGES]
    if kind == "detail":
        return [(f"/api/courses/{slug}/", gzip) for slug in target.detail_slugs]
    if kind == "static":
        return [(path, gzip) for path in target.static_files]
    if kind == "ceiling_static":
        return [(SMALL_STATIC_FILE, {})]
    if kind == "bare":
        return [("/", {})]
    raise ValueError(kind)


def lua_script(sc: Scenario, target: Target, run_id: str, seed: int = 1) -> str:
    """The wrk script of one scenario. Contains the write token when the scenario writes:
    the task writes it to a 0600 file and deletes it after the run."""
    if sc.writes and not target.token:
        raise ValueError("a scenario with writes needs the API write token")
    names, cumulative, fixed = [], [], []
    total = 0
    for m in sc.mix:
        total += m.weight
        names.append(lua_str(m.kind))
        cumulative.append(str(total))
        if m.kind == "write":
            fixed.append("{}")
            continue
        reqs = _requests_of(m.kind, target, sc.bypass_edge_cache)
        if not reqs:
            raise ValueError(f"no requests for {m.kind!r} (no seeded courses?)")
        built = []
        for path, headers in reqs:
            lua_headers = (
                "{" + ", ".join(f"[{lua_str(k)}] = {lua_str(v)}" for k, v in headers.items()) + "}"
            )
            built.append(f'wrk.format("GET", {lua_str(path)}, {lua_headers})')
        fixed.append(_lua_list(built))
    write_headers = ""
    if sc.writes:
        write_headers = (
            '    write_headers = {["Content-Type"] = "application/json", '
            '["Accept-Encoding"] = "gzip", '
            f'["Authorization"] = {lua_str("Bearer " + (target.token or ""))}}}\n'
        )
    lt_prefix = WRITE_PREFIX
    return f"""-- wrk script of the "{sc.name}" scenario, made by commands/loadtest.py; never edit.
-- First of all: every connection goes to 127.0.0.1. The URL's host name only sets TLS SNI
-- and the Host header; it is never looked up.
wrk.resolve = function(host, service)
    wrk.addrs = wrk.lookup("127.0.0.1", service)
end

local threads = {{}}
local count = 0
function setup(thread)
    count = count + 1
    thread:set("id", count)
    table.insert(threads, thread)
end

local names = {_lua_list(names)}
local cumulative = {_lua_list(cumulative)}
local total = {total}
local run = {lua_str(run_id)}
local fixed
local write_headers
local written = 0
sent = {{}}

function init(args)
    math.randomseed({seed} + 7919 * (id or 1))
    fixed = {_lua_list(fixed)}
{write_headers}    for i = 1, #names do sent[names[i]] = 0 end
end

function request()
    local r = math.random(total)
    local k = 1
    while cumulative[k] < r do k = k + 1 end
    local name = names[k]
    sent[name] = sent[name] + 1
    if name == "write" then
        written = written + 1
        local slug = string.format("{lt_prefix}%s-%d-%d", run, id or 1, written)
        local body = string.format(
            '{{"title":"Load test %s","slug":"%s","summary":"written under load",' ..
            '"lessons":[{{"title":"One","body":"First."}},{{"title":"Two","body":"Second."}}]}}',
            slug, slug)
        return wrk.format("POST", "/api/courses/", write_headers, body)
    end
    local list = fixed[k]
    return list[math.random(#list)]
end

function done(summary, latency, requests)
    local totals = {{}}
    for _, t in ipairs(threads) do
        for kind, n in pairs(t:get("sent")) do totals[kind] = (totals[kind] or 0) + n end
    end
    local parts = {{}}
    for kind, n in pairs(totals) do
        table.insert(parts, string.format('"%s":%d', kind, n))
    end
    local e = summary.errors
    io.write(string.format(
        'AIIA_LOADTEST {{"duration_us":%d,"requests":%d,"bytes":%d,' ..
        '"errors":{{"connect":%d,"read":%d,"write":%d,"status":%d,"timeout":%d}},' ..
        '"latency_us":{{"min":%d,"mean":%.1f,"max":%d,"p50":%d,"p90":%d,"p95":%d,' ..
        '"p99":%d,"p999":%d}},"sent":{{%s}}}}\\n',
        summary.duration, summary.requests, summary.bytes,
        e.connect, e.read, e.write, e.status, e.timeout,
        latency.min, latency.mean, latency.max, latency:percentile(50),
        latency:percentile(90), latency:percentile(95), latency:percentile(99),
        latency:percentile(99.9), table.concat(parts, ",")))
end
"""


# --- what wrk says --------------------------------------------------------------------


@dataclass(frozen=True)
class WrkResult:
    duration_s: float
    requests: int
    bytes: int
    errors: dict[str, int]  # connect/read/write/timeout (sockets) and status (non-2xx/3xx)
    latency_ms: dict[str, float]  # min mean max p50 p90 p95 p99 p999
    sent: dict[str, int]  # requests started per kind

    @property
    def rps(self) -> float:
        return self.requests / self.duration_s if self.duration_s else 0.0

    @property
    def error_count(self) -> int:
        return sum(self.errors.values())

    @property
    def error_rate(self) -> float:
        attempts = self.requests + self.errors["connect"] + self.errors["timeout"]
        return self.error_count / attempts if attempts else 0.0


def parse_wrk(stdout: str) -> WrkResult:
    """The JSON line the script's done() prints."""
    for line in stdout.splitlines():
        if line.startswith("AIIA_LOADTEST "):
            data = json.loads(line.split(" ", 1)[1])
            lat = {k: round(v / 1000, 3) for k, v in data["latency_us"].items()}
            return WrkResult(
                duration_s=data["duration_us"] / 1e6,
                requests=int(data["requests"]),
                bytes=int(data["bytes"]),
                errors={k: int(v) for k, v in data["errors"].items()},
                latency_ms=lat,
                sent={k: int(v) for k, v in sorted(data["sent"].items())},
            )
    from aiia_ops.errors import OpsError

    raise OpsError("wrk printed no result line (AIIA_LOADTEST ...); its output:\n" + stdout[-2000:])


# --- percentiles and time series ------------------------------------------------------


def percentile(values: list[float], p: float) -> float:
    """Nearest-rank percentile (the value below which p% of the values fall)."""
    if not values:
        return 0.0
    ordered = sorted(values)
    rank = max(1, math.ceil(p / 100 * len(ordered)))
    return ordered[rank - 1]


SHED_STATUSES = (429, 503)


@dataclass(frozen=True)
class Second:
    t: int  # seconds since the phase started
    requests: int
    errors: int  # status >= 400 (shed answers included)
    shed: int  # 429/503: nginx refused fast
    p50_ms: float
    p95_ms: float
    p99_ms: float


def timeseries(lines: list[AccessLine], start: float, end: float, vhosts: set[str]) -> list[Second]:
    """Per second of a phase: requests, errors and latency percentiles, as nginx saw them."""
    buckets: dict[int, list[AccessLine]] = defaultdict(list)
    for line in lines:
        if line.vhost in vhosts and start - 1 <= line.t <= end + 1:
            buckets[max(0, int(line.t - int(start)))].append(line)
    out = []
    for t in range(0, int(end - int(start)) + 1):
        group = buckets.get(t, [])
        times = [x.request_time_ms for x in group]
        out.append(
            Second(
                t=t,
                requests=len(group),
                errors=sum(1 for x in group if x.status >= 400),
                shed=sum(1 for x in group if x.status in SHED_STATUSES),
                p50_ms=percentile(times, 50),
                p95_ms=percentile(times, 95),
                p99_ms=percentile(times, 99),
            )
        )
    return out


def status_counts(lines: list[AccessLine], start: float, end: float, vhosts: set[str]) -> dict:
    counts: dict[str, int] = defaultdict(int)
    shed_times = []
    by_app = 0
    for line in lines:
        if line.vhost in vhosts and start - 1 <= line.t <= end + 1:
            counts[str(line.status)] += 1
            by_app += line.upstream
            if line.status in SHED_STATUSES:
                shed_times.append(line.request_time_ms)
    return {
        "by_status": dict(sorted(counts.items())),
        "answered_by_app": by_app,
        "shed": len(shed_times),
        "shed_p99_ms": percentile(shed_times, 99),
    }


# --- the engine's stats -----------------------------------------------------------------


@dataclass(frozen=True)
class Sample:
    t: float
    container: str
    cpu: float  # cores used since the previous sample
    memory: int  # bytes, page cache the kernel can drop not counted (like `docker stats`)


def sample(
    container: str, previous: tuple[float, int] | None, counters: Counters | None, t: float
) -> Sample | None:
    """The engine's counters of one container at `t` (host/engine.Engine.usage) → a Sample:
    CPU in cores since the `previous` reading (time, cumulative ns), memory by THE formula
    (commands/engine.memory_used). None for the first reading, which has nothing to compare
    with, and for a container whose counters could not be read."""
    if counters is None or counters.cpu_ns is None or counters.memory_used is None:
        return None
    if previous is None or t <= previous[0] or counters.cpu_ns < previous[1]:
        return None  # the first reading, or the container restarted in between
    cores = (counters.cpu_ns - previous[1]) / 1e9 / (t - previous[0])
    return Sample(t=t, container=container, cpu=cores, memory=counters.memory_used)


@dataclass(frozen=True)
class Usage:
    container: str
    service: str
    cpu_peak: float
    cpu_mean: float
    cpu_limit: float | None
    memory_peak: int
    memory_limit: int | None
    samples: int


def usage(
    samples: list[Sample], start: float, end: float, services: dict[str, str], limits: dict
) -> list[Usage]:
    """Peak and mean per container over one phase. `services`: container -> service key;
    `limits`: container -> (cpu limit, memory limit bytes)."""
    by: dict[str, list[Sample]] = defaultdict(list)
    for s in samples:
        if start <= s.t <= end + 1:
            by[s.container].append(s)
    out = []
    for container, service in services.items():
        group = by.get(container, [])
        cpu_limit, mem_limit = limits.get(container, (None, None))
        out.append(
            Usage(
                container=container,
                service=service,
                cpu_peak=round(max((s.cpu for s in group), default=0.0), 3),
                cpu_mean=round(sum(s.cpu for s in group) / len(group), 3) if group else 0.0,
                cpu_limit=cpu_limit,
                memory_peak=max((s.memory for s in group), default=0),
                memory_limit=mem_limit,
                samples=len(group),
            )
        )
    return out


def stack_memory_peak(samples: list[Sample], start: float, end: float, containers: set[str]) -> int:
    """The largest sum of every container's memory at one moment (samples grouped by
    second; a container missing from a second counts with its last known value)."""
    last: dict[str, int] = {}
    per_second: dict[int, dict[str, int]] = defaultdict(dict)
    for s in sorted(samples, key=lambda s: s.t):
        if s.container in containers and start <= s.t <= end + 1:
            per_second[int(s.t)][s.container] = s.memory
    peak = 0
    for second in sorted(per_second):
        last.update(per_second[second])
        peak = max(peak, sum(last.values()))
    return peak


def memory_series(
    samples: list[Sample], start: float, end: float, services: dict[str, str]
) -> dict[str, list[tuple[float, float]]]:
    """Per service: (seconds since start, MB) for the chart."""
    out: dict[str, list[tuple[float, float]]] = defaultdict(list)
    for s in sorted(samples, key=lambda s: s.t):
        if s.container in services and start <= s.t <= end + 1:
            out[services[s.container]].append((round(s.t - start, 1), round(s.memory / MB, 1)))
    return dict(out)


MB = 1024 * 1024

# --- the report ---------------------------------------------------------------------------


@dataclass
class Phase:
    """One wrk run: a scenario or a ceiling, at one number of users."""

    name: str  # scenario or ceiling name
    kind: str  # "scenario" | "ceiling"
    users: int
    duration_s: int
    started: float
    ended: float
    loadavg_before: tuple[float, float, float]
    loadavg_after: tuple[float, float, float]
    wrk: WrkResult
    seconds: list[Second]
    statuses: dict
    usage: list[Usage]
    stack_memory_peak: int
    memory_series: dict[str, list[tuple[float, float]]]

    @property
    def rps(self) -> float:
        return self.wrk.rps


@dataclass(frozen=True)
class Goal:
    figure: str
    target: str
    measured: str
    met: bool


GOAL_USERS = 100
GOAL_RPS = 1000
GOAL_P95_MS = 100
GOAL_STACK_MB = 400


def goals(phase: Phase) -> list[Goal]:
    """The issue's benchmark goal, for the mixed scenario at 100 users."""
    w = phase.wrk
    mem = phase.stack_memory_peak / MB
    return [
        Goal("requests/s", f">= {GOAL_RPS:,}", f"{w.rps:,.0f}", w.rps >= GOAL_RPS),
        Goal("p95 latency", f"<= {GOAL_P95_MS} ms", f"{w.latency_ms['p95']:.1f} ms",
             w.latency_ms["p95"] <= GOAL_P95_MS),
        Goal("errors", "0", f"{w.error_count}", w.error_count == 0),
        Goal("whole stack memory (peak)", f"<= {GOAL_STACK_MB} MB", f"{mem:.0f} MB",
             mem <= GOAL_STACK_MB),
    ]  # fmt: skip


CONDITIONS = (
    "stack under its stack.yml limits (memory and CPU per container); "
    "load generator (wrk) on the same 2-core machine"
)


def phase_dict(p: Phase) -> dict:
    w = p.wrk
    return {
        "name": p.name,
        "kind": p.kind,
        "users": p.users,
        "duration_s": p.duration_s,
        "started": datetime.fromtimestamp(p.started).astimezone().isoformat(timespec="seconds"),
        "loadavg_before": list(p.loadavg_before),
        "loadavg_after": list(p.loadavg_after),
        "requests": w.requests,
        "rps": round(w.rps, 1),
        "latency_ms": w.latency_ms,
        "errors": w.errors,
        "error_count": w.error_count,
        "error_rate": round(w.error_rate, 6),
        "sent": w.sent,
        "statuses": p.statuses,
        "stack_memory_peak_mb": round(p.stack_memory_peak / MB, 1),
        "containers": [
            {
                **asdict(u),
                "memory_peak_mb": round(u.memory_peak / MB, 1),
                "memory_limit_mb": round(u.memory_limit / MB, 1) if u.memory_limit else None,
            }
            for u in p.usage
        ],
        "seconds": [asdict(s) for s in p.seconds],
        "memory_series_mb": p.memory_series,
    }


def ratios(scenario: Phase, ceilings: list[Phase]) -> dict[str, float]:
    return {c.name: round(scenario.rps / c.rps, 3) for c in ceilings if c.rps}


def report_dict(
    command: str,
    environment: str,
    phases: list[Phase],
    machine: dict,
    integrity: dict,
    notes: list[str] = (),
) -> dict:
    """Everything one `invoke loadtest` run measured, for docs/loadtest/*.json."""
    scenarios = [p for p in phases if p.kind == "scenario"]
    steps = []
    for sc in scenarios:
        ceilings = [p for p in phases if p.kind == "ceiling" and p.users == sc.users]
        step = {
            "users": sc.users,
            "scenario": sc.name,
            "rps": round(sc.rps, 1),
            "ratios": ratios(sc, ceilings),
            "ceilings_rps": {c.name: round(c.rps, 1) for c in ceilings},
        }
        if sc.name == "mixed" and sc.users == GOAL_USERS:
            step["goals"] = [asdict(g) for g in goals(sc)]
        steps.append(step)
    return {
        "command": command,
        "environment": environment,
        "conditions": CONDITIONS,
        "machine": machine,
        "integrity": integrity,
        "notes": list(notes),
        "steps": steps,
        "phases": [phase_dict(p) for p in phases],
    }


# --- tables for people ----------------------------------------------------------------


def summary_rows(report: dict) -> tuple[list[str], list[list[str]]]:
    headers = ["run", "users", "req/s", "vs nginx-static", "vs bare-gunicorn", "p50 ms", "p95 ms",
               "p99 ms", "errors", "stack MB", "load avg"]  # fmt: skip
    rows = []
    by_users: dict[int, dict[str, dict]] = defaultdict(dict)
    for p in report["phases"]:
        by_users[p["users"]][p["name"]] = p
    for p in report["phases"]:
        ceilings = by_users[p["users"]]

        def ratio(name: str, p=p, ceilings=ceilings) -> str:
            c = ceilings.get(name)
            if c is None or not c["rps"] or c is p:
                return "-"
            return f"{p['rps'] / c['rps']:.0%}"

        lat = p["latency_ms"]
        rows.append(
            [
                p["name"],
                str(p["users"]),
                f"{p['rps']:,.0f}",
                ratio("nginx-static"),
                ratio("bare-gunicorn"),
                f"{lat['p50']:.1f}",
                f"{lat['p95']:.1f}",
                f"{lat['p99']:.1f}",
                f"{p['error_count']} ({p['error_rate']:.2%})",
                f"{p['stack_memory_peak_mb']:.0f}",
                f"{p['loadavg_before'][0]:.1f}",
            ]
        )
    return headers, rows


def container_rows(phase: dict) -> tuple[list[str], list[list[str]]]:
    headers = ["container", "CPU peak / limit", "CPU mean", "memory peak / limit"]
    rows = []
    for c in phase["containers"]:
        cpu_limit = f"{c['cpu_limit']:g}" if c["cpu_limit"] else "-"
        mem_limit = f"{c['memory_limit_mb']:.0f}" if c["memory_limit_mb"] else "-"
        rows.append(
            [
                c["service"],
                f"{c['cpu_peak']:.2f} / {cpu_limit}",
                f"{c['cpu_mean']:.2f}",
                f"{c['memory_peak_mb']:.1f} / {mem_limit} MB",
            ]
        )
    return headers, rows


def goal_rows(goal_list: list[dict]) -> tuple[list[str], list[list[str]]]:
    return ["goal (mixed, 100 users)", "target", "measured", "met"], [
        [g["figure"], g["target"], g["measured"], "yes" if g["met"] else "NO"] for g in goal_list
    ]


def first_to_give(phase: dict) -> str:
    """The container closest to a limit during a phase: what gives first."""
    best, text = -1.0, "nothing near a limit"
    for c in phase["containers"]:
        if c["cpu_limit"]:
            r = c["cpu_mean"] / c["cpu_limit"]
            if r > best:
                best, text = r, f"{c['service']} CPU ({c['cpu_mean']:.2f} of {c['cpu_limit']:g})"
        if c["memory_limit_mb"]:
            r = c["memory_peak_mb"] / c["memory_limit_mb"]
            if r > best:
                best = r
                text = (
                    f"{c['service']} memory "
                    f"({c['memory_peak_mb']:.0f} of {c['memory_limit_mb']:.0f} MB)"
                )
    return text


# --- charts (the one chart engine, commands/charts.py) -----------------------------------


def _flat(label: str, value: float, x_end: float) -> Series:
    """A goal or a ceiling: a dashed horizontal line across the run."""
    return Series(label, [(0, value), (x_end, value)], dashed=True)


def render_run_svg(report: dict, phase_name: str, users: int) -> str:
    """Throughput and latency per second, and memory per container, for one scenario run."""
    phases = {(p["name"], p["users"]): p for p in report["phases"]}
    p = phases[(phase_name, users)]
    ceilings = [q for q in report["phases"] if q["kind"] == "ceiling" and q["users"] == users]
    end = p["duration_s"]
    secs = [s for s in p["seconds"] if s["t"] < end]
    thr = [Series("answers/s", [(s["t"], s["requests"]) for s in secs])]
    thr.append(Series("errors/s (status >= 400)", [(s["t"], s["errors"]) for s in secs]))
    top = max((s["requests"] for s in secs), default=0)
    for c in ceilings:
        label = f"ceiling {c['name']}: {c['rps']:,.0f}/s"
        if c["rps"] > 2.5 * top:  # drawn, it would flatten the run's own line
            thr.append(Series(label + " (off the scale)", []))
        else:
            thr.append(_flat(label, c["rps"], end))
    lat = [Series(k, [(s["t"], s[f"{k}_ms"]) for s in secs]) for k in ("p50", "p95", "p99")]
    lat.append(_flat(f"goal p95 {GOAL_P95_MS} ms", GOAL_P95_MS, end))
    mem = [
        Series(
            f"{service} (limit {_limit_of(p, service)})",
            [(t, mb) for t, mb in points if t <= end + 1],
        )
        for service, points in sorted(p["memory_series_mb"].items())
    ]
    w = p["latency_ms"]
    notes = [
        f"{report['command']}",
        f"{p['rps']:,.0f} req/s, p50 {w['p50']:.1f} ms, p95 {w['p95']:.1f} ms, p99 "
        f"{w['p99']:.1f} ms (wrk), errors {p['error_count']}, whole stack peak "
        f"{p['stack_memory_peak_mb']:.0f} MB; load average before {p['loadavg_before'][0]:.1f}",
        report["conditions"],
    ]
    panels = (
        ("Throughput (nginx access log, per second)", thr, "requests/s"),
        ("Latency inside nginx (request_time, per second)", lat, "ms"),
        ("Memory per container (engine stats)", mem, "MB"),
    )
    body = []
    for i, (title, series, unit) in enumerate(panels):
        chart = Chart(series, title=title, y_label=unit, x_label="seconds")
        body += panel(chart, 0, 90 + 270 * i, 1000, 260)
    title = f"Load test: {phase_name}, {users} users ({report['environment']})"
    return document(1000, 900, title, notes, body)


def _limit_of(phase: dict, service: str) -> str:
    for c in phase["containers"]:
        if c["service"] == service and c["memory_limit_mb"]:
            return f"{c['memory_limit_mb']:.0f} MB"
    return "-"


def render_growth_svg(report: dict, scenario_name: str) -> str:
    """Throughput, latency and memory against the number of users."""
    runs = sorted(
        (p for p in report["phases"] if p["name"] == scenario_name), key=lambda p: p["users"]
    )
    xs = list(range(len(runs)))
    ticks = [(i, str(p["users"])) for i, p in zip(xs, runs, strict=True)]

    def good(p: dict) -> float:
        bad = sum(n for code, n in p["statuses"]["by_status"].items() if int(code) >= 400)
        total = sum(p["statuses"]["by_status"].values()) or 1
        return p["rps"] * (1 - bad / total)

    thr = [
        Series("all answers/s", [(i, p["rps"]) for i, p in zip(xs, runs, strict=True)]),
        Series("2xx/3xx answers/s", [(i, good(p)) for i, p in zip(xs, runs, strict=True)]),
    ]
    for name in CEILINGS:
        pts = []
        for i, p in zip(xs, runs, strict=True):
            for q in report["phases"]:
                if q["name"] == name and q["users"] == p["users"]:
                    pts.append((i, q["rps"]))
        top = max((p["rps"] for p in runs), default=0)
        if pts and max(y for _, y in pts) > 2.5 * top:  # drawn, it would flatten the runs
            values = ", ".join(f"{y:,.0f}" for _, y in pts)
            thr.append(Series(f"ceiling {name} (off the scale): {values}/s", []))
        elif pts:
            thr.append(Series(f"ceiling {name}", pts, dashed=True))
    lat = [
        Series(k, [(i, p["latency_ms"][k]) for i, p in zip(xs, runs, strict=True)])
        for k in ("p50", "p95", "p99")
    ]
    lat.append(_flat(f"goal p95 {GOAL_P95_MS} ms", GOAL_P95_MS, xs[-1]))
    services = sorted({c["service"] for p in runs for c in p["containers"]})
    mem = [
        Series(
            "whole stack", [(i, p["stack_memory_peak_mb"]) for i, p in zip(xs, runs, strict=True)]
        ),
        _flat(f"goal {GOAL_STACK_MB} MB", GOAL_STACK_MB, xs[-1]),
    ]
    cpu = []
    for service in services:
        m_pts, c_pts = [], []
        for i, p in zip(xs, runs, strict=True):
            for c in p["containers"]:
                if c["service"] == service:
                    m_pts.append((i, c["memory_peak_mb"]))
                    c_pts.append((i, c["cpu_mean"]))
        mem.append(Series(service, m_pts))
        cpu.append(Series(f"{service} (limit {_cpu_limit_of(runs, service)})", c_pts))
    notes = [report["command"], report["conditions"]]
    panels = (
        ("Throughput", thr, "requests/s"),
        ("Latency (wrk)", lat, "ms"),
        ("CPU per container (mean)", cpu, "cores"),
        ("Memory (peak)", mem, "MB"),
    )
    body = []
    for i, (title, series, unit) in enumerate(panels):
        chart = Chart(series, title=title, y_label=unit, x_label="users", x_ticks=ticks)
        body += panel(chart, 0, 70 + 260 * i, 1000, 250)
    return document(1000, 1110, f"Growth: {scenario_name} ({report['environment']})", notes, body)


def _cpu_limit_of(runs: list[dict], service: str) -> str:
    for p in runs:
        for c in p["containers"]:
            if c["service"] == service and c["cpu_limit"]:
                return f"{c['cpu_limit']:g}"
    return "-"


# --- the ceiling's nginx virtual host ---------------------------------------------------


def bare_vhost_conf(stack, env, address: str) -> str:
    """nginx in front of the bare app: the environment's proxy settings (HTTP/1.1 keep-alive
    pool, headers, timeouts), its certificate, a name that never resolves."""
    nginx = stack.services.nginx.settings
    keepalive = max(int(env.gunicorn.keepalive.seconds) - 5, 1)
    timeout = int(env.gunicorn.timeout.seconds) + 5
    cert = f"/etc/nginx/ssl/live/{env.domains[0]}"
    return f"""# Written by `invoke loadtest` for the bare-gunicorn ceiling; removed after the run.
upstream aiia_loadtest_bare {{
    server {address}:{env.port};
    keepalive {nginx.upstream_keepalive};
    keepalive_timeout {keepalive}s;
}}

server {{
    listen 443 ssl;
    http2 on;
    server_name {BARE_DOMAIN};
    ssl_certificate     {cert}/fullchain.pem;
    ssl_certificate_key {cert}/privkey.pem;

    location / {{
        proxy_pass http://aiia_loadtest_bare;
        proxy_http_version 1.1;
        proxy_set_header Connection "";
        proxy_set_header Host $host;
        proxy_set_header X-Forwarded-For $remote_addr;
        proxy_set_header X-Forwarded-Proto $scheme;
        proxy_set_header X-Forwarded-Host $host;
        proxy_set_header X-Real-IP $remote_addr;
        proxy_set_header X-Request-ID $request_id;
        proxy_connect_timeout 5s;
        proxy_send_timeout {timeout}s;
        proxy_read_timeout {timeout}s;
    }}
}}
"""


# --- the ceiling's bare app -----------------------------------------------------------------


def bare_address(stack) -> str:
    """A fixed free address in the stack's subnet for the bare app (x.y.0.30)."""
    return str(stack.network.subnet.network_address + 30)


def bare_container_name(stack) -> str:
    return f"{stack.project}_loadtest_bare"


BARE_CONF = "zz-loadtest-bare.conf"  # in nginx's conf.d while a run measures the ceiling


def bare_run_argv(stack, env, config_dir: str, image: str, app_dir: str) -> list[str]:
    """The bare app with the environment's gunicorn config, limits and network.
    `config_dir`: the state dir's config folder (rendered configs, mounted read-only)."""
    return [
        "docker", "run", "--detach", "--rm", "--name", bare_container_name(stack),
        "--network", stack.network.name, "--ip", bare_address(stack),
        "--memory", str(env.memory.limit.bytes),
        "--memory-swap", str(env.memory.limit.bytes),
        "--cpus", f"{env.cpu.limit:g}",
        "--cpu-shares", str(max(2, round(1024 * env.cpu.reservation))),
        "--no-healthcheck",
        "--label", f"org.eduaiia.stack={stack.project}",
        "--label", "org.eduaiia.service=loadtest_bare",
        *run_flags("app"),  # the app's own hardening (hardening.py)
        "--mount", f"type=bind,source={app_dir},target=/loadtest,readonly",
        "--mount", f"type=bind,source={config_dir}/{config_dir_name(env)},"
        f"target={CONFIG_MOUNT},readonly",
        image,
        "gunicorn", "-c", f"{CONFIG_MOUNT}/gunicorn.conf.py", "--pythonpath", "/loadtest",
        "bare:application",
    ]  # fmt: skip


def remove_container(name: str) -> list[str]:
    return ["docker", "rm", "--force", name]


# --- facts the run reads ----------------------------------------------------------------------


def token_from_env_file(text: str) -> str | None:
    """API_WRITE_TOKEN from an env file (KEY=value lines), if it has a non-empty one."""
    for line in text.splitlines():
        key, _, value = line.partition("=")
        if key.strip() == "API_WRITE_TOKEN" and value.strip():
            return value.strip()
    return None


def parse_loadavg(text: str) -> tuple[float, float, float]:
    """/proc/loadavg → the 1, 5 and 15 minute load averages."""
    a, b, c = (round(float(x), 2) for x in text.split()[:3])
    return (a, b, c)


def wrk_version_argv() -> list[str]:
    return ["wrk", "--version"]


def first_line(text: str) -> str:
    lines = text.strip().splitlines()
    return lines[0] if lines else ""


def app_logs_since(container: str, since: float) -> list[str]:
    return ["docker", "logs", "--since", str(int(since)), container]


WORKER_TROUBLE = ("WORKER TIMEOUT", "was sent SIGKILL", "out of memory", "Worker failed to boot")


def log_trouble(text: str) -> dict[str, int]:
    """What in an app container's log says a gunicorn worker died or hung."""
    return {p: text.count(p) for p in WORKER_TROUBLE if p in text}


# --- integrity: nothing restarted, nothing OOM-killed -------------------------------------------


def integrity_snapshot(
    names: list[str], containers: dict[str, Container], counters: dict[str, Counters | None]
) -> dict:
    """Per container, what a restart or an OOM kill changes (engine.inspect and .usage)."""
    out = {}
    for name in names:
        c = containers.get(name)
        if c is None:
            out[name] = {"present": False}
            continue
        usage = counters.get(name)
        out[name] = {
            "present": True,
            "running": c.running,
            "started_at": c.started_at,
            "restart_count": c.restart_count,
            "oom_killed": c.oom_killed,
            "oom_kills": usage.oom_kills if usage else None,
        }
    return out


# The kernel's own record of an OOM kill: one `oom-kill:` line per kill naming the memory
# cgroup of the killed task (cgroupfs: /docker/<id>; systemd: .../docker-<id>.scope).
KERNEL_LOG = ["dmesg"]
_OOM_LINE = re.compile(r"^\[\s*(\d+(?:\.\d+)?)\]\s+oom-kill:(.*)$", re.M)
_CONTAINER_ID = re.compile(r"[0-9a-f]{64}")


@dataclass(frozen=True)
class KernelOomKill:
    at_s: float  # seconds since boot, the kernel log's clock (/proc/uptime's)
    task: str
    pid: int
    container_id: str  # "" when the cgroup is not a container's


def kernel_oom_kills(dmesg: str, since_s: float) -> list[KernelOomKill]:
    """Every OOM kill the kernel logged after `since_s` seconds since boot."""
    out = []
    for m in _OOM_LINE.finditer(dmesg):
        at = float(m.group(1))
        if at <= since_s:
            continue
        fields = dict(f.split("=", 1) for f in m.group(2).split(",") if "=" in f)
        cid = _CONTAINER_ID.search(fields.get("task_memcg", ""))
        pid = fields.get("pid", "")
        out.append(KernelOomKill(at, fields.get("task", "?"), int(pid) if pid.isdigit() else 0,
                                 cid.group(0) if cid else ""))  # fmt: skip
    return out


def kernel_oom_problems(
    kills: list[KernelOomKill], names_by_id: dict[str, str], live_at_end: set[str]
) -> tuple[list[str], list[str]]:
    """→ (problems, notes). Problems: kills in the run's own containers (`names_by_id`: the
    stack's, live when it began, and the bare ceiling) but not in one still live at the end,
    whose own oom_kill counter already counts it. Notes: kills anywhere else on the machine
    (another project's container, a lab host, a host process): the machine ran short of
    memory, which the figures may show."""
    problems, notes = [], []
    for k in kills:
        name = names_by_id.get(k.container_id)
        if name in live_at_end:
            continue
        if name:
            problems.append(f"kernel log: {k.task} (pid {k.pid}) OOM-killed in {name}")
        else:
            where = f"container {k.container_id[:12]}" if k.container_id else "a host process"
            notes.append(f"the kernel OOM-killed {k.task} (pid {k.pid}) in {where}, "
                         "outside this stack, during the run")  # fmt: skip
    return problems, notes


def integrity_report(
    before: dict,
    after: dict,
    app_trouble: dict,
    kernel_kills: list[KernelOomKill] | None = None,
    names_by_id: dict[str, str] | None = None,
) -> dict:
    """`kernel_kills`: the kernel's OOM kills during the run (kernel_oom_kills), or None
    when its log could not be read (a note: the live containers' counters still count);
    `names_by_id`: the run's own containers, by id."""
    problems = []
    for name, b in before.items():
        a = after.get(name, {"present": False})
        if not b.get("present"):
            continue
        if not a.get("present") or not a.get("running"):
            problems.append(f"{name} is no longer running")
        elif a["started_at"] != b["started_at"] or a["restart_count"] != b["restart_count"]:
            problems.append(f"{name} restarted")
        if a.get("oom_killed") and not b.get("oom_killed"):
            problems.append(f"{name}: the engine reports OOMKilled")
        if (a.get("oom_kills") or 0) > (b.get("oom_kills") or 0):
            problems.append(f"{name}: {a['oom_kills'] - b['oom_kills']} process(es) OOM-killed")
    for name, trouble in app_trouble.items():
        for what, n in trouble.items():
            problems.append(f"{name} log: {what!r} x{n}")
    if kernel_kills is None:
        notes = ["kernel log not readable (dmesg): OOM kills in containers gone by the end "
                 "not checked"]  # fmt: skip
    else:
        live_at_end = {name for name, a in after.items() if a.get("present")}
        kernel, notes = kernel_oom_problems(kernel_kills, names_by_id or {}, live_at_end)
        problems.extend(kernel)
    return {"ok": not problems, "problems": problems, "notes": notes, "before": before,
            "after": after}  # fmt: skip
