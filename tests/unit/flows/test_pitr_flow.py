"""flows/pitr.py against a recording runner: the order of the steps, the refusals that
change nothing, and the scratch container's clean-up. The real thing: tests/lab_offsite."""

from __future__ import annotations

import json

import pytest

from aiia_ops.commands import backups as bk
from aiia_ops.errors import OpsError
from aiia_ops.flows import pitr as flow
from aiia_ops.host.runners import RecordingRunner, Result
from aiia_ops.model.load import stack_from_data
from aiia_ops.model.state import StateDir
from tests.stackfiles import patched_stack
from tests.unit.test_pgbackrest import INFO, LAB_REPO

ARCHIVER = {"archived": 9, "last_wal": "000000010000000000000009", "last_time": 1796175300,
            "failed": 0, "last_failed_wal": None, "last_failed_time": None,
            "current_wal": "00000001000000000000000A", "ready": 0, "oldest_ready": None,
            "now": 1796175400}  # fmt: skip


class Host(RecordingRunner):
    def __init__(self, promoted: bool = True):
        super().__init__()
        self.promoted = promoted
        self.inputs: list[str] = []

    def _execute(self, argv, *, input, env, timeout, stream) -> Result:
        self.commands.append(argv)
        text = input.decode() if isinstance(input, bytes) else (input or "")
        self.inputs.append(text)
        if "pg_switch_wal" in text:
            return Result(argv, 0, "000000010000000000000009\n")
        if "pg_stat_archiver" in text:
            return Result(argv, 0, json.dumps(ARCHIVER))
        if "pg_is_in_recovery" in text:
            return Result(argv, 0, "f\n" if self.promoted else "t\n")
        if "info" in argv and "--output=json" in argv:
            return Result(argv, 0, INFO)
        if argv[:3] == ["docker", "inspect", "-f"]:
            return Result(argv, 0, "aiia/postgres:t\n" if "Image" in argv[3] else "true\n")
        return Result(argv)

    def changes(self) -> list[str]:
        """docker run/volume commands, less the read-only `pgbackrest info` one-off."""
        return [
            " ".join(a)
            for a in self.commands
            if a[:2] in (["docker", "run"], ["docker", "volume"])
            and a[-2:] != ["info", "--output=json"]
        ]


@pytest.fixture
def stack():
    patch = {"backups": {"pitr": {"enabled": True, "repo1": LAB_REPO}}}
    return stack_from_data(patched_stack(patch))


def test_a_moment_outside_the_window_changes_nothing(stack, tmp_path):
    host = Host()
    with pytest.raises(OpsError, match="outside the recoverable window"):
        flow.pitr(stack, StateDir(tmp_path), "prod", "2000-01-01 00:00:00", host, yes=True)
    assert host.changes() == []


def test_archiving_off_is_refused_before_anything_runs(tmp_path):
    host = Host()
    with pytest.raises(OpsError, match="point-in-time recovery is off"):
        flow.pitr(stack_from_data(patched_stack()), StateDir(tmp_path), "prod", "latest", host)
    assert host.commands == []


def test_pitr_restores_beside_with_archiving_off_then_swaps_and_cleans_up(
    stack, tmp_path, monkeypatch
):
    host = Host()
    calls = {}
    record = bk.BackupRecord(
        "20261202T020000Z-prod-pitr", "prod", "pitr", None, str(tmp_path / "set"), {}, {}
    )

    def take_set(s, state, env, kind, runner):
        calls["dumped_from"] = s.services.postgresql.container
        calls["kind"] = kind
        return record

    def restore_backup(s, state, env, backup_id, runner, **kw):
        calls["restored"] = (env, backup_id, kw["media"])
        return {"switch_s": 0.1, "safety_backup": "x"}

    monkeypatch.setattr(flow, "take_set", take_set)
    monkeypatch.setattr(flow, "restore_backup", restore_backup)
    report = flow.pitr(stack, StateDir(tmp_path), "prod", "2026-12-02 01:40:00", host, yes=True)
    changes = host.changes()
    restore = next(c for c in changes if "restore" in c.split())
    assert "--type=time" in restore and "--target=2026-12-02 01:40:00.000000+00" in restore
    server = next(c for c in changes if "postgres -c archive_mode=off" in c)
    assert "--name aiia_postgresql_pitr" in server
    assert calls == {"dumped_from": "aiia_postgresql_pitr", "kind": "pitr",
                     "restored": ("prod", record.id, False)}  # fmt: skip
    assert changes[-1] == "docker volume rm -f aiia_pitr_scratch"  # removed after the swap
    assert bk.remove_tree(record.path) in host.commands  # the transport set goes too
    assert report["pitr_set"] == record.id


def test_a_copy_that_does_not_start_is_a_clear_error_and_is_removed(stack, tmp_path):
    host = Host()
    original = host._execute

    def execute(argv, **kw):
        if argv[:3] == ["docker", "inspect", "-f"] and "Running" in argv[3]:
            host.commands.append(argv)
            return Result(argv, 0, "false\n")
        if argv[:3] == ["docker", "logs", "--tail"]:
            host.commands.append(argv)
            return Result(
                argv,
                0,
                "",
                "FATAL:  recovery ended before configured recovery target was reached\n",
            )
        return original(argv, **kw)

    host._execute = execute
    with pytest.raises(OpsError, match="recovery ended before configured recovery target"):
        flow.pitr(stack, StateDir(tmp_path), "prod", "latest", host, yes=True)
    assert host.changes()[-1] == "docker volume rm -f aiia_pitr_scratch"


def test_a_repository_the_restore_keys_cannot_read_is_refused_before_any_change(stack, tmp_path):
    """The window is read in a one-off container given the state's env file (the keys the
    restore uses): a wrong key stops the run there, explained, with nothing changed."""
    host = Host()
    original = host._execute
    unreadable = json.dumps([{"name": "aiia", "backup": [], "archive": [], "status": {
        "code": 99, "message": "[CryptoError] cipher header invalid"}}])  # fmt: skip

    def execute(argv, **kw):
        if argv[:3] == ["docker", "run", "--rm"] and argv[-2:] == ["info", "--output=json"]:
            host.commands.append(argv)
            return Result(argv, 0, unreadable)
        return original(argv, **kw)

    host._execute = execute
    with pytest.raises(OpsError) as err:
        flow.pitr(stack, StateDir(tmp_path), "prod", "latest", host, yes=True)
    assert str(err.value).startswith("the repository cannot be read with this key")
    assert str(err.value).endswith("nothing was changed")
    one_off = next(a for a in host.commands if a[-2:] == ["info", "--output=json"])
    assert one_off[:5] == ["docker", "run", "--rm", "--env-file", f"{tmp_path}/env/postgresql.env"]
    assert host.changes() == []


def test_switch_and_wait_waits_for_the_segment_it_closed(stack):
    host = Host()
    flow.switch_and_wait(stack, host, timeout=1)
    switch = [i for i in host.inputs if "pg_switch_wal" in i]
    assert switch == ["SELECT pg_walfile_name(pg_switch_wal() - 1);"]


def test_each_lab_store_keeps_its_sockets_beside_its_data(stack):
    from aiia_ops.flows import offsite

    p = offsite.paths("/var/lib/aiia-lab/lab20/offsite")
    argv = offsite.weed_argv(stack, "10.77.0.30", p)
    sockets = {a.split("=", 1)[0]: a.split("=", 1)[1] for a in argv if "Socket=" in a}
    assert sockets == {
        "-filer.localSocket": "/var/lib/aiia-lab/lab20/offsite/filer.sock",
        "-s3.localFilerSocket": "/var/lib/aiia-lab/lab20/offsite/filer.sock",
        "-s3.localSocket": "/var/lib/aiia-lab/lab20/offsite/s3.sock",
    }
    assert not [a for a in argv if "/tmp" in a]


def test_init_waits_for_a_primary_before_the_stanza(stack, monkeypatch):
    """pgBackRest needs a primary: init asks first, and says clearly when there is none."""
    monkeypatch.setattr(flow.time, "sleep", lambda s: None)
    host = Host(promoted=True)
    flow.init(stack, host)
    first_pgbackrest = next(i for i, a in enumerate(host.commands) if "pgbackrest" in a)
    assert "pg_is_in_recovery" in "".join(host.inputs[:first_pgbackrest])
    standby = Host(promoted=False)
    with pytest.raises(OpsError, match="did not answer as a primary within 0s"):
        flow.wait_primary(stack, standby, timeout=0)
    assert not any("pgbackrest" in a for a in standby.commands)
