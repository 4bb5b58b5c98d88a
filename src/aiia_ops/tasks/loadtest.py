"""invoke loadtest: wrk against the stack on this machine, with ceilings, stats and charts.

The procedure is aiia_ops.flows.loadtest; the pure part (scenarios, the wrk script, parsing,
the report, the charts) is aiia_ops.commands.loadtest.
"""

from __future__ import annotations

import sys
from pathlib import Path

from aiia_ops.commands import loadtest as lt
from aiia_ops.flows import loadtest as flow
from aiia_ops.tasks.common import load, task


@task(
    help={
        "env": "environment to load: prod or staging",
        "users": "concurrent users (keep-alive connections without think time); "
        "a list like 10,50,100,200,400 runs a growth series",
        "duration": "seconds per scenario run",
        "scenario": f"one of: {', '.join(lt.SCENARIOS)}",
        "ceilings": "also measure the ceilings (nginx static file, bare gunicorn) at each "
        "number of users (default on)",
        "ceiling_duration": "seconds per ceiling run",
        "threads": "wrk threads",
        "timeout": "seconds after which wrk counts a request as timed out",
        "out": "folder for the JSON report and the SVG chart (default docs/loadtest)",
    }
)
def loadtest(
    c,
    env="prod",
    users="100",
    duration=60,
    scenario="mixed",
    ceilings=True,
    ceiling_duration=15,
    threads=2,
    timeout=5,
    out=None,
    stack=None,
):
    """Load the stack on this machine with wrk from 127.0.0.1; report, JSON and SVG chart."""
    model, state = load(stack)
    lt.scenario(scenario)  # an unknown name fails before anything runs
    options = flow.Options(
        env=env,
        users=tuple(lt.parse_users(users)),
        duration=int(duration),
        scenario=scenario,
        ceilings=bool(ceilings),
        ceiling_duration=int(ceiling_duration),
        threads=int(threads),
        timeout=int(timeout),
        out=Path(out) if out else None,
        command=" ".join(["invoke", *sys.argv[1:]]) if sys.argv[1:] else "invoke loadtest",
    )
    flow.loadtest(model, state, options)
