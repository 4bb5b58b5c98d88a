"""flows/patroni.py on recorded hosts: db.up's start is idempotent (create what is missing,
start what is stopped, leave what runs), etcd first on every host; the env file and the
configs written per host, the secrets only in the 0600 env file; switchover's refusals."""

from __future__ import annotations

import pytest

from aiia_ops import DEFAULT_STACK
from aiia_ops.commands import patroni as p
from aiia_ops.commands.argv import Result
from aiia_ops.errors import OpsError
from aiia_ops.flows import patroni as flow
from aiia_ops.host.runners import RecordingRunner
from aiia_ops.model import load_stack

STACK = load_stack(DEFAULT_STACK, "patroni-lab")
INSPECT = "docker inspect --format '{{.State.Status}}'"


def host(states: dict[str, str]) -> RecordingRunner:
    answers = {f"{INSPECT} {c}": (Result([], 0, s) if s != "missing" else Result([], 1, "", "no"))
               for c, s in states.items()}  # fmt: skip
    return RecordingRunner(answers)


def changes(r: RecordingRunner) -> list[str]:
    return [" ".join(c[:4]) for c in r.commands if c[1] != "inspect"]


def test_start_creates_the_missing_starts_the_stopped_and_leaves_the_running():
    rs = {
        name: host(dict.fromkeys(p.CONTAINERS, state))
        for name, state in (("lab15", "running"), ("lab16", "exited"), ("lab17", "missing"))
    }
    said: list[str] = []
    flow.start(STACK, rs, out=said.append)
    assert changes(rs["lab15"]) == []
    assert changes(rs["lab16"]) == [f"docker start {c}" for c in p.CONTAINERS]
    assert [c[:5] for c in rs["lab17"].commands if c[1] == "run"] == [
        ["docker", "run", "--detach", "--name", c] for c in p.CONTAINERS]  # fmt: skip
    # etcd on every host before any Patroni: it waits for its peers' quorum
    assert said[:2] == ["-> lab16: starting aiia_etcd (was exited)", "-> lab17: creating aiia_etcd"]


def test_files_per_host_and_the_secrets_only_in_the_0600_env_file():
    rs = {m.name: RecordingRunner() for m in p.members(STACK)}
    secrets = {k: f"s3cret-{i}-value" for i, k in enumerate(p.SECRET_KEYS)}
    flow.write_files(STACK, rs, secrets)
    files = rs["lab16"].files
    env = files["/var/lib/aiia-patroni/lab16/secrets/patroni.env"].decode()
    assert env.splitlines()[0] == "PATRONI_SUPERUSER_PASSWORD=s3cret-0-value"
    for name in ("patroni.yml", "haproxy.cfg"):
        text = files[f"/var/lib/aiia-patroni/lab16/patroni/{name}"].decode()
        assert not any(v in text for v in secrets.values())


def test_a_switchover_to_a_host_outside_the_cluster_or_to_the_primary_is_refused(monkeypatch):
    listing = ('[{"Member": "lab15", "Host": "10.77.0.25", "Role": "Leader", "State": "running",'
               ' "TL": 1}, {"Member": "lab16", "Host": "10.77.0.26", "Role": "Replica", '
               '"State": "streaming", "TL": 1, "Lag in MB": 0}]')  # fmt: skip
    rs = {m.name: RecordingRunner({"docker exec aiia_patroni patronictl": listing})
          for m in p.members(STACK)}  # fmt: skip
    monkeypatch.setattr(flow, "runners", lambda stack: rs)
    with pytest.raises(OpsError, match="'lab9' is not a database host"):
        flow.switchover(STACK, "lab9", yes=True)
    with pytest.raises(OpsError, match="lab15 is already the primary"):
        flow.switchover(STACK, "lab15", yes=True)
    with pytest.raises(OpsError, match="lab17 is not a streaming replica"):
        flow.switchover(STACK, "lab17", yes=True)
    assert not any("switchover" in c for r in rs.values() for c in r.commands)


def test_the_app_reaches_the_cluster_through_every_members_haproxy():
    assert p.app_database_env(STACK) == {
        "DB_HOST": "10.77.0.25,10.77.0.26,10.77.0.27", "DB_PORT": "5000",
        "DB_REPLICA_HOST": "10.77.0.25,10.77.0.26,10.77.0.27", "DB_REPLICA_PORT": "5001",
        "DB_LOAD_BALANCE_HOSTS": "random",  # a lost host holds a third of the connections
    }  # fmt: skip


def test_the_monitor_reads_the_leaders_own_pg_stat_replication(monkeypatch):
    listing = ('[{"Member": "lab15", "Host": "10.77.0.25", "Role": "Replica", "State": '
               '"streaming", "TL": 2}, {"Member": "lab16", "Host": "10.77.0.26", "Role": '
               '"Leader", "State": "running", "TL": 2}]')  # fmt: skip
    rs = {"lab15": RecordingRunner({"docker exec aiia_patroni patronictl": listing}),
          "lab16": RecordingRunner({"docker exec -i aiia_patroni psql": "lab15|streaming|0|1.5\n"}),
          "lab17": RecordingRunner()}  # fmt: skip
    monkeypatch.setattr(flow, "runners", lambda stack: rs)
    states, rows = flow.replication(STACK)
    assert [s.name for s in states] == ["lab15", "lab16"]
    assert rows == {"lab15": ("streaming", 0.0, 1.5)}
    assert rs["lab17"].commands == [] and p.replication_argv() in rs["lab16"].commands


class CutOff(RecordingRunner):
    """A member's host that does not answer (SSH's connect timeout): every call raises."""

    def _execute(self, argv, *, input, env, timeout, stream):
        self.commands.append(argv)
        raise OpsError("cannot connect to root@10.77.0.26:22: no answer within 15s")


def test_status_and_the_monitor_read_past_a_member_cut_off_the_network(monkeypatch):
    listing = ('[{"Member": "lab15", "Host": "10.77.0.25", "Role": "Leader", "State": "running",'
               ' "TL": 2}, {"Member": "lab17", "Host": "10.77.0.27", "Role": "Replica", '
               '"State": "streaming", "TL": 2, "Lag in MB": 0}]')  # fmt: skip
    stats = "aiia_etcd 30.1MiB / 64MiB\naiia_patroni 90MiB / 256MiB\n"
    answers = {"docker exec aiia_patroni patronictl": listing, "docker stats": stats}
    rs = {"lab16": CutOff(host="lab16"), "lab15": RecordingRunner(answers, host="lab15"),
          "lab17": RecordingRunner(answers, host="lab17")}  # fmt: skip
    monkeypatch.setattr(flow, "runners", lambda stack: rs)
    states, mem = flow.status(STACK)
    assert [(s.name, s.role) for s in states] == [("lab15", "Leader"), ("lab17", "Replica")]
    assert set(mem) == {"lab15", "lab17"}  # the cut-off host left out, not a traceback
    assert len(rs["lab16"].commands) == 1  # asked once per call: one connect timeout, not two
    states, lag = flow.replication(STACK)
    assert p.leader(states).name == "lab15" and lag == {}  # the canned leader says nothing
