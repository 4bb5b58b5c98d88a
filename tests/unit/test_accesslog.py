"""The one parser of nginx's JSON access log, as data."""

from __future__ import annotations

import json
from datetime import UTC, datetime

from aiia_ops.commands.accesslog import AccessLine, parse_line, parse_lines

WHEN = "2026-11-26T16:00:59+00:00"
T = datetime(2026, 11, 26, 16, 0, 59, tzinfo=UTC).timestamp()


def raw(**fields) -> str:
    base = {
        "time": WHEN,
        "vhost": "eduaiia.com",
        "host": "eduaiia.com",
        "status": "201",
        "request_time": "0.042",
        "uri": "/api/courses/?page=2",
        "upstream_addr": "172.20.0.10:8000",
        "user_agent": "curl/8",
        "referer": "",
    }
    return json.dumps({**base, **fields})


def test_every_field_both_readers_need():
    assert parse_line(raw()) == AccessLine(
        t=T,
        vhost="eduaiia.com",
        status=201,
        request_time_ms=42.0,
        uri="/api/courses/?page=2",
        upstream=True,
        user_agent="curl/8",
    )
    assert parse_line(raw()).minute == int(T) - 59  # the start of its minute, UTC


def test_answers_nginx_gave_alone_have_no_upstream():
    line = parse_line(raw(status="503", request_time="0.000", upstream_addr=""))
    assert (line.status, line.request_time_ms, line.upstream) == (503, 0.0, False)


def test_the_parser_keeps_what_a_reader_may_leave_out():
    # The catch-all server, a status-less line and any user agent are requests too: the
    # monitor filters them (commands/monitor.counted), the parser does not.
    assert parse_line(raw(vhost="_")).vhost == "_"
    assert parse_line(raw(status="000")).status == 0
    assert parse_line(raw(user_agent="aiia-monitor/1")).user_agent == "aiia-monitor/1"
    assert parse_line(json.dumps({"time": WHEN, "status": "200", "request_time": "0"})) == (
        AccessLine(t=T, vhost="", status=200, request_time_ms=0.0)
    )


def test_what_is_not_a_request_is_none():
    for bad in ("not json", "[1, 2]", '{"time": "x"}', '{"vhost": "eduaiia.com"}',
                raw(status="-"), raw(request_time="")):  # fmt: skip
        assert parse_line(bad) is None, bad


def test_many_lines_skip_the_broken_ones_in_order():
    lines = [raw(uri="/a"), "garbage", raw(uri="/b"), ""]
    assert [x.uri for x in parse_lines(lines)] == ["/a", "/b"]
