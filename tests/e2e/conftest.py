"""The whole stack, brought up by the tasks people run: `invoke setup --env=prod|staging`.

The stack's names are fixed (aiia_nginx, aiia_network 172.20.0.0/16, ports 80/443), so
only one can run on a machine. These tests refuse to replace a stack they did not start
(a developer's or a server's) unless AIIA_E2E_REPLACE=1 says so.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

from aiia_ops.model import load_stack
from tests.conftest import run_invoke
from tests.sshd import sshd_host  # noqa: F401  (fixture: a real OpenSSH server)

STATE_MARK = ".e2e-state"
pytestmark = [pytest.mark.docker, pytest.mark.e2e]


def _docker(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["docker", *args], capture_output=True, text=True)


def _existing_stack() -> list[str]:
    label = f"label=org.eduaiia.stack={load_stack().project}"
    return _docker("ps", "-aq", "--filter", label).stdout.split()


def reset_stack() -> None:
    """Remove the stack named by the stack file (AIIA_STACK): containers, volumes, network."""
    stack = load_stack()
    ids = _existing_stack()
    if ids:
        _docker("rm", "-f", *ids)
    prefix = f"{stack.project}_"
    vols = [v for v in _docker("volume", "ls", "-q").stdout.split() if v.startswith(prefix)]
    if vols:
        _docker("volume", "rm", "-f", *vols)
    _docker("network", "rm", stack.network.name)


@pytest.fixture(scope="session")
def e2e_state() -> Path:
    """A fresh state dir, and a machine with no other aiia stack on it. Not under pytest's
    tmp_path: pytest deletes all but its 3 newest base dirs, even one still in use."""
    state = Path(tempfile.mkdtemp(prefix="aiia-e2e-")) / "state"
    if _existing_stack() and os.environ.get("AIIA_E2E_REPLACE") != "1" and not os.environ.get("CI"):
        pytest.fail(
            "an aiia stack already runs on this machine; the end-to-end tests would replace "
            "it (its data volumes included). Stop it first (invoke down), or set "
            "AIIA_E2E_REPLACE=1 if it is a throwaway stack."
        )
    reset_stack()
    os.environ["AIIA_STATE_DIR"] = str(state)
    # setup installs the host's cron file; tests read it without activating it.
    os.environ["AIIA_CRON_FILE"] = str(state.parent / "cron.d-aiia")
    return state


@pytest.fixture(scope="session")
def stack_up(e2e_state):
    """prod then staging, from nothing, with the real tasks."""
    results = {}
    for env in ("prod", "staging"):
        proc = run_invoke(
            "setup", f"--env={env}", env={"AIIA_STATE_DIR": str(e2e_state)}, timeout=1800
        )
        results[env] = proc
        if proc.returncode != 0:
            logs = run_invoke("logs", "--tail", "40", env={"AIIA_STATE_DIR": str(e2e_state)})
            pytest.fail(
                f"invoke setup --env={env} failed ({proc.returncode}):\n{proc.stdout}\n"
                f"{proc.stderr}\n--- logs ---\n{logs.stdout[-6000:]}"
            )
    yield results
    if os.environ.get("AIIA_E2E_KEEP") != "1":  # keep it up to look around after a run
        reset_stack()
        shutil.rmtree(e2e_state.parent, ignore_errors=True)


@pytest.fixture(scope="session")
def stack():
    return load_stack()
