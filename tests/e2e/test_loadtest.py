"""invoke loadtest on the stack `invoke setup` brought up: a few seconds of the mixed
scenario and both ceilings. It asserts zero errors and a complete report, not speed
(the figures live in docs/performance.md)."""

from __future__ import annotations

import json
import subprocess

import pytest

from tests.conftest import run_invoke

pytestmark = [pytest.mark.docker, pytest.mark.e2e]


def test_a_short_mixed_load_has_no_errors(stack_up, stack, tmp_path):
    proc = run_invoke(
        "loadtest", "--env=prod", "--users", "8", "--duration", "4",
        "--ceiling-duration", "2", "--scenario", "mixed", "--out", str(tmp_path),
        timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert "req/s" in proc.stdout and "mixed, 8 users" in proc.stdout  # the tables
    report = json.loads((tmp_path / "mixed-8u.json").read_text())
    assert (tmp_path / "mixed-8u.svg").read_text().startswith("<svg")
    assert [p["name"] for p in report["phases"]] == ["nginx-static", "bare-gunicorn", "mixed"]
    for phase in report["phases"]:
        assert phase["requests"] > 0, phase["name"]
        assert phase["error_count"] == 0, (phase["name"], phase["errors"], phase["statuses"])
    (mixed,) = [p for p in report["phases"] if p["name"] == "mixed"]
    assert set(mixed["sent"]) == {"list", "detail", "static", "health", "write"}
    assert mixed["statuses"]["by_status"].get("201", 0) > 0, "the writes were accepted"
    services = {c["service"] for c in mixed["containers"]}
    assert {"nginx", "postgresql", "pgbouncer", "redis", "django_prod"} <= services
    assert all(c["samples"] > 0 for c in mixed["containers"]), "the engine's stats were read"
    assert report["integrity"]["ok"], report["integrity"]["problems"]
    # The ceiling's bare app is gone again.
    name = f"{stack.project}_loadtest_bare"
    left = subprocess.run(
        ["docker", "ps", "-aq", "--filter", f"name={name}"], capture_output=True, text=True
    )
    assert left.stdout.split() == []
