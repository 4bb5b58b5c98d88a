"""Shared fixtures. Tests that need the engine are marked `docker` (see pyproject.toml)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def run_invoke(
    *args: str, env: dict | None = None, check: bool = False, timeout: float = 900
) -> subprocess.CompletedProcess:
    """Run a task the way people do: `invoke ...` from the repository root."""
    proc = subprocess.run(
        [sys.executable, "-m", "invoke", *args],
        cwd=ROOT,
        text=True,
        capture_output=True,
        env={**os.environ, **(env or {})},
        timeout=timeout,
    )
    if check and proc.returncode != 0:
        raise AssertionError(
            f"invoke {' '.join(args)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}"
        )
    return proc


@pytest.fixture
def state_dir(tmp_path, monkeypatch):
    """A throwaway state dir (secrets, rendered configs) for tasks run by this test."""
    path = tmp_path / "state"
    monkeypatch.setenv("AIIA_STATE_DIR", str(path))
    return path


# --- lab tests: their own engines, run beside the rest --------------------------------------


# The fault matrices and the multi-host clusters: `nox -s extended` (20-40 min on this
# machine); not yet in `nox -s tests`, whose CI budget they would break (issues 13-16 notes).
EXTENDED = (
    "tests/e2e/test_deploy_faults.py",
    "tests/e2e/test_restore_faults.py",
    "tests/lab3/",
    "tests/lab_swarm/",
    "tests/lab_offsite/",
    "tests/lab_recover/",  # the off-site drill: not yet seen passing end to end (issue 14)
    "tests/lab_patroni/",
    "services/patroni/",  # its image comes from `invoke db.build`, not `invoke build`
)


def pytest_collection_modifyitems(config, items):
    """A test that uses the lab (the `make_lab` fixture, directly or through another fixture)
    is marked `lab`: it runs on the lab hosts' own engines, so `nox -s tests` runs the `lab`
    group in a second pytest process beside the rest (noxfile.py)."""
    for item in items:
        if "make_lab" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.lab)
        rel = Path(str(item.fspath)).resolve().relative_to(ROOT).as_posix()
        if rel in EXTENDED or rel.startswith(tuple(d for d in EXTENDED if d.endswith("/"))):
            item.add_marker(pytest.mark.extended)


# --- a skip is not a pass -------------------------------------------------------------------


@pytest.hookimpl(trylast=True)
def pytest_sessionfinish(session, exitstatus):
    """Fail a run that skipped tests: every tool and service a test needs is installed by
    the project (test dependency group, `invoke provision`, `invoke build`), so a skip means
    something is missing and must not pass as green. AIIA_ALLOW_SKIP=1 accepts skips for
    one run (e.g. a laptop without an engine); the skip reasons are listed either way."""
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    skipped = reporter.stats.get("skipped", []) if reporter else []
    if not skipped or os.environ.get("AIIA_ALLOW_SKIP") == "1":
        return
    if session.exitstatus == pytest.ExitCode.OK:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
    reporter.ensure_newline()
    reporter.write_sep(
        "=",
        f"{len(skipped)} skipped: a skip is not a pass (set AIIA_ALLOW_SKIP=1 to accept "
        "skips); install what the reasons below name",
        red=True,
    )
