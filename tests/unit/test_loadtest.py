"""The load test's pure core as data: scenarios, the wrk command and script, parsers, math."""

from __future__ import annotations

import json
import xml.etree.ElementTree as ET
from datetime import UTC, datetime

import pytest

from aiia_ops.commands import loadtest as lt
from aiia_ops.commands.accesslog import AccessLine, parse_line, parse_lines
from aiia_ops.commands.engine import Usage as Counters
from aiia_ops.commands.engine import parse_cgroups
from aiia_ops.errors import OpsError
from aiia_ops.model import load_stack

TARGET = lt.Target(
    domain="eduaiia.com", port=50443, detail_slugs=lt.seed_slugs(3), token="s3cret-token"
)

WRK_OUT = """Running 5s test @ https://eduaiia.com:50443/
  2 threads and 10 connections
AIIA_LOADTEST {"duration_us":5000000,"requests":5000,"bytes":123456,"errors":{"connect":0,\
"read":1,"write":0,"status":2,"timeout":3},"latency_us":{"min":800,"mean":9500.0,"max":90000,\
"p50":8000,"p90":15000,"p95":20000,"p99":40000,"p999":80000},"sent":{"list":2000,"static":3000}}
"""


def test_scenario_weights_add_up_to_100():
    for sc in [*lt.SCENARIOS.values(), *lt.CEILINGS.values()]:
        assert sum(m.weight for m in sc.mix) == 100, sc.name
        assert all(m.kind in lt.KINDS for m in sc.mix)


def test_mixed_scenario_proportions():
    mixed = {m.kind: m.weight for m in lt.SCENARIOS["mixed"].mix}
    assert mixed == {"list": 42, "detail": 25, "static": 30, "health": 1, "write": 2}
    assert lt.SCENARIOS["mixed"].writes and not lt.SCENARIOS["reads"].writes
    assert lt.SCENARIOS["mixed"].app_share == pytest.approx(0.70)
    assert lt.SCENARIOS["static"].app_share == 0


def test_unknown_scenario_names_the_known_ones():
    with pytest.raises(OpsError, match="unknown scenario 'nope'; expected one of: mixed, static"):
        lt.scenario("nope")


@pytest.mark.parametrize(
    "text, users", [("100", [100]), (100, [100]), ("10,50,100,200,400", [10, 50, 100, 200, 400])]
)
def test_users(text, users):
    assert lt.parse_users(text) == users


@pytest.mark.parametrize("text", ["", "0", "ten", "10,x", "9999"])
def test_bad_users(text):
    with pytest.raises(OpsError, match="--users must be a number from 1 to 5000"):
        lt.parse_users(text)


def test_wrk_command():
    argv = lt.wrk_argv(100, 60, "/tmp/s.lua", TARGET.url())
    assert " ".join(argv) == (
        "wrk --threads 2 --connections 100 --duration 60s --timeout 5s "
        "--script /tmp/s.lua https://eduaiia.com:50443/"
    )


def test_wrk_never_has_more_threads_than_connections():
    assert lt.wrk_argv(1, 3, "s.lua", "https://x:1/", threads=2)[:4] == [
        "wrk",
        "--threads",
        "1",
        "--connections",
    ]


def test_script_resolves_nothing_first_of_all():
    script = lt.lua_script(lt.SCENARIOS["mixed"], TARGET, "ab12")
    code = [line for line in script.splitlines() if line and not line.startswith("--")]
    assert code[:3] == [
        "wrk.resolve = function(host, service)",
        '    wrk.addrs = wrk.lookup("127.0.0.1", service)',
        "end",
    ]


def test_script_builds_the_mix():
    script = lt.lua_script(lt.SCENARIOS["mixed"], TARGET, "ab12", seed=7)
    assert 'local names = {"list", "detail", "static", "health", "write"}' in script
    assert "local cumulative = {42, 67, 97, 98, 100}" in script
    assert "local total = 100" in script
    assert 'wrk.format("GET", "/api/courses/?page=3", {["Accept-Encoding"] = "gzip"})' in script
    assert '"/api/courses/loadtest-seed-03/"' in script
    assert '"/static/admin/css/base.css"' in script
    assert '["Authorization"] = "Bearer s3cret-token"' in script
    assert 'local run = "ab12"' in script
    assert "math.randomseed(7 + 7919 * (id or 1))" in script
    assert 'wrk.format("POST", "/api/courses/", write_headers, body)' in script


def test_the_app_scenario_bypasses_the_edge_cache():
    app = lt.SCENARIOS["app"]
    assert app.app_share == 1 and app.bypass_edge_cache
    script = lt.lua_script(app, TARGET, "x")
    assert (
        'wrk.format("GET", "/api/courses/?page=1", {["Accept-Encoding"] = "gzip", '
        '["Authorization"] = "Bearer edge-cache-bypass"})' in script
    )
    mixed = lt.lua_script(lt.SCENARIOS["mixed"], TARGET, "x")
    assert "edge-cache-bypass" not in mixed


def test_mixed_without_the_edge_cache_is_the_same_mix_with_reads_bypassing_it():
    mixed, off = lt.SCENARIOS["mixed"], lt.SCENARIOS["mixed-no-edge"]
    assert off.mix == mixed.mix and off.bypass_edge_cache and not mixed.bypass_edge_cache
    script = lt.lua_script(off, TARGET, "x")
    assert '"/api/courses/?page=1", {["Accept-Encoding"] = "gzip", ["Authorization"]' in script


def test_script_without_writes_holds_no_token():
    script = lt.lua_script(lt.SCENARIOS["reads"], TARGET, "x")
    assert "s3cret" not in script and "Authorization" not in script


def test_a_writing_scenario_needs_the_token():
    with pytest.raises(ValueError, match="needs the API write token"):
        lt.lua_script(lt.SCENARIOS["mixed"], lt.Target("eduaiia.com", 1, lt.seed_slugs(1)), "x")


def test_ceiling_scripts():
    static = lt.lua_script(lt.CEILINGS["nginx-static"], TARGET, "x")
    assert 'wrk.format("GET", "/static/admin/img/icon-yes.svg", {})' in static
    bare = lt.lua_script(lt.CEILINGS["bare-gunicorn"], lt.Target(lt.BARE_DOMAIN, 1), "x")
    assert 'wrk.format("GET", "/", {})' in bare


def test_lua_strings_are_escaped():
    assert lt.lua_str('a"b\\c\nd') == '"a\\"b\\\\c\\nd"'


def test_parse_wrk():
    r = lt.parse_wrk(WRK_OUT)
    assert r.requests == 5000 and r.duration_s == 5.0 and r.rps == 1000.0
    assert r.latency_ms == {
        "min": 0.8,
        "mean": 9.5,
        "max": 90.0,
        "p50": 8.0,
        "p90": 15.0,
        "p95": 20.0,
        "p99": 40.0,
        "p999": 80.0,
    }
    assert r.error_count == 6
    assert r.error_rate == pytest.approx(6 / 5003)
    assert r.sent == {"list": 2000, "static": 3000}


def test_parse_wrk_without_its_line():
    with pytest.raises(OpsError, match="wrk printed no result line"):
        lt.parse_wrk("unable to connect to 127.0.0.1:50443 Connection refused\n")


@pytest.mark.parametrize(
    "values, p, expected",
    [
        ([], 95, 0.0),
        ([5.0], 99, 5.0),
        (list(range(1, 101)), 50, 50),
        (list(range(1, 101)), 95, 95),
        (list(range(1, 101)), 99, 99),
        ([3, 1, 2], 100, 3),
        ([10, 20, 30, 40], 50, 20),
    ],
)
def test_percentile_nearest_rank(values, p, expected):
    assert lt.percentile(values, p) == expected


def _log(t: str, status="200", rt="0.010", vhost="eduaiia.com", up="172.20.0.3:8000") -> str:
    return json.dumps(
        {"time": t, "vhost": vhost, "status": status, "request_time": rt, "uri": "/x",
         "upstream_addr": up}
    )  # fmt: skip


def test_access_log_line():
    line = parse_line(_log("2026-11-26T16:00:01+00:00", "503", "0.001", up=""))
    assert line == AccessLine(
        t=datetime(2026, 11, 26, 16, 0, 1, tzinfo=UTC).timestamp(),
        vhost="eduaiia.com",
        status=503,
        request_time_ms=1.0,
        uri="/x",
        upstream=False,
    )
    assert parse_line("not json") is None
    assert parse_line('{"time": "x"}') is None


def test_timeseries_per_second():
    start = datetime(2026, 11, 26, 16, 0, 0, tzinfo=UTC).timestamp()
    raw = [
        _log("2026-11-26T16:00:00+00:00", rt="0.010"),
        _log("2026-11-26T16:00:00+00:00", rt="0.030"),
        _log("2026-11-26T16:00:01+00:00", "503", "0.000", up=""),
        _log("2026-11-26T16:00:01+00:00", "201", "0.050"),
        _log("2026-11-26T16:00:01+00:00", vhost="_"),  # another vhost: not counted
    ]
    lines = list(parse_lines(raw))
    secs = lt.timeseries(lines, start + 0.4, start + 1.9, {"eduaiia.com"})
    assert [(s.t, s.requests, s.errors, s.shed) for s in secs] == [(0, 2, 0, 0), (1, 2, 1, 1)]
    assert (secs[0].p50_ms, secs[0].p95_ms) == (10.0, 30.0)
    counts = lt.status_counts(lines, start, start + 2, {"eduaiia.com"})
    assert counts == {
        "by_status": {"200": 2, "201": 1, "503": 1},
        "answered_by_app": 3,
        "shed": 1,
        "shed_p99_ms": 0.0,
    }


def _counters(cpu_ns, usage, inactive=0):
    """What host/engine.Engine.usage reads of one container (its cgroup files)."""
    return Counters(usage, inactive, None, None, cpu_ns, 0, "cgroup v1")


def test_engine_counters_make_a_sample():
    # 1e9 ns of CPU time more than a second ago = 1 core; page cache the kernel can drop
    # is not used memory (THE formula, commands/engine.memory_used)
    s = lt.sample("c", (9.0, 1e9), _counters(2e9, 100 * lt.MB, 20 * lt.MB), 10.0)
    assert s == lt.Sample(t=10.0, container="c", cpu=1.0, memory=80 * lt.MB)
    half = lt.sample("c", (8.0, 1e9), _counters(2e9, 10), 10.0)
    assert half.cpu == 0.5


def test_first_reading_has_no_cpu_difference():
    assert lt.sample("c", None, _counters(5, 1), 1.0) is None
    assert lt.sample("c", (0.5, 0), None, 1.0) is None  # nothing could be read
    assert lt.sample("c", (0.5, 0), _counters(None, 1), 1.0) is None  # no CPU counter
    assert lt.sample("c", (0.5, 10**9), _counters(5, 1), 1.0) is None  # restarted meanwhile


def test_a_sample_from_the_cgroup_files():
    cid = "f" * 64
    base = f"/sys/fs/cgroup/memory/docker/{cid}"
    grep = (
        f"{base}/memory.usage_in_bytes:{100 * lt.MB}\n"
        f"{base}/memory.stat:total_inactive_file {30 * lt.MB}\n"
        f"/sys/fs/cgroup/cpuacct/docker/{cid}/cpuacct.usage:3000000000\n"
    )
    counters = parse_cgroups(grep, [cid])[cid]
    s = lt.sample("c", (1.0, 2 * 10**9), counters, 3.0)
    assert (s.cpu, s.memory) == (0.5, 70 * lt.MB)


def test_usage_and_stack_peak():
    samples = [
        lt.Sample(1.0, "a", 0.5, 10 * lt.MB),
        lt.Sample(1.2, "b", 0.2, 30 * lt.MB),
        lt.Sample(2.1, "a", 1.0, 20 * lt.MB),  # b has no entry this second: its last value counts
        lt.Sample(3.0, "b", 0.1, 5 * lt.MB),
        lt.Sample(50.0, "a", 2.0, 99 * lt.MB),  # after the phase
    ]
    rows = lt.usage(samples, 0, 3, {"a": "nginx", "b": "redis"}, {"a": (0.5, 24 * lt.MB)})
    assert rows[0] == lt.Usage("a", "nginx", 1.0, 0.75, 0.5, 20 * lt.MB, 24 * lt.MB, 2)
    assert rows[1] == lt.Usage("b", "redis", 0.2, 0.15, None, 30 * lt.MB, None, 2)
    assert lt.stack_memory_peak(samples, 0, 3, {"a", "b"}) == 50 * lt.MB
    assert lt.memory_series(samples, 0, 3, {"a": "nginx"}) == {"nginx": [(1.0, 10.0), (2.1, 20.0)]}


def _phase(name="mixed", kind="scenario", users=100, rps=1200.0, p95=80.0, errors=0, mem=300):
    wrk = lt.WrkResult(
        duration_s=10,
        requests=int(rps * 10),
        bytes=1,
        errors={"connect": 0, "read": 0, "write": 0, "status": errors, "timeout": 0},
        latency_ms={
            "min": 1,
            "mean": 20,
            "max": 200,
            "p50": 20,
            "p90": 60,
            "p95": p95,
            "p99": 120,
            "p999": 180,
        },
        sent={"list": 1},
    )
    return lt.Phase(
        name=name,
        kind=kind,
        users=users,
        duration_s=10,
        started=0.0,
        ended=10.0,
        loadavg_before=(1.5, 1.0, 0.5),
        loadavg_after=(2.0, 1.0, 0.5),
        wrk=wrk,
        seconds=[lt.Second(0, 1200, 0, 0, 10, 80, 120), lt.Second(1, 1180, 0, 0, 11, 82, 125)],
        statuses={"by_status": {"200": int(rps * 10)}, "shed": 0, "shed_p99_ms": 0.0},
        usage=[lt.Usage("x_nginx", "nginx", 0.5, 0.45, 0.5, 12 * lt.MB, 24 * lt.MB, 10)],
        stack_memory_peak=mem * lt.MB,
        memory_series={"nginx": [(0.0, 10.0), (1.0, 12.0)]},
    )


def test_goals():
    met = lt.goals(_phase())
    assert [(g.figure, g.target, g.measured, g.met) for g in met] == [
        ("requests/s", ">= 1,000", "1,200", True),
        ("p95 latency", "<= 100 ms", "80.0 ms", True),
        ("errors", "0", "0", True),
        ("whole stack memory (peak)", "<= 400 MB", "300 MB", True),
    ]
    missed = lt.goals(_phase(rps=800, p95=150, errors=3, mem=420))
    assert [g.met for g in missed] == [False, False, False, False]


def _report(phases):
    return lt.report_dict("invoke loadtest --users 100", "prod", phases, {"cpus": 2}, {"ok": True})


def test_report_ratios_and_goals():
    report = _report(
        [
            _phase("nginx-static", "ceiling", rps=6000),
            _phase("bare-gunicorn", "ceiling", rps=2400),
            _phase(),
        ]
    )
    assert report["conditions"].startswith("stack under its stack.yml limits")
    (step,) = report["steps"]
    assert step["ratios"] == {"nginx-static": 0.2, "bare-gunicorn": 0.5}
    assert [g["met"] for g in step["goals"]] == [True, True, True, True]
    json.dumps(report)  # JSON all the way down
    headers, rows = lt.summary_rows(report)
    assert headers[:5] == ["run", "users", "req/s", "vs nginx-static", "vs bare-gunicorn"]
    assert rows[2][:5] == ["mixed", "100", "1,200", "20%", "50%"]
    assert rows[0][3] == "-"  # a ceiling is not compared with itself
    assert lt.first_to_give(report["phases"][2]) == "nginx CPU (0.45 of 0.5)"


def test_charts_are_svg():
    report = _report([_phase("nginx-static", "ceiling", rps=6000), _phase()])
    svg = lt.render_run_svg(report, "mixed", 100)
    root = ET.fromstring(svg)
    assert root.tag == "{http://www.w3.org/2000/svg}svg"
    assert "<script" not in svg and "http://" not in svg.replace("http://www.w3.org/2000/svg", "")
    assert "ceiling nginx-static: 6,000/s" in svg
    growth = _report([_phase(users=u, rps=r) for u, r in ((10, 500), (100, 1200), (400, 1100))])
    root = ET.fromstring(lt.render_growth_svg(growth, "mixed"))
    assert root.tag == "{http://www.w3.org/2000/svg}svg"


def test_bare_vhost_follows_the_environment():
    stack = load_stack()
    prod = stack.environment("prod")
    conf = lt.bare_vhost_conf(stack, prod, "172.20.0.30")
    assert "server 172.20.0.30:8000;" in conf
    assert f"server_name {lt.BARE_DOMAIN};" in conf
    assert "ssl_certificate     /etc/nginx/ssl/live/eduaiia.com/fullchain.pem;" in conf
    assert f"keepalive {stack.services.nginx.settings.upstream_keepalive};" in conf
    assert "proxy_read_timeout 35s;" in conf


def test_bare_app_is_a_wsgi_app():
    namespace: dict = {}
    exec(compile(lt.BARE_APP, "bare.py", "exec"), namespace)
    seen = []
    body = namespace["application"]({}, lambda status, headers: seen.append((status, headers)))
    assert seen[0][0] == "200 OK" and b"".join(body) == b'{"status": "ok", "app": "bare"}'


def test_cleanup_deletes_only_what_the_writes_created():
    args = lt.cleanup_args()
    assert args[:3] == ["manage.py", "shell", "--command"]
    assert "mine = Course.objects.filter(slug__startswith='lt-')" in args[3]
    assert 'list(mine.values_list("id", flat=True)[:200])' in args[3]  # bounded memory
    compile(args[3], "cleanup", "exec")
    script = lt.lua_script(lt.SCENARIOS["mixed"], TARGET, "ab12")
    assert 'string.format("lt-%s-%d-%d", run, id or 1, written)' in script
    assert not lt.seed_slugs()[0].startswith(lt.WRITE_PREFIX)


def test_seed_courses():
    assert lt.seed_slugs(2) == ("loadtest-seed-01", "loadtest-seed-02")
    course = lt.seed_course("loadtest-seed-07")
    assert course["slug"] == "loadtest-seed-07" and len(course["lessons"]) == 3
