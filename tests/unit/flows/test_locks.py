"""invoke lock.status / lock.release, on a throwaway state dir of this machine."""

from __future__ import annotations

import pytest

from aiia_ops.errors import OpsError
from aiia_ops.flows import locks
from aiia_ops.host import lock
from aiia_ops.host.runners import LocalRunner
from aiia_ops.model import load_stack
from aiia_ops.model.state import local_state_dir


@pytest.fixture
def held(state_dir):
    model = load_stack()
    root = str(local_state_dir(model, "local").root)
    runner = LocalRunner()
    lock.acquire(runner, root, lock.deploy_lock("staging"), version="abc123", action="deploy")
    lock.acquire(runner, root, lock.backup_lock("prod"), action="backup")
    lock.acquire(runner, root, "renew", action="ssl-renew")
    return model, root


def test_status_lists_every_held_lock_with_its_holder(held):
    model, _ = held
    lines: list[str] = []
    found = locks.status(model, out=lines.append)
    assert set(found["local"]) == {"backup-prod", "deploy-staging", "renew"}
    text = "\n".join(lines)
    for column in locks.COLUMNS:
        assert column in text
    assert "deploy-staging" in text and "abc123" in text and "@" in text  # user@host
    assert str(found["local"]["renew"]["pid"]) in text


def test_status_of_a_host_without_locks(state_dir):
    lines: list[str] = []
    assert locks.status(load_stack(), out=lines.append) == {"local": {}}
    assert "  no lock held" in lines


def test_release_by_env_clears_that_environments_deploy_lock(held):
    model, root = held
    lines: list[str] = []
    assert locks.release(model, env="staging", yes=True, out=lines.append)
    assert lock.read(LocalRunner(), root, "deploy-staging") is None
    assert lock.read(LocalRunner(), root, "backup-prod") is not None
    assert lines[-1] == "deploy-staging on local: released"


def test_release_by_name_clears_any_lock(held):
    model, root = held
    assert locks.release(model, name="backup-prod", yes=True, out=lambda _: None)
    assert lock.read(LocalRunner(), root, "backup-prod") is None


def test_release_asks_first(held, monkeypatch):
    model, root = held
    monkeypatch.setattr("sys.stdin.isatty", lambda: False)
    with pytest.raises(OpsError, match="refusing to release renew without confirmation"):
        locks.release(model, name="renew", out=lambda _: None)
    assert lock.read(LocalRunner(), root, "renew") is not None


def test_release_of_a_free_lock_says_so(held):
    model, _ = held
    lines: list[str] = []
    assert not locks.release(model, env="prod", yes=True, out=lines.append)
    assert lines == ["deploy-prod on local: not locked"]


def test_release_needs_exactly_one_of_env_and_name(held):
    model, _ = held
    with pytest.raises(OpsError, match="say which lock"):
        locks.release(model, yes=True)
