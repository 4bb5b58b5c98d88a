"""The whole stack, brought up by the tasks people run: `invoke setup --env=prod|staging`.

Not the real stack: the tests write their own stack file (tests/stackfiles.py: project
aiiatest, containers aiiatest_*, network aiiatest_network on 172.29.0.0/16, nginx on
127.0.0.1:10080/10443, its own state dir and cron file) and point every task they run at
it through AIIA_STACK. A stack already on this machine (the real one of `invoke setup`,
project aiia, ports 80/443, /var/lib/aiia) is neither replaced nor touched: reset and
teardown remove only what carries the test project's label and names.

One test run at a time per machine: the run holds a lock for as long as its stack is up.
Containers of the test project found by a run that got the lock are a killed run's
leftovers, and are removed.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import tempfile
from pathlib import Path

import pytest

from aiia_ops.model import load_stack
from tests.conftest import run_invoke
from tests.lab import make_lab  # noqa: F401  (fixture: real hosts in namespaces)
from tests.sshd import sshd_host  # noqa: F401  (fixture: a real OpenSSH server)
from tests.stackfiles import (
    TEST_PORT_OFFSET,
    TEST_PROJECT,
    TEST_SECOND_OCTET,
    remove_stack,
    stack_containers,
    write_isolated_stack,
)

STATE_MARK = ".e2e-state"
pytestmark = [pytest.mark.docker, pytest.mark.e2e]
# What the tasks the tests run read: set for this package's tests, restored after them.
TASK_ENV = ("AIIA_STACK", "AIIA_STATE_DIR", "AIIA_CRON_FILE")


def reset_stack() -> None:
    """Remove the test stack (AIIA_STACK, written by `e2e_env`): containers, volumes,
    network. Refuses any other project: this never removes the real stack."""
    stack = load_stack()
    if stack.project != TEST_PROJECT:
        raise AssertionError(f"reset_stack() is for the test stack {TEST_PROJECT!r} only")
    remove_stack(stack.project, stack.network.name)


def _hold_run_lock() -> int:
    """One end-to-end run per machine (they would share the test stack's names and ports);
    released when this process ends, however it ends."""
    path = Path(tempfile.gettempdir()) / f"aiia-e2e-{TEST_PROJECT}.lock"
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "another run"
        os.close(fd)
        pytest.fail(
            f"another end-to-end run ({holder}) has the test stack {TEST_PROJECT!r} up on "
            f"this machine; wait for it to end ({path} is free then)"
        )
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"pid {os.getpid()}\n".encode(), 0)
    return fd


@pytest.fixture(scope="package")
def e2e_state() -> Path:
    """A fresh state dir, and AIIA_STACK/AIIA_STATE_DIR/AIIA_CRON_FILE naming the test
    stack for every task this package's tests run. Not under pytest's tmp_path: pytest
    deletes all but its 3 newest base dirs, even one still in use."""
    lock = _hold_run_lock()
    saved = {name: os.environ.get(name) for name in TASK_ENV}
    root = Path(tempfile.mkdtemp(prefix="aiia-e2e-"))
    state = root / "state"
    stack_file = write_isolated_stack(
        root / "stack.yml", TEST_PROJECT, TEST_SECOND_OCTET, TEST_PORT_OFFSET, str(state)
    )
    os.environ["AIIA_STACK"] = str(stack_file)
    os.environ["AIIA_STATE_DIR"] = str(state)
    # setup installs the host's cron file; tests read it without activating it.
    os.environ["AIIA_CRON_FILE"] = str(root / "cron.d-aiia")
    if stack_containers(TEST_PROJECT):
        print(f"\nremoving a killed test run's stack {TEST_PROJECT!r}", flush=True)
    reset_stack()
    yield state
    for name, value in saved.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value
    os.close(lock)


@pytest.fixture(scope="package")
def stack_up(e2e_state):
    """prod then staging, from nothing, with the real tasks, on the test stack."""
    results = {}
    for env in ("prod", "staging"):
        proc = run_invoke("setup", f"--env={env}", timeout=1800)
        results[env] = proc
        if proc.returncode != 0:
            logs = run_invoke("logs", "--tail", "40")
            pytest.fail(
                f"invoke setup --env={env} failed ({proc.returncode}):\n{proc.stdout}\n"
                f"{proc.stderr}\n--- logs ---\n{logs.stdout[-6000:]}"
            )
    yield results
    if os.environ.get("AIIA_E2E_KEEP") != "1":  # keep it up to look around after a run
        reset_stack()
        shutil.rmtree(e2e_state.parent, ignore_errors=True)


@pytest.fixture(scope="package")
def stack(e2e_state):
    """The test stack's model: every name, address, port and domain a test uses."""
    return load_stack()
