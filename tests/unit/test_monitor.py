"""Issue #7, the pure parts: thresholds, parsers, the access log, availability, alerts,
the history store and the status page, as data. No engine, no network."""

from __future__ import annotations

import datetime as dt
import json
import sqlite3

import pytest

from aiia_ops import DEFAULT_STACK
from aiia_ops.commands import engine as cgroups
from aiia_ops.commands import monitor as m
from aiia_ops.commands.accesslog import parse_line
from aiia_ops.commands.monitor import (
    CRIT,
    OK,
    UNKNOWN,
    WARN,
    AlertMemory,
    Check,
    HttpStats,
    Thresholds,
)
from aiia_ops.commands.statuspage import render, svg_chart
from aiia_ops.flows.monitor import publish, read_new_log
from aiia_ops.host.engine import Engine
from aiia_ops.host.monitor_store import Store
from aiia_ops.host.runners import LocalRunner
from aiia_ops.model import load_stack

NOW = dt.datetime(2026, 11, 26, 12, 0, tzinfo=dt.UTC).timestamp()


@pytest.fixture(scope="module")
def stack():
    return load_stack(DEFAULT_STACK)


@pytest.fixture(scope="module")
def t(stack):
    return Thresholds.from_metrics(stack.monitoring.metrics)


# --- the document's table ------------------------------------------------------------------


def test_thresholds_are_the_documents_table(t):
    assert t.cpu == (60, 85)
    assert t.memory == (70, 90)
    assert t.disk == (75, 90)
    assert t.db_connections == (40, 48)
    assert t.cache_mb == (40, 48)
    assert t.error_percent == (1, 5)
    assert t.p95_ms == (500, 2000)
    assert t.availability_below == 99.9


def test_collection_intervals_are_the_documents(stack):
    assert m.schedule(stack.monitoring.metrics) == {
        "cpu_percent": 60,
        "memory_percent": 60,
        "disk_percent": 300,
        "db_connections": 30,
        "cache_memory": 30,
        "http_error_percent": 60,
        "http_latency_p95": 60,
        "availability": 300,
    }


def test_latency_thresholds_are_histogram_edges_so_the_state_is_exact(t):
    assert set(t.p95_ms) <= set(m.LATENCY_EDGES_MS)


@pytest.mark.parametrize(
    ("value", "state"),
    [(None, UNKNOWN), (0, OK), (59.9, OK), (60, WARN), (84.9, WARN), (85, CRIT), (100, CRIT)],
)
def test_evaluate_at_and_around_the_thresholds(value, state):
    assert m.evaluate(value, 60, 85) == state


@pytest.mark.parametrize(("value", "state"), [(99.95, OK), (99.9, OK), (99.89, CRIT)])
def test_availability_is_critical_only_below_99_9(value, state):
    assert m.availability_check("prod", "prod", value, 99.9).state == state


@pytest.mark.parametrize(("days", "state"), [(90, OK), (30, OK), (29.9, WARN), (6.9, CRIT)])
def test_certificate_days_are_lower_bounds(days, state):
    assert m.evaluate(days, 30, 7, below=True) == state


def test_worst_state_and_nagios_exit_codes():
    assert m.worst([]) == OK
    assert m.worst([OK, UNKNOWN]) == UNKNOWN
    assert m.worst([OK, UNKNOWN, WARN]) == WARN
    assert m.worst([WARN, CRIT, UNKNOWN]) == CRIT
    assert [m.exit_code(s) for s in (OK, WARN, CRIT, UNKNOWN)] == [0, 1, 2, 3]


def test_check_text_for_people():
    c = Check("cache_memory", "redis", OK, 12.5, "MB", 40, 48)
    assert (c.key, c.label, c.value_text(), c.threshold_text()) == (
        "cache_memory:redis",
        "cache memory",
        "12.5 MB",
        "40 / 48 MB",
    )
    a = m.availability_check("eduaiia.com", "prod", 99.931, 99.9)
    assert (a.value_text(), a.threshold_text()) == ("99.931%", "crit <99.9%")
    assert Check("health", "redis", CRIT).value_text() == "-"


# --- facts ---------------------------------------------------------------------------------


def test_host_cpu_from_proc_stat_between_two_readings():
    a = m.parse_proc_stat("cpu  100 0 100 700 100 0 0 0 0 0\ncpu0 1 2 3 4\n")
    b = m.parse_proc_stat("cpu  250 0 150 850 150 0 0 0 0 0\n")
    assert a == (200, 1000) and b == (400, 1400)
    assert m.cpu_percent_between(a, b) == 50.0  # 200 busy of 400 jiffies
    assert m.cpu_percent_between(None, b) is None


def test_host_memory_is_total_minus_available():
    used, total = m.parse_meminfo("MemTotal: 1000 kB\nMemFree: 100 kB\nMemAvailable: 300 kB\n")
    assert (used, total) == (700 * 1024, 1000 * 1024)


def test_container_memory_like_docker_stats_and_cpu_against_its_own_limit():
    stats = {
        "memory_stats": {"usage": 60 * 2**20, "stats": {"total_inactive_file": 10 * 2**20}},
        "cpu_stats": {"cpu_usage": {"total_usage": 5_000_000_000}},
    }
    assert m.container_memory_used(stats) == 50 * 2**20
    assert m.container_cpu_ns(stats) == 5_000_000_000
    # 0.15 s of CPU in 1 s against a 0.3-CPU limit is 50 % of what it may use
    assert m.container_cpu_percent((0.0, 0), (1.0, 150_000_000), 0.3) == 50.0
    assert m.container_cpu_percent((0.0, 10), (1.0, 5), 1.0) is None  # restarted


def test_cgroup_v1_and_v2_counters_like_docker_stats(tmp_path):
    def cgroup_stats(cid, root):  # what the engine client reads of one container, or None
        return Engine(LocalRunner(), cgroup_root=str(root)).usage({"c": cid})["c"]

    cid = "abc123"
    mem, cpu = tmp_path / "memory/docker" / cid, tmp_path / "cpuacct/docker" / cid
    mem.mkdir(parents=True)
    cpu.mkdir(parents=True)
    (mem / "memory.usage_in_bytes").write_text("4161536\n")
    (mem / "memory.stat").write_text("cache 8192\ntotal_inactive_file 8192\n")
    (cpu / "cpuacct.usage").write_text("985472941\n")
    s = cgroup_stats(cid, tmp_path)
    assert s.memory_used == 4161536 - 8192
    assert s.cpu_ns == 985472941

    v2 = tmp_path / "v2" / "system.slice" / f"docker-{cid}.scope"
    v2.mkdir(parents=True)
    (v2 / "memory.current").write_text("2000000\n")
    (v2 / "memory.stat").write_text("anon 1\ninactive_file 1000000\n")
    (v2 / "cpu.stat").write_text("usage_usec 1500\nuser_usec 1000\n")
    s2 = cgroup_stats(cid, tmp_path / "v2")
    assert s2.memory_used == 1000000
    assert s2.cpu_ns == 1_500_000
    # not found: no cgroup file (the engine client then asks `docker stats`)
    read = LocalRunner().query(cgroups.read_cgroups(["missing"], str(tmp_path)))
    assert cgroups.parse_cgroups(read.stdout, ["missing"], str(tmp_path))["missing"] is None


def test_redis_info_and_postgres_connections():
    info = m.parse_redis_info(
        "# Memory\r\nused_memory:41943040\r\nmaxmemory_policy:allkeys-lru\r\n"
    )
    assert int(info["used_memory"]) / 2**20 == 40.0
    rows = m.parse_psql_rows("aiia_prod|3|1\naiia_staging|2|0\n-|1|1\n")
    assert m.db_connections(rows) == (6, 2, {"aiia_prod": 3, "aiia_staging": 2, "-": 1})
    assert "pid <> pg_backend_pid()" in m.DB_CONNECTIONS_SQL


def test_certificate_end_date_and_days_left():
    end = m.parse_enddate("notAfter=Feb 24 12:00:00 2027 GMT\n")
    assert end == dt.datetime(2027, 2, 24, 12, 0, tzinfo=dt.UTC)
    assert m.days_left(end, NOW) == 90.0
    assert m.parse_enddate("notAfter=Mar  5 01:02:03 2027 GMT").day == 5


@pytest.mark.parametrize(
    ("state", "health", "expected"),
    [
        ("running", "healthy", OK),
        ("running", "none", OK),
        ("running", "starting", WARN),
        ("running", "unhealthy", CRIT),
        ("exited", "-", CRIT),
        ("absent", "-", CRIT),
    ],
)
def test_container_health(state, health, expected):
    assert m.container_health_state(state, health) == expected


# --- the access log ----------------------------------------------------------------------


def line(vhost="eduaiia.com", status=200, seconds=0.012, when=NOW, ua="curl/8"):
    stamp = dt.datetime.fromtimestamp(when, dt.UTC).strftime("%Y-%m-%dT%H:%M:%S+00:00")
    return json.dumps(
        {
            "time": stamp,
            "vhost": vhost,
            "host": vhost,
            "status": str(status),
            "request_time": f"{seconds:.3f}",
            "upstream_response_time": f"{seconds:.3f}",
            "user_agent": ua,
        }
    )


def test_access_line_parsing_skips_what_is_not_site_traffic():
    parsed = parse_line(line(status=502, seconds=0.25, when=NOW + 30))
    assert (parsed.vhost, parsed.minute, parsed.status, parsed.request_time_ms) == (
        "eduaiia.com",
        int(NOW),
        502,
        250.0,
    )
    assert m.counted(parsed)
    assert not m.counted(parse_line(line(vhost="_")))  # scanners on the catch-all
    assert not m.counted(parse_line(line(ua=m.MONITOR_USER_AGENT + " probe")))
    assert not m.counted(parse_line(line(status="000")))
    assert parse_line("not json") is None
    assert parse_line('{"vhost": "eduaiia.com"}') is None
    # What the monitor does not count never reaches its minutes.
    skipped = [line(vhost="_"), line(ua=m.MONITOR_USER_AGENT), line(status="000"), "not json"]
    assert m.aggregate(skipped) == {}


def test_error_rate_and_p95_per_vhost_over_the_window(t):
    lines = [line(seconds=0.010) for _ in range(94)]
    lines += [line(status=503, seconds=0.010) for _ in range(6)]  # 6 % errors
    lines += [line(vhost="staging.eduaiia.com", seconds=0.6) for _ in range(20)]
    lines += [line(when=NOW - 3600, status=500)]  # an hour ago: outside the window
    minutes = m.aggregate(lines)
    rows = [(v, mi, s) for (v, mi), s in minutes.items()]
    prod = m.window(rows, "eduaiia.com", NOW - m.HTTP_WINDOW_S, NOW)
    assert (prod.requests, prod.errors, prod.error_percent) == (100, 6, 6.0)
    err, p95 = m.http_checks("eduaiia.com", "prod", prod, t)
    assert (err.state, err.value, p95.state) == (CRIT, 6.0, OK)
    assert 10 <= p95.value < 15  # every request took 10 ms: the 10-15 ms bucket
    staging = m.window(rows, "staging.eduaiia.com", NOW - m.HTTP_WINDOW_S, NOW)
    s_err, s_p95 = m.http_checks("staging.eduaiia.com", "staging", staging, t)
    assert (s_err.state, s_p95.state) == (OK, WARN)
    assert 500 <= s_p95.value < 750


def test_a_quiet_vhost_is_ok_not_unknown(t):
    err, p95 = m.http_checks("devstatus.eduaiia.com", "status", HttpStats(), t)
    assert (err.state, err.value) == (OK, 0.0)
    assert (p95.state, p95.value, p95.detail) == (OK, None, "no requests in 5 min")


@pytest.mark.parametrize(
    ("errors", "state"), [(0, OK), (1, WARN), (4, WARN), (5, CRIT), (40, CRIT)]
)
def test_error_rate_thresholds(t, errors, state):
    stats = HttpStats()
    for i in range(100):
        stats.add(500 if i < errors else 200, 5)
    assert m.http_checks("x", None, stats, t)[0].state == state


def test_percentile_from_the_histogram():
    stats = HttpStats()
    for ms in [5] * 90 + [1800] * 10:
        stats.add(200, ms)
    assert 1500 <= stats.percentile(0.95) < 2000  # the 95th request took 1.8 s
    assert stats.percentile(0.5) < 7
    assert HttpStats().percentile() is None
    huge = HttpStats()
    huge.add(200, 120_000)
    assert huge.percentile() == 60000


def test_reading_the_log_incrementally(tmp_path):
    log = tmp_path / "access.log"
    log.write_text(line() + "\n" + line(status=500) + "\n" + '{"half": ')
    lines, offset = read_new_log(log, None)
    assert len(lines) == 2  # the half-written line waits for the next run
    with log.open("a") as f:
        f.write('"line"}\n' + line() + "\n")
    more, offset2 = read_new_log(log, offset)
    assert more == ['{"half": "line"}', line()]
    again, _ = read_new_log(log, offset2)
    assert again == []
    log.write_text(line(status=502) + "\n")  # rotated/truncated: read from the start
    rotated, _ = read_new_log(log, offset2)
    assert rotated == [line(status=502)]


# --- availability ---------------------------------------------------------------------------


def test_availability_counts_a_failed_probe_until_the_next_one_at_most_one_interval():
    day, minute = 86400, 60
    every_minute = [(NOW - day + i * minute, True) for i in range(1440)]
    assert m.availability(every_minute, NOW, day, minute) == 100.0
    one_down = list(every_minute)
    one_down[100] = (one_down[100][0], False)
    assert m.availability(one_down, NOW, day, minute) == 99.931  # OK
    two_down = list(one_down)
    two_down[200] = (two_down[200][0], False)
    assert m.availability(two_down, NOW, day, minute) == 99.861  # CRIT (< 99.9)
    # Runs seconds apart (tests, a person re-running it) count seconds, not minutes.
    quick = [(NOW - 20, False), (NOW - 5, True)]
    assert m.availability(quick, NOW, day, minute) == round(100 * (1 - 15 / day), 3)
    # Before the first probe the monitor did not look: not downtime.
    assert m.availability([(NOW - 60, True)], NOW, day, minute) == 100.0
    assert m.availability([], NOW, day, minute) is None


# --- alerts ----------------------------------------------------------------------------------


def checks(state, subject="redis"):
    return [Check("health", subject, state, detail="exited" if state == CRIT else "ok")]


def test_alert_on_problem_and_on_recovery_only():
    events, mem = m.decide_alerts(checks(OK), {}, NOW)
    assert events == []  # nothing to say about a healthy start
    events, mem = m.decide_alerts(checks(CRIT), mem, NOW + 60)
    assert [(e.key, e.old, e.new) for e in events] == [("health:redis", OK, CRIT)]
    events, mem = m.decide_alerts(checks(CRIT), mem, NOW + 120)
    assert events == []  # still CRIT: said already
    events, mem = m.decide_alerts(checks(UNKNOWN), mem, NOW + 180)
    assert events == []  # unknown says nothing
    events, mem = m.decide_alerts(checks(OK), mem, NOW + 240)
    assert [(e.new, e.recovery) for e in events] == [(OK, True)]
    text = m.alert_message(events, OK, "host1", "https://devstatus.eduaiia.com/")
    assert "health redis recovered" in text and "devstatus" in text


def test_a_flapping_check_never_floods_the_channel():
    mem: dict[str, AlertMemory] = {}
    sent = []
    for i in range(60):  # an hour of flapping, one run a minute
        state = CRIT if i % 2 == 0 else OK
        events, mem = m.decide_alerts(checks(state), mem, NOW + i * 60)
        sent += events
    assert len(sent) == m.ALERT_LIMIT  # 3 in the hour, the rest held
    assert mem["health:redis"].held >= 25  # each change away from what was said
    # An hour later the budget frees: the next change is sent and says what was held.
    events, mem = m.decide_alerts(checks(CRIT), mem, NOW + 2 * 3600)
    events2, mem = m.decide_alerts(checks(OK), mem, NOW + 2 * 3600 + 60)
    announced = events or events2
    assert announced and announced[0].held >= 25
    assert "held back: flapping" in m.alert_message(announced, CRIT, "h", "u")


def test_escalation_is_announced_and_every_check_has_its_own_budget():
    _, mem = m.decide_alerts(checks(WARN), {}, NOW)
    events, mem = m.decide_alerts(checks(CRIT), mem, NOW + 60)
    assert [(e.old, e.new) for e in events] == [(WARN, CRIT)]
    both = checks(CRIT, "redis") + checks(CRIT, "nginx")
    events, _ = m.decide_alerts(both, {}, NOW)
    assert {e.subject for e in events} == {"redis", "nginx"}
    text = m.alert_message(events, CRIT, "h", "u")
    assert text.count("\n") == 3  # one message: header, two lines, the page


def test_report_summary_json_and_table():
    report = m.Report(NOW, [*checks(CRIT), Check("cpu_percent", "host", WARN, 70.0, "%", 60, 85)])
    assert report.state == CRIT and report.exit_code == 2
    assert report.summary() == "CRIT: health redis CRIT, CPU host WARN"
    data = report.to_json()
    assert data["time"] == "2026-11-26T12:00:00Z"
    assert data["checks"][1]["threshold"] == "60 / 85%"
    rows = m.table_rows(report.checks)
    assert rows[0][:4] == ["health", "redis", "", "CRIT"]


# --- the store ---------------------------------------------------------------------------------


def test_store_merges_minutes_keeps_alert_memory_and_stays_bounded(tmp_path):
    path = tmp_path / "h.sqlite3"
    with Store(path) as store:
        a = HttpStats()
        a.add(200, 10)
        store.add_http({("eduaiia.com", 600): a})
        b = HttpStats()
        b.add(500, 20)
        store.add_http({("eduaiia.com", 600): b})  # the same minute, read by two runs
        ((_, _, merged),) = store.http(0)
        assert (merged.requests, merged.errors) == (2, 1)
        c = HttpStats()
        c.add(200, 600)
        store.add_http({("eduaiia.com", 660): c, ("eduaiia.com", 960): c})
        points = store.http_binned(600, 300)  # 600-899 and 900-1199
        assert [(v, p, s.requests, s.errors) for v, p, s in points] == [
            ("eduaiia.com", 600, 3, 1),
            ("eduaiia.com", 900, 1, 0),
        ]
        assert points[0][2].hist == a.merge(b).merge(c).hist
        store.save_alert_memory({"health:redis": AlertMemory(CRIT, [NOW], 2)})
        assert store.alert_memory() == {"health:redis": AlertMemory(CRIT, [NOW], 2)}
        store.put("access_log", {"inode": 1, "pos": 10})
        assert store.get("access_log") == {"inode": 1, "pos": 10}

        # Ten days of one-minute runs: 10 probes and 3 vhosts each minute.
        store.begin()
        for i in range(10 * 1440):
            ts = NOW - 10 * 86400 + i * 60
            store.add_probes(ts, {f"s{j}": True for j in range(10)})
            store.add_http({(f"v{j}", int(ts)): a for j in range(3)})
            store.add_run(ts, OK, 900, 60000)
        store.commit()
        full = store.size()
        store.begin()
        store.prune(NOW)
        store.commit()
        store.vacuum()
        assert min(ts for ts, _ in store.probes(0)["s0"]) >= NOW - 8 * 86400
        assert store.size() < full
        assert store.size() < 12 * 2**20  # a few MB for eight days
    assert sqlite3.connect(path).execute("pragma auto_vacuum").fetchone()[0] == 2


# --- the page ------------------------------------------------------------------------------------


def test_svg_chart_draws_lines_gaps_and_thresholds():
    points = [(NOW + i * 60, None if i in (3, 4) else float(i)) for i in range(10)]
    svg = svg_chart(points, NOW, NOW + 540, "%", [(5, "#b7791f", "warn 5 %")], title="x")
    assert svg.startswith("<svg") and svg.endswith("</svg>")
    assert svg.count("<polyline") == 2  # the gap splits the line
    assert "warn 5 %" in svg and "stroke-dasharray" in svg
    empty = svg_chart([(NOW, None)], NOW, NOW + 60, "ms", [(500, "#c00", "warn 500 ms")])
    assert "no requests yet" in empty and "(above the scale)" in empty


def test_status_page_renders_every_section_from_data(stack, tmp_path):
    from aiia_ops.commands.statuspage import build_page_data

    report = m.Report(
        NOW,
        [
            *checks(CRIT, "redis"),
            Check("health", "eduaiia.com", OK, env="prod", detail="https HTTP 200 in 9 ms"),
            Check("cert_days", "eduaiia.com", OK, 80.0, "days", 30, 7, below=True),
        ],
        {
            "vhosts": {"eduaiia.com": "prod"},
            "backups": {"prod": {"last": None}},
            "deploys": [{"time": "2026-11-26T11:00:00Z", "env": "prod", "action": "deploy",
                         "commit": "abcdef1234567890", "result": "good", "duration_s": 41}],
        },
    )  # fmt: skip
    with Store(tmp_path / "h.sqlite3") as store:
        s = HttpStats()
        s.add(200, 30)
        store.add_http({("eduaiia.com", int(NOW - 600) // 60 * 60): s})
        page = build_page_data(stack, report, store, NOW)
    html = render(page)
    assert "Outage or critical condition" in html
    assert html.count("<svg") == 12  # p95 + errors, 24 h + 7 d, for prod, staging, status
    assert "none yet" in html and "abcdef123456" in html
    assert "<script" not in html and "http://" not in html.replace("http://www.w3.org", "")
    published = publish(tmp_path / "status", page)
    assert published.read_text() == html
    assert json.loads((tmp_path / "status" / "status.json").read_text())["state"] == CRIT
    assert oct(published.stat().st_mode & 0o777) == "0o644"


def test_availability_in_sql_equals_the_pure_function(tmp_path):
    import random

    rng = random.Random(7)
    probes, ts = [], NOW - 2 * 86400
    while ts < NOW - 30:
        probes.append((ts, rng.random() > 0.05))
        ts += rng.choice([5, 60, 60, 60, 300])  # quick re-runs, cron, a gap
    with Store(tmp_path / "h.sqlite3") as store:
        for when, ok in probes:
            store.add_probes(when, {"redis": ok})
        for window in (86400, 7 * 86400):
            n, down, first = store.downtime(NOW - window, NOW, 60)["redis"]
            expected = m.availability(probes, NOW, window, 60)
            assert m.availability_percent(down, window) == expected
            assert n == sum(1 for t, _ in probes if t >= NOW - window)
            assert first == min(t for t, _ in probes if t >= NOW - window)


def test_status_page_has_an_off_site_card_when_archiving_reports(stack, tmp_path):
    from aiia_ops.commands.statuspage import build_page_data
    from aiia_ops.model.load import stack_from_data
    from tests.stackfiles import patched_stack

    pitr = stack_from_data(patched_stack({"backups": {"pitr": {"enabled": True}}})).backups.pitr
    facts = {"archive_lag_s": 1200.0, "backup_age_s": 3600.0, "last_archived_wal": "0001",
             "waiting_segments": 3, "status": "ok", "reachable": False}  # fmt: skip
    report = m.Report(NOW, m.archive_checks(facts, pitr), {})
    page = build_page_data(stack, report, None, NOW)
    cards = {c["subject"]: c for c in page["shared"]}
    assert [c["metric"] for c in cards["repo1"]["checks"]] == ["base_backup_age", "repository"]
    assert cards["repo1"]["state"] == CRIT and cards["postgresql"]["state"] == CRIT
    html = render(page)
    assert "off-site backups (repo1)" in html and "WAL archive lag" in html
    assert "off-site backups" not in render(
        build_page_data(stack, m.Report(NOW, [], {}), None, NOW)
    )


# --- level 4: Patroni's primary and each replica's lag ---------------------------------------


def _members(*rows):
    from aiia_ops.commands.patroni import MemberState

    return [MemberState(n, f"10.77.0.{20 + i}", role, state, tl, None)
            for i, (n, role, state, tl) in enumerate(rows)]  # fmt: skip


def test_replication_checks_name_the_primary_and_grade_each_replicas_lag():
    states = _members(("lab15", "Replica", "streaming", 2), ("lab16", "Leader", "running", 2),
                      ("lab17", "Replica", "streaming", 2))  # fmt: skip
    lag = {"lab15": ("streaming", 1024.0, 3.0), "lab17": ("streaming", 0.75 * 2**20, 40.0)}
    checks = m.replication_checks(["lab15", "lab16", "lab17"], states, lag, 1.0)
    got = [(c.metric, c.subject, c.state, c.value) for c in checks]
    assert got == [("db_primary", "patroni", OK, 2),
                   ("replication_lag", "patroni/lab15", OK, 0.001),
                   ("replication_lag", "patroni/lab17", WARN, 0.75)]  # fmt: skip
    assert checks[0].detail == "lab16 (10.77.0.21), timeline 2; 3 of 3 members answer"
    assert checks[1].detail == "streaming, replay 3 ms, timeline 2"
    assert (checks[2].warning, checks[2].critical) == (0.5, 1.0)


def test_replication_checks_no_primary_and_a_dead_replica_are_critical():
    states = _members(("lab16", "Replica", "running", 2), ("lab17", "Replica", "streaming", 2))
    checks = m.replication_checks(["lab15", "lab16", "lab17"], states, {}, 1.0)
    assert checks[0].state == CRIT
    assert checks[0].detail == "no primary: lab16 Replica running, lab17 Replica streaming"
    # after a failover: lab15 (the old primary) is gone until it rejoins
    states = _members(("lab16", "Leader", "running", 3), ("lab17", "Replica", "streaming", 3))
    lag = {"lab17": ("streaming", 0.0, 0.0)}
    checks = m.replication_checks(["lab15", "lab16", "lab17"], states, lag, 1.0)
    assert [(c.subject, c.state, c.detail) for c in checks[1:]] == [
        ("patroni/lab15", CRIT, "not in the cluster"),
        ("patroni/lab17", OK, "streaming, replay 0 ms, timeline 3"),
    ]
    far = {"lab17": ("streaming", 3.0 * 2**20, None)}
    assert m.replication_checks(["lab16", "lab17"], states, far, 1.0)[1].state == CRIT


def test_the_primarys_pg_stat_replication_is_parsed_per_member():
    from aiia_ops.commands import patroni as p

    text = "lab16|streaming|1048576|2.5\nlab17|catchup||0\n\nbad line\n"
    assert p.parse_replication(text) == {
        "lab16": ("streaming", 1048576.0, 2.5), "lab17": ("catchup", None, 0.0)}  # fmt: skip
    assert p.replication_argv()[-1] == p.REPLICATION_SQL


def test_status_page_has_a_patroni_card_when_the_stack_replicates(stack):
    from aiia_ops.commands.statuspage import build_page_data

    states = _members(("lab15", "Leader", "running", 1), ("lab16", "Replica", "streaming", 1))
    checks = m.replication_checks(["lab15", "lab16"], states, {"lab16": ("streaming", 0.0, 1.0)},
                                  1.0)  # fmt: skip
    page = build_page_data(stack, m.Report(NOW, checks, {}), None, NOW)
    card = next(c for c in page["shared"] if c["subject"] == "patroni")
    assert card["title"] == "replicated database (Patroni)" and card["state"] == OK
    html = render(page)
    assert "lab15 (10.77.0.20), timeline 1" in html and "replication lag lab16" in html
    plain = build_page_data(stack, m.Report(NOW, [], {}), None, NOW)
    assert not any(c["subject"] == "patroni" for c in plain["shared"])
