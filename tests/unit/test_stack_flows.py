"""flows/stack.py as data: the state dir's commands, the missing-images message, and the one
confirmation `invoke down --volumes` asks for."""

from __future__ import annotations

from pathlib import Path

import pytest

from aiia_ops import DEFAULT_STACK
from aiia_ops.commands.argv import Result
from aiia_ops.errors import OpsError
from aiia_ops.flows import stack as flow
from aiia_ops.host.runners import RecordingRunner
from aiia_ops.model import load_stack
from aiia_ops.model.state import StateDir

STACK = load_stack(DEFAULT_STACK)


def test_prepare_state_gives_the_writable_dirs_to_the_service_user_when_root():
    runner = RecordingRunner({"id -u": "0\n"})
    flow.prepare_state(runner, StateDir(Path("/s")))
    assert runner.commands[:3] == [["mkdir", "-p", "/s"], ["chmod", "711", "/s"], ["id", "-u"]]
    assert ["chown", "10001:10001", "/s/logs/nginx"] in runner.commands
    not_root = RecordingRunner({"id -u": "1000\n"})
    flow.prepare_state(not_root, StateDir(Path("/s")))
    assert not [c for c in not_root.commands if c[0] == "chown"]


def test_missing_images_are_named_with_the_command_that_builds_them():
    runner = RecordingRunner({"docker image inspect aiia/redis": Result([], 1)})
    with pytest.raises(OpsError, match=r"images not built for this checkout: aiia/redis:\S+; "
                       r"run invoke build \(or: for s in redis; do"):  # fmt: skip
        flow.require_images(runner, STACK)


def test_down_with_volumes_refuses_without_a_terminal_or_yes(tmp_path, monkeypatch):
    state = StateDir(tmp_path)
    state.compose_file.write_text("services: {}\n")
    ran = []
    monkeypatch.setattr(flow, "local_runner", lambda: ran.append(1) or RecordingRunner())
    monkeypatch.setattr("sys.stdin.isatty", lambda: False)
    with pytest.raises(OpsError, match="refusing to delete data without confirmation; pass --yes"):
        flow.down(STACK, state, volumes=True)
    assert ran == []  # nothing was stopped either
    flow.down(STACK, state, volumes=True, yes=True)
    assert ran == [1]


def test_down_without_a_stack_says_so(tmp_path):
    with pytest.raises(OpsError, match="no stack has been set up here"):
        flow.down(STACK, StateDir(tmp_path))
