"""invoke monitor [--json] [--quiet] [--watch]: the document's `make monitor`.

Exit codes are Nagios': 0 OK, 1 WARNING, 2 CRITICAL, 3 UNKNOWN (also when the monitor
itself cannot run). Cron runs `invoke monitor --quiet` every minute: that run records
the history, regenerates the status page and sends alerts; `--watch` only looks.
"""

from __future__ import annotations

import json
import sys
import time

from invoke import Exit

from aiia_ops.commands import monitor as m
from aiia_ops.errors import OpsError
from aiia_ops.flows.monitor import collect, run_once, store_path
from aiia_ops.flows.output import paint, table
from aiia_ops.host.monitor_store import Store
from aiia_ops.model import load_stack
from aiia_ops.model.placement import is_multi_host, is_one_remote_host
from aiia_ops.model.state import local_state_dir
from aiia_ops.tasks.common import task

UNKNOWN_EXIT = m.EXIT_CODES[m.UNKNOWN]


def _print_report(report: m.Report, out=None) -> None:
    out = out or sys.stdout
    print(table(m.TABLE_HEADERS, m.table_rows(report.checks), stream=out), file=out)
    print(f"\n{paint(report.state, stream=out)}  {report.summary()}", file=out)


@task(
    help={
        "json": "print the report as JSON for machines",
        "quiet": "print nothing; only the exit code (what cron runs every minute)",
        "watch": "repeat at the document's intervals with a live display (records nothing)",
        "times": "with --watch: stop after this many refreshes (0 = until Ctrl-C)",
    }
)
def monitor(c, json_=False, quiet=False, watch=False, times=0, stack=None, profile=None):
    """Every metric against its threshold; status page, history and alerts (exit 0/1/2/3).
    A stack on several hosts: each host's engine and containers over SSH, each environment
    through the load balancer (a host that does not answer is CRITICAL by name)."""
    try:
        model = load_stack(stack, profile)
        state = local_state_dir(model)
        if (is_multi_host(model) or is_one_remote_host(model)) and model.runtime != "swarm":
            from aiia_ops.flows.cluster_monitor import cluster_report

            report = cluster_report(model, state)
            code = report.exit_code
            if json_:
                print(json.dumps(report.to_json(), indent=2, default=str))
            elif not quiet:
                _print_report(report)
        elif watch:
            code = _watch(model, state, int(times))
        else:
            report, outcome = run_once(model, state)
            code = report.exit_code
            if json_:
                print(json.dumps({**report.to_json(), "outcome": outcome}, indent=2, default=str))
            elif not quiet:
                _print_report(report)
                print(f"status page: {outcome['page']}")
                if outcome["alerts"]:
                    print(f"alert ({len(outcome['alerts'])} changes): {outcome['alert_result']}")
    except OpsError as exc:
        raise Exit(f"UNKNOWN: {exc}", code=UNKNOWN_EXIT) from None
    if code:
        raise Exit(code=code)


def _watch(model, state, times: int) -> int:
    """Collect every `tick` (the shortest interval of the document's table); a metric's
    value is replaced only when its own interval has passed, so each row refreshes at the
    document's pace (CPU/memory 60 s, disk 300 s, connections and cache 30 s, ...)."""
    every = m.schedule(model.monitoring.metrics)
    every["health"] = min(every.values())  # Django/nginx 30 s; read from Docker's checks
    every["cert_days"] = every["disk_percent"]
    tick = min(every.values())
    shown: dict[str, tuple[float, m.Check]] = {}
    previous = None
    count, code = 0, UNKNOWN_EXIT
    with Store(store_path(state)) as store:
        previous = store.get("cpu")
        try:
            while True:
                collected = collect(model, state, store, previous)
                previous = collected.counters
                now = time.time()
                for check in collected.report.checks:
                    seen = shown.get(check.key)
                    due = every.get(check.metric, tick)
                    if seen is None or now - seen[0] >= due - 1:
                        shown[check.key] = (now, check)
                report = m.Report(now, [c for _, c in shown.values()])
                code = report.exit_code
                count += 1
                _draw(report, tick, now)
                if times and count >= times:
                    return code
                time.sleep(max(0.0, tick - (time.time() - now)))
        except KeyboardInterrupt:
            return code


def _draw(report: m.Report, tick: float, now: float) -> None:
    out = sys.stdout
    if out.isatty():
        out.write("\033[H\033[2J")
    stamp = time.strftime("%H:%M:%S", time.localtime(now))
    nxt = time.strftime("%H:%M:%S", time.localtime(now + tick))
    print(f"aiia monitor  {stamp}  next refresh {nxt}  (Ctrl-C to stop)\n")
    _print_report(report, out)
    out.flush()
