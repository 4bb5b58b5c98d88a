"""The status page (https://devstatus.eduaiia.com): static HTML with inline SVG charts,
rendered from data by every monitor run and published atomically into <state_dir>/status
(nginx serves it read-only from /srv/status). No JavaScript, no external assets: one
self-contained file, readable on a phone, plus status.json for machines.

`build_page_data()` gathers what the page shows from the report and the history;
`render()` is pure (data → HTML); `svg_chart()` is pure (points → SVG).
"""

from __future__ import annotations

import datetime as _dt
import json
from pathlib import Path

import jinja2

from aiia_ops.commands import charts
from aiia_ops.commands import monitor as m
from aiia_ops.commands.monitor import CRIT, OK, UNKNOWN, WARN, HttpStats, Report
from aiia_ops.model import Stack

TEMPLATES = Path(__file__).parents[1] / "templates"
DAY = 86400

_STATE_COLOUR = {OK: "#1a7f37", WARN: "#b7791f", CRIT: "#c62828", UNKNOWN: "#6b7280"}


def _utc(ts: float, fmt: str = "%Y-%m-%d %H:%M UTC") -> str:
    return _dt.datetime.fromtimestamp(ts, _dt.UTC).strftime(fmt)


# --- charts ------------------------------------------------------------------------------


def series(
    rows: list[tuple[str, int, HttpStats]], vhost: str, start: float, end: float, step: int
) -> list[tuple[float, HttpStats]]:
    """Stored minutes of one vhost → one merged HttpStats per `step` seconds."""
    n = int((end - start) // step) + 1
    bins = [HttpStats() for _ in range(n)]
    for v, minute, stats in rows:
        if v == vhost and start <= minute <= end:
            i = int((minute - start) // step)
            bins[i] = bins[i].merge(stats)
    return [(start + i * step, b) for i, b in enumerate(bins)]


def svg_chart(
    points: list[tuple[float, float | None]],
    start: float,
    end: float,
    unit: str,
    thresholds: list[tuple[float, str, str]] = (),
    ticks: list[tuple[float, str]] = (),
    colour: str = "#2563eb",
    title: str = "",
) -> str:
    """A small line + area chart (the chart engine, styled by the page's CSS). Gaps where a
    value is None (no requests); threshold lines drawn when they fall inside the scale (else
    named above the chart)."""
    chart = charts.Chart(
        series=[charts.Series(title, points, colour=colour, area=True)],
        title=title,
        unit=unit,
        x_range=(start, end),
        x_ticks=list(ticks),
        x_grid=True,
        thresholds=[charts.Threshold(value, label, col) for value, col, label in thresholds],
        headroom=1.2,
        legend=False,
        markers=0,
        empty="no requests yet",
        framed=True,
    )
    return charts.chart_svg(chart)


SPANS = {  # name: (length, seconds per point, seconds between x labels, label format)
    "24 hours": (DAY, 300, 6 * 3600, "%H:%M"),
    "7 days": (7 * DAY, 3600, DAY, "%a %d"),
}


def chart_rows(store, now: float) -> dict[str, list[tuple[str, int, HttpStats]]]:
    """Per span, the stored minutes already merged into its points (summed in SQL)."""
    out = {}
    for name, (length, step, _, _) in SPANS.items():
        start = (now - length) // step * step
        out[name] = store.http_binned(start, step) if store else []
    return out


def charts_for(
    rows: dict[str, list[tuple[str, int, HttpStats]]], vhost: str, now: float, t: m.Thresholds
) -> dict:
    out = {}
    spans = {
        name: (now - length, step, tick_step, fmt)
        for name, (length, step, tick_step, fmt) in SPANS.items()
    }
    for name, (start, step, tick_step, fmt) in spans.items():
        start = start // step * step
        bins = series(rows.get(name, []), vhost, start, now, step)
        ticks = charts.time_ticks(start, now, tick_step, fmt)
        p95 = [(ts, s.percentile(0.95)) for ts, s in bins]
        err = [(ts, s.error_percent) for ts, s in bins]
        total = HttpStats()
        for _, s in bins:
            total = total.merge(s)
        out[name] = {
            "requests": total.requests,
            "errors": total.errors,
            "p95": total.percentile(0.95),
            "error_percent": total.error_percent,
            "latency_svg": svg_chart(
                p95,
                start,
                now,
                "ms",
                [
                    (t.p95_ms[0], _STATE_COLOUR[WARN], f"warn {t.p95_ms[0]:g} ms"),
                    (t.p95_ms[1], _STATE_COLOUR[CRIT], f"crit {t.p95_ms[1]:g} ms"),
                ],
                ticks,
                "#2563eb",
                f"p95 latency of {vhost}, {name}",
            ),
            "errors_svg": svg_chart(
                err,
                start,
                now,
                "%",
                [
                    (t.error_percent[0], _STATE_COLOUR[WARN], f"warn {t.error_percent[0]:g} %"),
                    (t.error_percent[1], _STATE_COLOUR[CRIT], f"crit {t.error_percent[1]:g} %"),
                ],
                ticks,
                "#9333ea",
                f"5xx error rate of {vhost}, {name}",
            ),
        }
    return out


# --- the page's data ---------------------------------------------------------------------

OVERALL = {
    OK: "All systems operational",
    WARN: "Degraded: something needs attention",
    CRIT: "Outage or critical condition",
    UNKNOWN: "Partly unknown: some checks could not be read",
}


def build_page_data(stack: Stack, report: Report, store, now: float) -> dict:
    """Everything the page shows, as plain data (also written as status.json)."""
    t = m.Thresholds.from_metrics(stack.monitoring.metrics)
    interval = stack.monitoring.interval.seconds
    down_24h = store.downtime(now - DAY, now, interval) if store else {}
    down_7d = store.downtime(now - 7 * DAY, now, interval) if store else {}
    rows = chart_rows(store, now)
    by_subject: dict[str, list[m.Check]] = {}
    for c in report.checks:
        by_subject.setdefault(c.subject, []).append(c)

    def uptime(subject: str) -> dict:
        day, week = down_24h.get(subject), down_7d.get(subject)
        return {
            "24h": m.availability_percent(day[1], DAY) if day else None,
            "7d": m.availability_percent(week[1], 7 * DAY) if week else None,
            "since": _utc(week[2]) if week else None,
        }

    def card(subject: str, title: str, env: str | None) -> dict:
        checks = by_subject.get(subject, [])
        state = m.worst(c.state for c in checks) if checks else UNKNOWN
        return {
            "subject": subject,
            "title": title,
            "env": env,
            "state": state,
            "checks": [c.to_json() for c in m.sort_checks(checks)],
            "uptime": uptime(subject),
        }

    envs = []
    for env in stack.environments.values():
        domain = env.domains[0]
        key = f"django_{env.name}"
        cards = [card(domain, domain, env.name), card(key, f"app ({key})", env.name)]
        envs.append(
            {
                "name": env.name,
                "domains": env.domains,
                "state": m.worst(c["state"] for c in cards),
                "cards": cards,
                "charts": charts_for(rows, domain, now, t),
            }
        )
    status_domain = stack.status_domain
    shared = [card(s.name, s.name, None) for s in stack.services.all()]
    shared.append(card("docker", "docker engine", None))
    if "repo1" in by_subject:  # point-in-time recovery on: the off-site repository's checks
        shared.append(card("repo1", "off-site backups (repo1)", None))
    replication = [c for c in report.checks if c.subject.split("/")[0] == m.REPLICATION_SUBJECT]
    if replication:  # level 4: Patroni's primary and each replica's lag, on one card
        shared.append({
            "subject": m.REPLICATION_SUBJECT, "title": "replicated database (Patroni)",
            "env": None, "state": m.worst(c.state for c in replication),
            "checks": [c.to_json() for c in m.sort_checks(replication)],
            "uptime": uptime(m.REPLICATION_SUBJECT),
        })  # fmt: skip
    shared.append(card(status_domain, f"status page ({status_domain})", "status"))
    host = {
        c.key: c.to_json()
        for c in report.checks
        if c.subject == "host" or c.metric == "disk_percent"
    }
    certs = [c.to_json() for c in report.checks if c.metric == "cert_days"]
    return {
        "generated": _utc(now),
        "generated_ts": now,
        "state": report.state,
        "headline": OVERALL[report.state],
        "summary": report.summary(),
        "environments": envs,
        "shared": shared,
        "host": list(host.values()),
        "status_charts": charts_for(rows, status_domain, now, t),
        "status_domain": status_domain,
        "certificates": certs,
        "deploys": [
            {
                k: d.get(k)
                for k in ("time", "env", "action", "commit", "result", "duration_s", "detail")
            }
            for d in report.info.get("deploys", [])
        ],
        "backups": report.info.get("backups", {}),
        "checks": [c.to_json() for c in report.checks],
        "run": report.info.get("run", {}),
        "interval_s": interval,
        "http_window_min": m.HTTP_WINDOW_S // 60,
    }


# --- rendering and publishing ------------------------------------------------------------


def _env() -> jinja2.Environment:
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(TEMPLATES),
        autoescape=True,
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.globals["colour"] = _STATE_COLOUR
    env.filters["pct"] = lambda v: "–" if v is None else f"{v:.3f} %".replace(".000 %", " %")
    env.filters["ms"] = lambda v: "–" if v is None else f"{v:.0f} ms"
    return env


def render(page: dict) -> str:
    """Data → the whole HTML page (charts are pre-rendered SVG strings, marked safe)."""
    return _env().get_template("status.html.j2").render(page=page, safe=jinja2.utils.markupsafe)


def page_files(page: dict) -> dict[str, str]:
    """What is published into <state_dir>/status: index.html and status.json (flows/monitor
    writes them)."""
    return {
        "index.html": render(page),
        "status.json": json.dumps(
            {k: v for k, v in page.items() if k not in ("environments", "status_charts")}
            | {
                "environments": [
                    {k: v for k, v in e.items() if k != "charts"} for e in page["environments"]
                ]
            },
            indent=1,
            default=str,
        ),
    }
