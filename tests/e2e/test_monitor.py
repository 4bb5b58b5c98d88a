"""Issue #7: `invoke monitor` against the whole stack brought up by `invoke setup`.

Every name, address and port comes from the stack file (AIIA_STACK): the e2e fixtures'
isolated stack (tests/e2e/conftest.py), beside whatever real stack the machine runs.
Redis is stopped twice here; both times it is started again before the test ends (the
session's stack is shared with the other e2e files). Tests run in file order: the burst of
5xx responses comes last, because it keeps the error rate red for the 5-minute window.
"""

from __future__ import annotations

import concurrent.futures
import http.server
import json
import os
import re
import shutil
import sqlite3
import subprocess
import threading
import time
from pathlib import Path

import pytest

from aiia_ops.commands import monitor as m
from aiia_ops.host.http import https_get
from tests.conftest import run_invoke

pytestmark = [pytest.mark.docker, pytest.mark.e2e]

CLIENT_UA = "e2e-monitor-test"
# Checks the stack itself decides must be OK. CPU, memory, disk and latency depend on the
# machine (shared, 2 cores, other builds running; a CI runner's disk) and, for the staging
# app's memory, on its 72 MB limit (it idles near the 70 % warning; docs/monitoring.md):
# for those the test asserts a value and the state that value gives.
FUNCTIONAL = {"health", "availability", "db_connections", "cache_memory", "http_error_percent",
              "cert_days"}  # fmt: skip


def _docker(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["docker", *args], capture_output=True, text=True, timeout=120)


def _monitor(*args: str, env: dict | None = None) -> tuple[int, dict]:
    proc = run_invoke("monitor", "--json", *args, env=env, timeout=300)
    assert proc.stdout.strip().startswith("{"), proc.stdout + proc.stderr
    data = json.loads(proc.stdout)
    assert proc.returncode == data["exit_code"], (proc.returncode, data["summary"])
    return proc.returncode, data


def _by_key(data: dict) -> dict[str, dict]:
    return {c["key"]: c for c in data["checks"]}


def _get(stack, domain: str, path: str, timeout: float = 10) -> int:
    try:
        status, _, _ = https_get(
            domain,
            path,
            port=stack.local_host.published(443),
            timeout=timeout,
            extra_headers={"User-Agent": CLIENT_UA},
        )
        return status
    except OSError:
        return 0


def _wait_logged(e2e_state: Path, count: int, status_prefix: str = "", timeout: float = 30):
    """nginx buffers the access log (flush every 5 s): wait until our lines are there."""
    log = e2e_state / "logs" / "nginx" / "access.log"
    deadline = time.monotonic() + timeout
    found = 0
    while time.monotonic() < deadline:
        lines = log.read_text().splitlines() if log.exists() else []
        found = sum(
            1
            for line in lines
            if CLIENT_UA in line and json.loads(line)["status"].startswith(status_prefix)
        )
        if found >= count:
            return
        time.sleep(1)
    pytest.fail(f"only {found} of {count} requests reached {log} within {timeout:.0f}s")


def _site_traffic(stack, e2e_state: Path, per_vhost: int = 10) -> None:
    """A little ordinary traffic on every vhost (bounded), so every HTTP metric has a value."""
    before = _count_logged(e2e_state)
    for env in stack.environments.values():
        for _ in range(per_vhost):
            assert _get(stack, env.domains[0], "/health/") == 200
    for _ in range(per_vhost):
        assert _get(stack, stack.status_domain, "/") == 200
    _wait_logged(e2e_state, before + per_vhost * (len(stack.environments) + 1))


def _count_logged(e2e_state: Path) -> int:
    log = e2e_state / "logs" / "nginx" / "access.log"
    return log.read_text().count(CLIENT_UA) if log.exists() else 0


def _wait_all_healthy(stack, timeout: float = 120) -> None:
    """Docker's first health check runs one interval (30 s for the apps) after a start:
    until then a container is "starting", which the monitor rightly calls WARN."""
    deadline = time.monotonic() + timeout
    names = [c.container for c in stack.containers()]
    while time.monotonic() < deadline:
        states = _docker("inspect", "--format", "{{.State.Health.Status}}", *names).stdout.split()
        if states == ["healthy"] * len(names):
            return
        time.sleep(2)
    pytest.fail(f"not every container was healthy within {timeout:.0f}s: {states}")


def _wait_healthy(stack, timeout: float = 120) -> None:
    """Redis healthy again, and both apps answering 200 through nginx."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        health = _docker(
            "inspect", "--format", "{{.State.Health.Status}}", stack.services.redis.container
        ).stdout.strip()
        if health == "healthy" and all(
            _get(stack, e.domains[0], "/health/") == 200 for e in stack.environments.values()
        ):
            return
        time.sleep(2)
    pytest.fail(f"the stack was not healthy again within {timeout:.0f}s")


class _Webhook:
    """A local stand-in for Slack's incoming webhook: records every message posted."""

    def __init__(self):
        self.messages: list[str] = []
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                outer.messages.append(json.loads(body)["text"])
                self.send_response(200)
                self.end_headers()
                self.wfile.write(b"ok")

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def webhook():
    hook = _Webhook()
    yield hook
    hook.close()


@pytest.fixture
def redis_restored(stack):
    """Whatever happens in the test, Redis runs and the apps are healthy afterwards."""
    yield stack.services.redis.container
    if _docker("inspect", "--format", "{{.State.Running}}", stack.services.redis.container)\
            .stdout.strip() != "true":  # fmt: skip
        _docker("start", stack.services.redis.container)
    _wait_healthy(stack)


# --- the tests -----------------------------------------------------------------------------


def test_every_metric_has_a_value_and_the_exit_code_follows_the_states(stack_up, stack, e2e_state):
    """Done when: `invoke monitor --json` reports every metric with a value and exits 0.

    Robust by design on a shared, noisy machine: everything the stack decides (health,
    availability, connections, cache, error rate, certificates) must be OK; CPU, memory,
    disk and latency must have a value and the state that value gives; the exit code must
    be exactly the one the per-metric states give, so it is 0 whenever those are under
    their warnings (with the committed limits the idle staging app's memory may WARN)."""
    _wait_all_healthy(stack)
    _site_traffic(stack, e2e_state)
    code, data = _monitor()
    checks = _by_key(data)
    services = [c.name for c in stack.services.all()]
    containers = [*services, *(f"django_{e}" for e in stack.environments)]
    vhosts = [e.domains[0] for e in stack.environments.values()] + [stack.status_domain]
    expected = (
        [f"cpu_percent:{s}" for s in ["host", *containers]]
        + [f"memory_percent:{s}" for s in ["host", *containers]]
        + ["db_connections:postgresql", "cache_memory:redis"]
        + [f"http_error_percent:{v}" for v in vhosts]
        + [f"http_latency_p95:{v}" for v in vhosts]
        + [f"health:{s}" for s in ["docker", *containers, *vhosts]]
        + [f"availability:{s}" for s in ["docker", *containers, *vhosts]]
        + [f"cert_days:{d}" for d in vhosts]
    )
    missing = [k for k in expected if k not in checks]
    assert not missing, missing
    assert any(k.startswith("disk_percent:") for k in checks)
    no_value = [k for k in expected if k.split(":")[0] != "health" and checks[k]["value"] is None]
    assert not no_value, no_value
    for key, c in checks.items():
        assert c["state"] in m.STATES, key
        if c["metric"] in FUNCTIONAL:
            assert c["state"] == "OK", (key, c)
        elif c["value"] is not None:  # CPU, memory: the state is what the value says
            assert c["state"] == m.evaluate(c["value"], c["warning"], c["critical"]), (key, c)
    # Per-environment facts: each app and vhost carries its environment.
    assert checks["memory_percent:django_staging"]["env"] == "staging"
    assert checks[f"http_latency_p95:{stack.environments['prod'].domains[0]}"]["env"] == "prod"
    requests = int(checks[f"http_latency_p95:{vhosts[0]}"]["detail"].split()[0])
    assert requests >= 10  # the traffic sent above, in the 5-minute window
    assert code == m.exit_code(m.worst(c["state"] for c in checks.values()))
    if all(c["state"] == "OK" for c in checks.values()):
        assert code == 0


def test_table_for_people_and_quiet_for_cron(stack_up):
    table = run_invoke("monitor", timeout=300)
    assert table.stdout.splitlines()[0].split()[:4] == ["check", "subject", "env", "state"]
    assert "cache memory" in table.stdout and "status page:" in table.stdout
    quiet = run_invoke("monitor", "--quiet", timeout=300)
    assert quiet.stdout == "" and quiet.returncode in (0, 1, 2)


def _cron_monitors(e2e_state: Path) -> bool:
    """`invoke setup` installs the host's cron file; on this state dir, cron runs the
    monitor every minute too, and such a run may be the one that sees a change first."""
    for cron in Path("/etc/cron.d").glob("*"):  # the files cron reads (one per project)
        text = cron.read_text(errors="replace") if cron.is_file() else ""
        if str(e2e_state) in text and "monitor" in text:
            return True
    return False


def _runs_since(e2e_state: Path, since: float) -> int:
    db = sqlite3.connect(e2e_state / "monitor" / "history.sqlite3", timeout=30)
    try:
        return db.execute("select count(*) from runs where ts >= ?", (since,)).fetchone()[0]
    finally:
        db.close()


def test_redis_stopped_is_critical_and_on_the_page_then_one_recovery_alert(
    stack_up, stack, e2e_state, webhook, redis_restored
):
    hook = {"AIIA_SLACK_WEBHOOK_URL": webhook.url}
    for attempt in (1, 2):
        if _cron_monitors(e2e_state):
            # Cron starts its run at second 0 and is done in a few seconds: begin just
            # after, so the whole stop/start cycle (~30 s) usually fits before the next.
            time.sleep(60 - time.time() % 60 + 5)
        _monitor(env=hook)  # settle what Slack has been told (a WARN of the busy machine)
        webhook.messages.clear()
        started = time.time()

        assert _docker("stop", redis_restored).returncode == 0
        code, data = _monitor(env=hook)
        assert code == 2 and data["state"] == "CRIT"
        checks = _by_key(data)
        assert checks["health:redis"]["state"] == "CRIT"
        assert "redis" in data["summary"]
        assert checks["cache_memory:redis"]["state"] == "UNKNOWN"
        down_messages = list(webhook.messages)

        # The status page, through nginx, says so.
        status, headers, body = https_get(
            stack.status_domain, "/status.json", port=stack.local_host.published(443)
        )
        assert status == 200 and "no-cache" in headers.get("Cache-Control", "")
        page = json.loads(body)
        assert page["state"] == "CRIT"
        redis_card = next(c for c in page["shared"] if c["subject"] == "redis")
        assert redis_card["state"] == "CRIT"
        status, _, html = https_get(stack.status_domain, "/", port=stack.local_host.published(443))
        # Fresh: nginx serves the file this run wrote (no cached descriptor of the old one).
        assert re.search(rb'class="name">redis</span>\s*<span class="pill s-CRIT">', html)

        assert _docker("start", redis_restored).returncode == 0
        _wait_healthy(stack)
        webhook.messages.clear()
        code, data = _monitor(env=hook)
        checks = _by_key(data)
        assert checks["health:redis"]["state"] == "OK"
        assert checks["cache_memory:redis"]["state"] == "OK"
        assert all(c["state"] == "OK" for c in checks.values() if c["metric"] in FUNCTIONAL), [
            (k, c["state"], c["detail"]) for k, c in checks.items() if c["state"] != "OK"
        ]
        # Not CRIT any more, unless the shared machine's CPU/memory says so this minute.
        assert code == m.exit_code(m.worst(c["state"] for c in checks.values()))
        if _runs_since(e2e_state, started) > 2 and attempt == 1:
            continue  # a cron run came in between and may have announced a change first
        assert len(down_messages) == 1 and "health redis OK → CRIT" in down_messages[0]
        assert len(webhook.messages) == 1, webhook.messages
        assert "health redis recovered" in webhook.messages[0]
        break


def ensure_chromium() -> str:
    """Debian's chromium, installed with apt when missing (a fresh CI machine has none)."""
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser:
        return browser
    if os.geteuid() != 0:
        pytest.fail("chromium is not installed and this is not root: apt-get install chromium")
    for argv in (
        ["apt-get", "update", "-q"],
        ["apt-get", "install", "-y", "-q", "--no-install-recommends", "chromium"],
    ):
        proc = subprocess.run(
            argv,
            capture_output=True,
            text=True,
            timeout=900,
            env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"},
        )
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    return shutil.which("chromium")


def test_status_page_in_headless_chromium_shows_its_charts(stack_up, stack, tmp_path):
    browser = ensure_chromium()
    run_invoke("monitor", "--quiet", timeout=300)
    port = stack.local_host.published(443)
    url = f"https://{stack.status_domain}:{port}/"
    common = [
        browser,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--hide-scrollbars",
        "--ignore-certificate-errors",  # the self-signed placeholder until ACME
        # This network reaches no outside host: no background fetches at start.
        "--disable-background-networking",
        "--disable-component-update",
        "--no-first-run",
        "--disable-sync",
        f"--host-resolver-rules=MAP {stack.status_domain} 127.0.0.1",
        f"--user-data-dir={tmp_path / 'profile'}",
    ]
    dom = subprocess.run(
        [*common, "--dump-dom", url], capture_output=True, text=True, timeout=120
    ).stdout
    assert "AI-IA status" in dom
    assert dom.count('<svg viewBox="0 0') >= 12  # p95 + errors, 24 h + 7 d, 3 vhosts
    assert "<polyline" in dom or "<circle" in dom  # the traffic of the first test, drawn
    shot = Path(os.environ.get("AIIA_STATUS_SCREENSHOT") or tmp_path / "status-page.png")
    subprocess.run(
        [*common, "--window-size=1100,2600", f"--screenshot={shot}", url],
        capture_output=True,
        timeout=120,
    )
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size > 20_000


def test_a_burst_of_5xx_makes_the_error_rate_critical(stack_up, stack, e2e_state, redis_restored):
    """Redis stopped makes the staging app answer 503: a bounded burst of real requests,
    then Redis back and healthy, so the only thing still wrong is the error rate."""
    staging = stack.environments["staging"].domains[0]
    before = sum(
        1
        for line in (e2e_state / "logs/nginx/access.log").read_text().splitlines()
        if CLIENT_UA in line and json.loads(line)["status"].startswith("5")
    )
    assert _docker("stop", redis_restored).returncode == 0
    deadline = time.monotonic() + 60
    statuses: list[int] = []
    with concurrent.futures.ThreadPoolExecutor(max_workers=4) as pool:
        while len(statuses) < 40 and time.monotonic() < deadline:
            statuses += pool.map(lambda _: _get(stack, staging, "/health/"), range(4))
    errors = sum(500 <= s < 600 for s in statuses)
    assert errors >= 10, statuses
    assert _docker("start", redis_restored).returncode == 0
    _wait_healthy(stack)
    _wait_logged(e2e_state, before + errors, status_prefix="5")

    code, data = _monitor()
    checks = _by_key(data)
    err = checks[f"http_error_percent:{staging}"]
    assert err["state"] == "CRIT" and err["value"] > 5, err
    assert code == 2 and f"HTTP errors {staging} CRIT" in data["summary"]
    assert checks["health:redis"]["state"] == "OK"  # the cause is gone; the rate remains
