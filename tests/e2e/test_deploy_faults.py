"""Issue #13: a deploy killed at any step leaves prod serving, and a re-run finishes it.

Real engine, the test stack of tests/e2e/conftest.py, load from 127.0.0.1 (>= 50 keep-alive
clients on prod's API, every non-2xx or connection error counted; the one documented
keep-alive retry is allowed). `invoke deploy --env=prod` runs as a subprocess; when the
line of a step boundary appears on its stdout it is sent SIGKILL (or SIGTERM), then the
same deploy is run again and must end with the new release serving.

The releases alternate between HEAD (what `invoke setup` deployed) and one code change,
both images built before the matrix; the pre-deploy backup is skipped (--no-backup) except
for the case at the backup boundary. One load runs for the whole module (its clients stay
connected across cases, as users would); each case counts the answers given during its own
kill and re-run. Each case's figures are printed at the end of the module (run with -s), and
appended to the file $AIIA_FAULT_TABLE names, if set.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import pytest

from aiia_ops import REPO_ROOT
from aiia_ops.commands import journal as jn
from aiia_ops.host import lock as locks
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
# SIGTERM (SIGHUP goes through the same handler) at every boundary too.
SIGTERM_AT = tuple(BOUNDARIES)
ROWS: list[tuple] = []  # (case, killed run s, re-run s, requests, failures, retried)


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


class CaseLoad(Load):
    """The module's one load; `mark()` then `since(mark)`: what was answered in between."""

    def mark(self) -> tuple[Counter, Counter, int]:
        with self._lock:
            return Counter(self.codes), Counter(self.errors), self.retried

    def since(self, mark) -> dict:
        codes0, errors0, retried0 = mark
        with self._lock:
            codes, errors = self.codes - codes0, self.errors - errors0
            retried = self.retried - retried0
        bad = {code: n for code, n in codes.items() if not 200 <= code < 300}
        total = sum(codes.values()) + sum(errors.values())
        return {"total": total, "failures": {**bad, **errors}, "retried": retried}


@pytest.fixture(scope="module")
def prod_load(stack, releases):
    """>= 50 keep-alive clients on prod for the whole module (what users hit: the API and
    a static file; not /health/, which the load's own probe reads, kept apart: starved of
    CPU on 2 cores it may time out its own dependency checks, a 503 that says nothing of
    the deploy)."""
    with CaseLoad(
        stack.environment("prod").domains[0],
        stack.local_host.published(443),
        clients=50,
        paths=("/api/courses/", "/api/courses/?page=1", "/static/admin/css/base.css"),
        max_seconds=3600,
    ) as load:
        yield load
    if ROWS:
        table = ["case                 killed run   re-run  requests  failures  retried"]
        table += [
            f"{c:<20} {k:>9.1f}s {r:>7.1f}s {t:>9} {f:>9} {rt:>8}" for c, k, r, t, f, rt in ROWS
        ]
        table.append(f"whole load: {load.total} requests, {dict(load.codes)}, errors "
                     f"{dict(load.errors)}, retried {load.retried}")  # fmt: skip
        print("\n" + "\n".join(table))
        if os.environ.get("AIIA_FAULT_TABLE"):
            with open(os.environ["AIIA_FAULT_TABLE"], "a") as fh:
                fh.write("\n".join(table) + "\n")


def keep_output(case: str, killed: str, rerun: str) -> None:
    """Both runs' output (each step with its duration), appended to $AIIA_FAULT_LOG if set."""
    if os.environ.get("AIIA_FAULT_LOG"):
        with open(os.environ["AIIA_FAULT_LOG"], "a") as fh:
            fh.write(f"==== {case}: killed run\n{killed}\n==== {case}: re-run\n{rerun}\n")


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
    stack, releases, prod_load, e2e_state, sig, boundary
):
    marker, with_backup = BOUNDARIES[boundary]
    target = other(releases, stack)
    args = ["deploy", "--env=prod", f"--ref={target}"] + ([] if with_backup else ["--no-backup"])
    mark = prod_load.mark()
    t0 = time.monotonic()
    proc = start(args)
    lines = run_until(proc, marker)
    proc.send_signal(sig)
    out = finish(proc, lines)
    killed_s = time.monotonic() - t0
    assert proc.returncode != 0, out
    if sig == signal.SIGTERM:
        if boundary == "record":  # held until the record was done: nothing to recover
            assert "interrupted by SIGTERM after it was recorded good" in out, out
        else:
            assert "interrupted by SIGTERM; the recovery ran" in out, out
        assert "Traceback" not in out, out
    time.sleep(0.5)
    between = served_version(stack, "prod")
    t1 = time.monotonic()
    rerun = deploy("prod", target)
    rerun_s = time.monotonic() - t1
    seen = prod_load.since(mark)
    keep_output(f"{sig.name} {boundary}", out, rerun.stdout + rerun.stderr)
    ROWS.append((f"{sig.name} {boundary}", killed_s, rerun_s, seen["total"],
                 sum(seen["failures"].values()), seen["retried"]))  # fmt: skip
    assert between in releases, f"prod answered {between!r} after the kill:\n{out}"
    assert rerun.returncode == 0, out + "\n--- re-run ---\n" + rerun.stdout + rerun.stderr
    assert served_version(stack, "prod") == target
    if sig == signal.SIGKILL:  # the killed run's lock: named, taken over
        assert "taking over a stale lock deploy-prod" in rerun.stdout, rerun.stdout
    assert seen["failures"] == {}, (seen, out, rerun.stdout)
    assert seen["total"] > 100, seen
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
    stack, releases, prod_load, e2e_state
):
    mark = prod_load.mark()
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
    assert prod_load.since(mark)["failures"] == {}


def test_a_deploy_killed_between_taking_the_lock_and_naming_itself_is_taken_over(
    stack, releases, prod_load, e2e_state
):
    """SIGKILL between the lock's mkdir and its holder.json: the lock dir is there, empty.
    The next deploy within seconds is refused (it could be a live taker) saying when to
    retry; once the dir is older than EMPTY_STALE it is taken over, said so."""
    mark = prod_load.mark()
    before, target = served_version(stack, "prod"), other(releases, stack)
    killed = start(
        ["deploy", "--env=prod", f"--ref={target}", "--no-backup"],
        {"AIIA_FAILPOINT": f"lock:{locks.deploy_lock('prod')}:KILL"},
    )
    out = finish(killed, [])
    assert killed.returncode == -signal.SIGKILL, out
    held = Path(e2e_state) / "locks" / "deploy-prod"
    assert held.is_dir() and list(held.iterdir()) == [], out
    refused = deploy("prod", target)
    assert refused.returncode == 1, refused.stdout + refused.stderr
    assert (
        "error: deploy-prod is being taken by another run (its directory has no "
        "holder.json yet); retry in " in refused.stderr
    ), refused.stderr
    assert "Traceback" not in refused.stderr
    assert served_version(stack, "prod") == before  # nothing changed
    time.sleep(max(0.0, locks.EMPTY_STALE + 1 - (time.time() - held.stat().st_mtime)))
    rerun = deploy("prod", target)
    assert rerun.returncode == 0, rerun.stdout + rerun.stderr
    assert (
        "taking over a stale lock deploy-prod: its directory has had no holder.json "
        "for " in rerun.stdout
    ), rerun.stdout
    assert served_version(stack, "prod") == target
    assert prod_load.since(mark)["failures"] == {}


def test_prod_and_staging_deployed_together_under_load_both_end_good(stack, releases, prod_load):
    staging_target = (
        releases[1] if served_version(stack, "staging") != releases[1] else (releases[0])
    )
    prod_target = other(releases, stack)
    mark = prod_load.mark()
    with load_on(stack, "staging", 30) as st_load:
        procs = {
            "prod": start(["deploy", "--env=prod", f"--ref={prod_target}", "--no-backup"]),
            "staging": start(["deploy", "--env=staging", f"--ref={staging_target}", "--no-backup"]),
        }
        outs = {env: p.communicate(timeout=900)[0] for env, p in procs.items()}
    for env, p in procs.items():
        assert p.returncode == 0, f"{env}:\n{outs[env]}"
    assert served_version(stack, "prod") == prod_target
    assert served_version(stack, "staging") == staging_target
    seen = prod_load.since(mark)
    assert seen["failures"] == {}, seen
    assert st_load.failures() == {}, (st_load.codes, st_load.errors)
    assert seen["total"] > 100 and st_load.total > 100


def ssh_sessions(server) -> list[int]:
    """The per-connection processes of the test sshd (children of the listener)."""
    out = subprocess.run(
        ["pgrep", "-P", str(server.process.pid)], capture_output=True, text=True
    ).stdout
    return [int(p) for p in out.split()]


@pytest.mark.parametrize("boundary", ["switch", "drain", "retire"])
def test_a_deploy_over_ssh_whose_connection_is_cut_keeps_serving_and_a_rerun_finishes(
    stack, releases, prod_load, e2e_state, sshd_host, tmp_path, boundary
):
    variant = ssh_stack_variant(tmp_path, sshd_host.spec, e2e_state)
    env = {
        "AIIA_STACK": str(variant),
        "AIIA_SSH_KEY": str(sshd_host.key_path),
        "AIIA_SSH_KNOWN_HOSTS": str(sshd_host.known_hosts_path),
    }
    target = other(releases, stack)
    args = ["deploy", "--env=prod", "--host=sshbox", f"--ref={target}", "--no-backup"]
    mark = prod_load.mark()
    t0 = time.monotonic()
    proc = start(args, env)
    lines = run_until(proc, BOUNDARIES[boundary][0])
    sessions = ssh_sessions(sshd_host)
    assert sessions, "no sshd session to cut"
    for pid in sessions:
        os.kill(pid, signal.SIGKILL)  # the link drops mid-deploy
    out = finish(proc, lines)
    killed_s = time.monotonic() - t0
    time.sleep(0.5)
    between = served_version(stack, "prod")
    t1 = time.monotonic()
    rerun = run_invoke(*args, env=env, timeout=900)
    seen = prod_load.since(mark)
    keep_output(f"SSH cut {boundary}", out, rerun.stdout + rerun.stderr)
    ROWS.append((f"SSH cut {boundary}", killed_s, time.monotonic() - t1, seen["total"],
                 sum(seen["failures"].values()), seen["retried"]))  # fmt: skip
    # Between two commands the SSH runner reconnects, so the deploy may finish by itself;
    # a command cut mid-way (a drain, a stop) fails it and the recovery runs. Either way:
    assert "Traceback" not in out, out
    assert between in releases, out
    assert rerun.returncode == 0, out + "\n--- re-run ---\n" + rerun.stdout + rerun.stderr
    assert served_version(stack, "prod") == target
    assert seen["failures"] == {}, (seen, out, rerun.stdout)
