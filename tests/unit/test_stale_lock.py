"""Issue #13: a stale lock is reported with its holder and taken over, or refused with the
exact command that clears it (host/lock.py, real files through a LocalRunner)."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time

import pytest

from aiia_ops.host import lock
from aiia_ops.host.runners import LocalRunner
from aiia_ops.host.signals import Interrupted, interruptible

NAME = lock.deploy_lock("prod")
HINT = "invoke lock.release --env=prod"


def plant(root, **holder) -> None:
    path = lock.lock_dir(str(root), NAME)
    os.makedirs(path)
    info = {"name": NAME, "holder": "ops@box", "since": "2026-12-02T01:00:00Z"}
    info |= {"version": "abc123", "action": "deploy", "pid": 1, "from": "elsewhere", **holder}
    with open(f"{path}/holder.json", "w") as fh:
        json.dump(info, fh)


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_a_dead_holder_on_this_machine_is_named_and_taken_over(tmp_path):
    plant(tmp_path, pid=dead_pid(), **{"from": socket.gethostname()})
    lines: list[str] = []
    info = lock.acquire(LocalRunner(), str(tmp_path), NAME, version="new", out=lines.append)
    assert info["pid"] == os.getpid()
    assert lock.read(LocalRunner(), str(tmp_path), NAME)["version"] == "new"
    (line,) = lines
    assert "taking over a stale lock deploy-prod: ops@box since 2026-12-02T01:00:00Z" in line
    assert "(deploy of abc123, pid" in line and "is no longer running" in line


def test_a_live_holder_is_refused_with_the_exact_command(tmp_path):
    plant(tmp_path, pid=os.getppid(), **{"from": socket.gethostname()})
    with pytest.raises(lock.LockHeld) as err:
        lock.acquire(LocalRunner(), str(tmp_path), NAME, release_hint=HINT, max_age=1.0)
    message = str(err.value)
    assert message.startswith("deploy-prod is locked by ops@box since 2026-12-02T01:00:00Z")
    assert f"pid {os.getppid()} on {socket.gethostname()}" in message
    assert message.endswith(f"if it died: {HINT}")


def test_a_holder_on_another_machine_older_than_the_limit_is_taken_over(tmp_path):
    plant(tmp_path, since="2000-01-01T00:00:00Z")
    lines: list[str] = []
    lock.acquire(LocalRunner(), str(tmp_path), NAME, max_age=3600, out=lines.append)
    assert "is older than 1 h" in lines[0] and "pid 1 on elsewhere" in lines[0]


def test_a_recent_holder_on_another_machine_is_refused(tmp_path):
    plant(tmp_path, since=lock.now_iso())
    with pytest.raises(lock.LockHeld) as err:
        lock.acquire(LocalRunner(), str(tmp_path), NAME, max_age=3600, release_hint=HINT)
    assert str(err.value).endswith(f"if it died: {HINT}")
    assert lock.read(LocalRunner(), str(tmp_path), NAME)["from"] == "elsewhere"  # untouched


def test_without_a_limit_an_old_holder_elsewhere_is_refused(tmp_path):
    plant(tmp_path, since="2000-01-01T00:00:00Z")  # nothing proves it is dead
    with pytest.raises(lock.LockHeld):
        lock.acquire(LocalRunner(), str(tmp_path), NAME)


@pytest.mark.parametrize("since", ["", "yesterday", "2026-12-02T01:00:00"])
def test_an_unknown_age_is_never_stale(since):
    assert lock.age_seconds({"since": since}) is None
    assert lock.age_seconds({}) is None


def test_age_is_measured_from_since():
    assert lock.age_seconds({"since": "2026-12-02T01:00:00Z"}, now=1796173200.0 + 90) == 90


def plant_empty(root, age: float) -> str:
    """A lock dir without holder.json: its taker was killed between mkdir and write."""
    path = lock.lock_dir(str(root), NAME)
    os.makedirs(path)
    then = time.time() - age
    os.utime(path, (then, then))
    return path


def test_a_lock_dir_left_without_holder_is_taken_over_once_it_is_old(tmp_path):
    plant_empty(tmp_path, age=lock.EMPTY_STALE + 5)
    lines: list[str] = []
    info = lock.acquire(LocalRunner(), str(tmp_path), NAME, version="new", out=lines.append)
    assert info["pid"] == os.getpid()
    assert lock.read(LocalRunner(), str(tmp_path), NAME)["version"] == "new"
    (line,) = lines
    assert line.startswith("   taking over a stale lock deploy-prod: its directory has had no ")
    assert "holder.json for 15 s (a run killed while taking it)" in line


def test_a_fresh_lock_dir_without_holder_is_refused_saying_when_to_retry(tmp_path):
    path = plant_empty(tmp_path, age=1)
    with pytest.raises(lock.LockHeld) as err:
        lock.acquire(LocalRunner(), str(tmp_path), NAME, release_hint=HINT)
    message = str(err.value)
    # 1 s old when planted; the seconds left shrink while a busy machine gets here
    # (the clean-clone check saw 8 s at load 3): any count up to EMPTY_STALE - 1 is right.
    head = "deploy-prod is being taken by another run (its directory has no holder.json yet); "
    left = re.match(re.escape(head) + r"retry in (\d+) s: ", message)
    assert left and 1 <= int(left.group(1)) <= lock.EMPTY_STALE - 1, message
    assert message.endswith(f"if it died: {HINT}")
    assert os.path.isdir(path) and os.listdir(path) == []  # untouched


def test_a_waiting_taker_takes_over_an_empty_lock_dir_once_it_is_stale(tmp_path):
    plant_empty(tmp_path, age=lock.EMPTY_STALE - 1)  # stale one second from now
    lines: list[str] = []
    t0 = time.monotonic()
    lock.acquire(LocalRunner(), str(tmp_path), NAME, wait=30, out=lines.append)
    assert time.monotonic() - t0 < 10  # not the whole wait
    assert "a run killed while taking it" in lines[0]


def test_a_taker_killed_between_mkdir_and_write_leaves_an_empty_dir(tmp_path):
    code = (
        "from aiia_ops.host import lock; from aiia_ops.host.runners import LocalRunner; "
        f"lock.acquire(LocalRunner(), {str(tmp_path)!r}, {NAME!r})"
    )
    env = {**os.environ, "AIIA_FAILPOINT": f"lock:{NAME}:KILL"}
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True)
    assert proc.returncode == -9, proc.stderr
    path = lock.lock_dir(str(tmp_path), NAME)
    assert os.path.isdir(path) and os.listdir(path) == []
    assert lock.read(LocalRunner(), str(tmp_path), NAME) == {"holder": lock.NO_HOLDER}


def test_the_deploy_lock_age_limit_is_a_validated_stack_value(tmp_path):
    from aiia_ops import DEFAULT_STACK
    from aiia_ops.model import load_stack
    from aiia_ops.model.types import StackError

    assert load_stack().deploy.lock_max_age.seconds == 6 * 3600
    text = DEFAULT_STACK.read_text()
    assert "lock_max_age: 6h" in text
    path = tmp_path / "stack.yml"
    path.write_text(text.replace("lock_max_age: 6h", "lock_max_age: 2h"))
    assert load_stack(path).deploy.lock_max_age.seconds == 7200
    for bad in ("30s", "8d"):
        path.write_text(text.replace("lock_max_age: 6h", f"lock_max_age: {bad}"))
        with pytest.raises(StackError, match=r"deploy\.lock_max_age: .* expected 10m-7d"):
            load_stack(path)


def test_sigterm_between_mkdir_and_write_is_held_and_the_lock_let_go(tmp_path):
    code = (
        "from aiia_ops.host import lock; from aiia_ops.host.runners import LocalRunner\n"
        "from aiia_ops.host.signals import Interrupted, interruptible\n"
        "try:\n"
        "    with interruptible():\n"
        f"        lock.acquire(LocalRunner(), {str(tmp_path)!r}, {NAME!r})\n"
        "except Interrupted as exc:\n"
        "    print(exc)\n"
    )
    env = {**os.environ, "AIIA_FAILPOINT": f"lock:{NAME}:TERM"}
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert proc.returncode == 0 and proc.stdout == "interrupted by SIGTERM\n", proc
    assert not os.path.exists(lock.lock_dir(str(tmp_path), NAME))  # not left behind


class SignalledRunner(LocalRunner):
    """Sends itself SIGTERM as the lock's `rm` starts (as the fault matrix's SIGTERM at
    the reload boundary did), before the rm is done."""

    def run(self, argv, *args, **kw):
        if argv[:2] == ["rm", "-rf"]:
            os.kill(os.getpid(), signal.SIGTERM)
        return super().run(argv, *args, **kw)


def test_sigterm_while_letting_go_of_a_lock_still_lets_it_go(tmp_path):
    with (
        pytest.raises(Interrupted),
        interruptible(),
        lock.holding(SignalledRunner(), str(tmp_path), NAME),
    ):
        pass
    # Left behind, our own live pid held it: the recovery waited 180 s for itself.
    assert not os.path.exists(lock.lock_dir(str(tmp_path), NAME))
