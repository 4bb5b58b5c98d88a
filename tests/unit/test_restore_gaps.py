"""Issue #13, small gaps: hostile lock names and ACME directories are refused cleanly."""

from __future__ import annotations

import pytest

from aiia_ops.errors import OpsError
from aiia_ops.flows import locks
from aiia_ops.flows import tls as renewal
from aiia_ops.host import lock
from aiia_ops.host.runners import LocalRunner
from aiia_ops.model import load_stack
from aiia_ops.model.state import local_state_dir
from tests.conftest import run_invoke


@pytest.mark.parametrize("name", ["../x", "..", ".", "a/b", "/etc", "x\ny", "-rf"])
def test_a_lock_name_that_is_not_one_path_component_is_refused(state_dir, name):
    model = load_stack()
    outside = state_dir.parent / "x"
    outside.mkdir()
    with pytest.raises(OpsError, match="a lock name is 1-101 of"):
        locks.release(model, name=name, yes=True)
    assert outside.exists()  # nothing outside locks/ was touched
    with pytest.raises(OpsError, match="Nothing was changed"):
        lock.acquire(LocalRunner(), str(local_state_dir(model).root), name)


def test_lock_release_task_refuses_a_traversal_without_a_traceback(state_dir):
    proc = run_invoke("lock.release", "--name", "../x", "--yes")
    assert proc.returncode == 1
    assert "error: lock name '../x': a lock name is" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_a_stray_file_in_the_locks_dir_is_not_a_lock(state_dir):
    model = load_stack()
    root = str(local_state_dir(model).root)
    lock.acquire(LocalRunner(), root, "renew", action="ssl-renew")
    (local_state_dir(model).root / "locks" / ".holder.json.123.tmp").write_text("{}")
    assert set(lock.held_locks(LocalRunner(), root)) == {"renew"}


@pytest.mark.parametrize(
    "url",
    ["https://x/../../etc", "https://a.b/dir\n--x", "file:///etc/passwd", "https://a b/",
     "https://a.b/dir?x=1", "--server=https://evil"],
)  # fmt: skip
def test_ssl_renew_directory_goes_through_the_stack_value_s_rule(url):
    with pytest.raises(OpsError, match="expected an ACME directory URL"):
        renewal.check_directory(url)
    assert renewal.check_directory("https://127.0.0.1:14000/dir") == "https://127.0.0.1:14000/dir"


def test_ssl_renew_task_refuses_a_bad_directory_before_anything(state_dir):
    proc = run_invoke("ssl-renew", "--directory", "https://x/../y", "--dry-run")
    assert proc.returncode == 1
    assert "error: --directory 'https://x/../y': expected an ACME directory URL" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_restore_and_deploy_locks_exclude_each_other_naming_the_holder(tmp_path):
    """The e2e test does this with a real restore and a real deploy; here the same lock
    calls on a local state dir (flows/restore.py restore_locks, deploy's locks.acquire)."""
    from aiia_ops.flows.restore import restore_locks
    from aiia_ops.model.state import StateDir

    model, state, runner = load_stack(), StateDir(tmp_path / "state"), LocalRunner()
    prod = model.environment("prod")
    root = str(state.root)
    lock.acquire(runner, root, lock.deploy_lock("prod"), version="v1", action="deploy")
    with pytest.raises(OpsError) as refused, restore_locks(runner, state, prod, "backup.restore X"):
        pass
    text = str(refused.value)
    assert "cannot restore prod now: deploy-prod is locked by" in text
    assert "(deploy of v1, pid" in text and "Nothing was changed" in text
    assert not (state.root / "locks" / "backup-prod").exists()
    lock.release(runner, root, lock.deploy_lock("prod"))

    with restore_locks(runner, state, prod, "backup.restore X"):
        with pytest.raises(lock.LockHeld) as deploy:
            lock.acquire(runner, root, lock.deploy_lock("prod"), version="v2", action="deploy")
        assert "deploy-prod is locked by" in str(deploy.value)
        assert "(backup.restore X of -, pid" in str(deploy.value)
        staging = lock.acquire(runner, root, lock.deploy_lock("staging"), action="deploy")
        assert staging["name"] == "deploy-staging"  # the other environment is free
    assert set(lock.held_locks(runner, root)) == {"deploy-staging"}


def test_a_pause_limit_outside_3s_to_300s_is_a_key_path_error(tmp_path):
    from aiia_ops import DEFAULT_STACK
    from aiia_ops.model.types import StackError

    for bad in ("0s", "1h"):
        path = tmp_path / "stack.yml"
        text = DEFAULT_STACK.read_text()
        assert "pause_limit: 30s" in text
        path.write_text(text.replace("pause_limit: 30s", f"pause_limit: {bad}"))
        with pytest.raises(StackError, match=r"backups\.pause_limit: .* expected 3s-300s"):
            load_stack(path)
