"""Issue #13: a deploy killed at any step leaves prod serving, and a re-run finishes it.

Real engine, the test stack of tests/e2e/conftest.py, load from 127.0.0.1 (>= 50 keep-alive
clients on prod's API, every non-2xx or connection error counted; the one documented
keep-alive retry is allowed). `invoke deploy --env=prod` runs as a subprocess; when the
line of a step boundary appears on its stdout it is sent SIGKILL (or SIGTERM), then the
same deploy is run again and must end with the new release serving.

The releases alternate between HEAD (what `invoke setup` deployed) and one code change,
both images built before the matrix; the pre-deploy backup is skipped (--no-backup) except
for the case at the backup boundary.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from aiia_ops import REPO_ROOT
from aiia_ops.commands import journal as jn
from aiia_ops.host.releases import read_releases
from tests.conftest import run_invoke
from tests.e2e.deploys import Load, drop_refs, git, head_file, make_commit, ssh_stack_variant
from tests.e2e.test_deploy import served_version

pytestmark = [pytest.mark.docker, pytest.mark.e2e]

URLS = "services/django/app/aiia/urls.py"

# boundary -> (the stdout line that shows it was passed, with the pre-deploy backup)
BOUNDARIES = {
    "lock": ("-> image ", False),
    "backup": ("-> image ", True),
    "build": ("-> migration safety", False),
    "migrate": ("-> collectstatic", False),
    "start": ("-> health of ", False),
    "health": ("-> switch nginx", False),
    "switch": ("   switch state recorded: prod", False),
    "reload": ("   nginx reloaded", False),
    "drain": ("   nginx drained", False),
    "retire": ("   previous release stopped:", False),
    "record": ("   recorded: deploy of prod", False),
}
# SIGTERM (and SIGHUP the same way) at a representative subset: before the switch, between
# the switch and the reload, during the retire, after it.
SIGTERM_AT = ("migrate", "switch", "drain", "retire")


@pytest.fixture(scope="module")
def releases(stack_up, stack):
    """Two releases whose images are on the engine: HEAD (deployed by setup) and a change."""
    urls = head_file(URLS)
    changed = urls + "\n# e2e: a release for the fault matrix\n"
    change = make_commit("faults", {URLS: changed}, "e2e: fault matrix release")[:12]
    head = git("rev-parse", "HEAD")[:12]
    proc = deploy("prod", change)  # builds the change's image
    assert proc.returncode == 0, proc.stdout + proc.stderr
    yield (head, change)
    drop_refs()


def deploy(env: str, ref: str, *extra: str, **kw) -> subprocess.CompletedProcess:
    return run_invoke("deploy", f"--env={env}", f"--ref={ref}", "--no-backup", *extra, **kw)


def other(releases, stack) -> str:
    """The release prod does not serve now: the next deploy's target."""
    now = served_version(stack, "prod")
    return releases[1] if now == releases[0] else releases[0]


def start(args: list[str], env: dict | None = None) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "invoke", *args],
        cwd=REPO_ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        bufsize=1,
        env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})},
    )


def run_until(proc: subprocess.Popen, marker: str, timeout: float = 600) -> list[str]:
    """Read the deploy's output until a line starts with `marker`; the lines read."""
    lines: list[str] = []
    deadline = time.monotonic() + timeout
    timer = threading.Timer(timeout, proc.kill)
    timer.start()
    try:
        for line in proc.stdout:
            lines.append(line)
            if line.startswith(marker):
                return lines
            if time.monotonic() > deadline:
                break
    finally:
        timer.cancel()
    raise AssertionError(f"{marker!r} never appeared:\n{''.join(lines)}")


def finish(proc: subprocess.Popen, lines: list[str]) -> str:
    rest, _ = proc.communicate(timeout=300)
    return "".join(lines) + rest


def load_on(stack, env: str = "prod", clients: int = 50) -> Load:
    return Load(
        stack.environment(env).domains[0],
        stack.local_host.published(443),
        clients=clients,
        # What users hit: the API (the app) and a static file (nginx alone). Not /health/:
        # starved of CPU on 2 cores it may time out its own dependency checks (a 503 that
        # says nothing of the deploy); the Load's own probe reads it, kept apart.
        paths=("/api/courses/", "/api/courses/?page=1", "/static/admin/css/base.css"),
        max_seconds=900,
    )


@pytest.mark.parametrize(
    "sig,boundary",
    [(signal.SIGKILL, b) for b in BOUNDARIES] + [(signal.SIGTERM, b) for b in SIGTERM_AT],
    ids=lambda v: v.name if isinstance(v, signal.Signals) else v,
)
def test_a_prod_deploy_killed_at_a_step_boundary_keeps_serving_and_a_rerun_finishes(
    stack, releases, e2e_state, sig, boundary
):
    marker, with_backup = BOUNDARIES[boundary]
    target = other(releases, stack)
    args = ["deploy", "--env=prod", f"--ref={target}"] + ([] if with_backup else ["--no-backup"])
    with load_on(stack) as load:
        proc = start(args)
        lines = run_until(proc, marker)
        proc.send_signal(sig)
        out = finish(proc, lines)
        assert proc.returncode != 0, out
        if sig == signal.SIGTERM:
            assert "interrupted by SIGTERM; the recovery ran" in out, out
            assert "Traceback" not in out, out
        time.sleep(1)
        between = served_version(stack, "prod")
        rerun = deploy("prod", target)
    assert between in releases, f"prod answered {between!r} after the kill:\n{out}"
    assert rerun.returncode == 0, out + "\n--- re-run ---\n" + rerun.stdout + rerun.stderr
    assert served_version(stack, "prod") == target
    if sig == signal.SIGKILL:  # the killed run's lock: named, taken over
        assert "taking over a stale lock deploy-prod" in rerun.stdout, rerun.stdout
    assert load.failures() == {}, (load.codes, load.errors, out, rerun.stdout)
    assert load.total > 100
    last = read_releases(e2e_state, "prod")[-1]
    assert (last["commit"], last["result"]) == (target, "good")
    journal = jn.parse_journal(Path(jn.journal_path(str(e2e_state), "prod")).read_bytes())
    assert journal.finished and journal.tag == target
    names = subprocess.run(
        ["docker", "ps", "-a", "--format", "{{.Names}}"], capture_output=True, text=True
    ).stdout.split()
    prod = stack.environment("prod").container
    assert prod in names and f"{prod}-next" not in names  # one release left, final name


def test_a_lock_left_by_a_killed_deploy_is_named_and_the_next_deploy_proceeds(
    stack, releases, e2e_state
):
    target = other(releases, stack)
    proc = start(["deploy", "--env=prod", f"--ref={target}", "--no-backup"])
    lines = run_until(proc, "-> start ")
    pid = proc.pid
    proc.kill()
    finish(proc, lines)
    held = Path(e2e_state) / "locks" / "deploy-prod" / "holder.json"
    assert held.exists()  # left behind by the killed deploy
    rerun = deploy("prod", target)
    assert rerun.returncode == 0, rerun.stdout + rerun.stderr
    line = next(x for x in rerun.stdout.splitlines() if "taking over a stale lock" in x)
    assert f"pid {pid} on " in line and f"deploy of {target}" in line
    assert "is no longer running" in line
    assert served_version(stack, "prod") == target


def test_prod_and_staging_deployed_together_under_load_both_end_good(stack, releases):
    staging_target = (
        releases[1] if served_version(stack, "staging") != releases[1] else (releases[0])
    )
    prod_target = other(releases, stack)
    with load_on(stack, "prod", 30) as prod_load, load_on(stack, "staging", 30) as st_load:
        procs = {
            "prod": start(["deploy", "--env=prod", f"--ref={prod_target}", "--no-backup"]),
            "staging": start(["deploy", "--env=staging", f"--ref={staging_target}", "--no-backup"]),
        }
        outs = {env: p.communicate(timeout=900)[0] for env, p in procs.items()}
    for env, p in procs.items():
        assert p.returncode == 0, f"{env}:\n{outs[env]}"
    assert served_version(stack, "prod") == prod_target
    assert served_version(stack, "staging") == staging_target
    assert prod_load.failures() == {}, (prod_load.codes, prod_load.errors)
    assert st_load.failures() == {}, (st_load.codes, st_load.errors)
    assert prod_load.total > 100 and st_load.total > 100


def ssh_sessions(server) -> list[int]:
    """The per-connection processes of the test sshd (children of the listener)."""
    out = subprocess.run(
        ["pgrep", "-P", str(server.process.pid)], capture_output=True, text=True
    ).stdout
    return [int(p) for p in out.split()]


@pytest.mark.parametrize("boundary", ["switch", "drain", "retire"])
def test_a_deploy_over_ssh_whose_connection_is_cut_keeps_serving_and_a_rerun_finishes(
    stack, releases, e2e_state, sshd_host, tmp_path, boundary
):
    variant = ssh_stack_variant(tmp_path, sshd_host.spec, e2e_state)
    env = {
        "AIIA_STACK": str(variant),
        "AIIA_SSH_KEY": str(sshd_host.key_path),
        "AIIA_SSH_KNOWN_HOSTS": str(sshd_host.known_hosts_path),
    }
    target = other(releases, stack)
    args = ["deploy", "--env=prod", "--host=sshbox", f"--ref={target}", "--no-backup"]
    with load_on(stack) as load:
        proc = start(args, env)
        lines = run_until(proc, BOUNDARIES[boundary][0])
        sessions = ssh_sessions(sshd_host)
        assert sessions, "no sshd session to cut"
        for pid in sessions:
            os.kill(pid, signal.SIGKILL)  # the link drops mid-deploy
        out = finish(proc, lines)
        time.sleep(1)
        between = served_version(stack, "prod")
        rerun = run_invoke(*args, env=env, timeout=900)
    # Between two commands the SSH runner reconnects, so the deploy may finish by itself;
    # a command cut mid-way (a drain, a stop) fails it and the recovery runs. Either way:
    assert "Traceback" not in out, out
    assert between in releases, out
    assert rerun.returncode == 0, out + "\n--- re-run ---\n" + rerun.stdout + rerun.stderr
    assert served_version(stack, "prod") == target
    assert load.failures() == {}, (load.codes, load.errors, out, rerun.stdout)
