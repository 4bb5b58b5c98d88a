"""`invoke logrotate` against the test stack's real nginx: the access log is renamed, nginx
reopens a new one on USR1, and no line is lost on either side of the rotation."""

from __future__ import annotations

import time
import uuid
from pathlib import Path

import pytest

from aiia_ops.flows.status import https_get
from tests.conftest import run_invoke

pytestmark = [pytest.mark.docker, pytest.mark.e2e]


def _request(stack, marker: str) -> None:
    env = stack.environment("prod")
    status, _, _ = https_get(
        env.domains[0], f"/health/?m={marker}", port=stack.local_host.published(443)
    )
    assert status in (200, 503)  # either way nginx logs it


def _wait_for(path: Path, marker: str, timeout: float = 30) -> bool:
    """nginx buffers its access log (access_log_flush): the line comes within seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists() and marker in path.read_text(errors="replace"):
            return True
        time.sleep(0.5)
    return False


def test_rotation_keeps_every_line_and_nginx_writes_a_new_file(stack_up, stack, e2e_state):
    log = e2e_state / "logs" / "nginx" / "access.log"
    before, after = f"before-{uuid.uuid4().hex}", f"after-{uuid.uuid4().hex}"
    _request(stack, before)  # may still sit in nginx's buffer when the file is renamed
    proc = run_invoke("logrotate", timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "access.log: rotated" in proc.stdout and "failed" not in proc.stdout
    rotated = log.with_name("access.log.1")
    assert _wait_for(rotated, before), "the line written before the rotation was lost"
    _request(stack, after)
    assert _wait_for(log, after), "nginx did not reopen its log after USR1"
    assert before not in log.read_text(errors="replace")
    assert log.stat().st_uid == rotated.stat().st_uid  # created by nginx's own user

    again = run_invoke("logrotate", "--if-larger", timeout=120)
    assert again.returncode == 0 and "not due" in again.stdout, again.stdout
