"""Issue #16, replicated PostgreSQL: Patroni 4 + etcd 3.5 + HAProxy 3.0 on lab15-17.

The primary's host dies under write load (every process on it SIGKILLed at once: Patroni,
its PostgreSQL, etcd, HAProxy); a replica is promoted by Patroni alone; the writer, which
only knows the three HAProxy addresses, writes again after the failover window; every
write acknowledged before the failure is counted against the rows present (none may be
lost unless it was acknowledged within the replication lag of the failure); the old
primary comes back and rejoins as a replica (pg_rewind). Reads through the read port land
on the replicas (their own pg_stat_statements) and writes on the primary.

Figures (failover window, loss, lag, read throughput, memory) are printed and written to
$AIIA_PATRONI_FIGURES (default /tmp/aiia-patroni-figures.json) for docs/patroni.md.
"""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import time
from pathlib import Path

import pytest

from aiia_ops.commands import patroni as p
from tests.conftest import run_invoke
from tests.lab_patroni.conftest import invoke, load_average, rejoin_as_replica, streaming_all

pytestmark = [pytest.mark.docker, pytest.mark.e2e]
FIGURES = Path(os.environ.get("AIIA_PATRONI_FIGURES", "/tmp/aiia-patroni-figures.json"))
ROUNDS = int(os.environ.get("AIIA_PATRONI_ROUNDS", "2"))
READ_QUERY = "SELECT id, payload FROM probe_reads WHERE id = %s"
figures: dict = {}


def record(key: str, value) -> None:
    figures[key] = value
    FIGURES.write_text(json.dumps(figures, indent=2))
    print(f"\n{key}: {json.dumps(value)}", flush=True)


def statement_calls(cluster, name: str, prefix: str) -> int:
    sql = (
        "SELECT coalesce(sum(calls), 0) FROM pg_stat_statements s JOIN pg_database d "
        f"ON d.oid = s.dbid WHERE d.datname = 'aiia_prod' AND s.query LIKE '{prefix}%';"
    )
    return int(cluster.local_sql(name, sql))


def test_up_makes_one_primary_and_two_streaming_replicas(cluster):
    st = streaming_all(cluster)
    roles = sorted(m["role"] for m in st["members"])
    assert roles == ["Leader", "Replica", "Replica"], st
    assert len({m["timeline"] for m in st["members"]}) == 1
    # every port listens on the host's private address only, and the write port is the primary
    lead = cluster.leader()
    for name, h in cluster.hosts.items():
        via = cluster.sql(
            5000, "SELECT inet_server_addr(), pg_is_in_recovery();", hosts=[h.address]
        )
        assert via == f"{cluster.hosts[lead].address}|f", (name, via)
        via = cluster.sql(5001, "SELECT pg_is_in_recovery();", hosts=[h.address])
        assert via == "t", (name, via)
    mem = st["memory_mib"]
    record("memory_mib_after_up", mem)
    # no secret in what the hosts were given to read or in the task's output
    for name in cluster.hosts:
        config = Path(cluster.stack.hosts[name].state_dir, "patroni", "patroni.yml").read_text()
        for secret in cluster.secrets.values():
            assert secret not in config
        env_file = Path(cluster.stack.hosts[name].state_dir, "secrets", "patroni.env")
        assert oct(env_file.stat().st_mode & 0o777) == "0o600"


def test_reads_go_to_the_replicas_and_writes_to_the_primary(cluster):
    cluster.sql(5000, "DROP TABLE IF EXISTS probe_reads; CREATE TABLE probe_reads "
                "(id int PRIMARY KEY, payload text); INSERT INTO probe_reads SELECT g, "
                "md5(g::text) FROM generate_series(1, 1000) g;")  # fmt: skip
    streaming_all(cluster)
    lead = cluster.leader()
    replicas = [n for n in cluster.hosts if n != lead]
    for name in cluster.hosts:
        cluster.local_sql(name, "SELECT pg_stat_statements_reset();")
    out = json.loads(cluster.client(5001, "db-probe", "read", "--seconds", "8", "--clients", "4"))
    assert out["reads"] > 100 and out["errors"] == 0, out
    calls = {
        n: statement_calls(cluster, n, "SELECT id, payload FROM probe_reads") for n in cluster.hosts
    }
    assert calls[lead] == 0, calls  # the primary served none of them
    assert all(calls[n] > 0 for n in replicas), calls  # both replicas served some
    assert sum(calls.values()) >= out["reads"], (calls, out)
    # a write through the read port is refused by the replica; through the write port it
    # lands on the primary, and only there
    insert = "INSERT INTO probe_reads VALUES (0)"
    refused = subprocess.run(
        p.client_argv(cluster.image, "psql", "-X", "-At", "-c", insert),
        env=cluster.client_env(5001), capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert refused.returncode != 0 and "read-only transaction" in refused.stderr
    cluster.sql(5000, "INSERT INTO probe_reads SELECT g, 'w' FROM generate_series(1001, 1050) g;")
    writes = {
        n: statement_calls(cluster, n, "INSERT INTO probe_reads SELECT") for n in cluster.hosts
    }
    assert writes[lead] == 1 and all(writes[n] == 0 for n in replicas), writes
    record("reads_split", {"probe": out, "pg_stat_statements_calls": calls, "primary": lead})


def test_read_throughput_with_and_without_the_replicas(cluster):
    """The same read load (4 clients, 10 s) on the primary alone (:5000) and on the two
    replicas (:5001), then on both ports at once (the router's split). All hosts share this
    machine's 2 cores, so this shows the path works and what it costs, not real scaling."""
    load_before = load_average()
    primary = json.loads(
        cluster.client(5000, "db-probe", "read", "--seconds", "10", "--clients", "4")
    )
    replicas = json.loads(
        cluster.client(5001, "db-probe", "read", "--seconds", "10", "--clients", "4")
    )
    assert primary["errors"] == 0 and replicas["errors"] == 0
    assert primary["reads"] > 0 and replicas["reads"] > 0
    loads = {"loadavg_before": load_before, "loadavg_after": load_average()}
    record("read_throughput", {"primary_only_5000": primary, "replicas_5001": replicas, **loads})


def kill_primary_under_writes(cluster, round_no: int) -> dict:
    k = round_no
    lead = cluster.leader()
    survivors = [n for n in cluster.hosts if n != lead]
    cluster.sql(5000, f"CREATE TABLE probe_acks_{round_no} (id int PRIMARY KEY, "
                "at timestamptz NOT NULL DEFAULT clock_timestamp());")  # fmt: skip
    streaming_all(cluster)
    env = {**cluster.client_env(5000), "PGTARGETSESSIONATTRS": "read-write"}
    writer = subprocess.Popen(
        p.probe_argv(cluster.image, "write", "--seconds", "75", "--table", f"probe_acks_{k}"),
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        time.sleep(12)  # steady writes first
        lag_sql = (
            "SELECT application_name, pg_wal_lsn_diff(pg_current_wal_lsn(), replay_lsn), "
            "coalesce(extract(epoch FROM replay_lag) * 1000, 0) FROM pg_stat_replication;"
        )
        lag_rows = [r.split("|") for r in cluster.local_sql(lead, lag_sql).splitlines()]
        lag_bytes = max(float(r[1]) for r in lag_rows)
        lag_ms = max(float(r[2]) for r in lag_rows)
        killed_at = time.time()
        out = cluster.docker(lead, *p.kill_argv()[1:])
        assert out.returncode == 0, out.stderr
        stdout, stderr = writer.communicate(timeout=150)
    finally:
        if writer.poll() is None:
            writer.kill()
    events = [json.loads(line) for line in stdout.splitlines() if line.startswith("{")]
    acks = [e for e in events if "ack" in e]
    before = [e for e in acks if e["t"] <= killed_at]
    after = [e for e in acks if e["t"] > killed_at]
    assert len(before) > 100, f"too few writes before the kill: {len(before)}; {stderr[-500:]}"
    assert after, f"no write succeeded after the kill; last errors: {events[-3:]}"
    # `docker kill` takes a moment: writes acknowledged just after `killed_at` went to the
    # old primary before it died. The outage is the longest silence between two acks from
    # the kill on; the failure is the last ack before it.
    tail = [e for e in acks if e["t"] >= before[-1]["t"]]
    gaps = [(b["t"] - a["t"], a, b) for a, b in itertools.pairwise(tail)]
    assert gaps, "no ack after the last one before the kill"
    window, last_old, first_new = max(gaps, key=lambda g: g[0])
    failed_at = last_old["t"]
    # a replica was promoted by Patroni itself
    st, new = {}, []  # the old primary is down: two members answer
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        st = cluster.status()
        new = [m for m in st["members"] if m["role"] == "Leader" and m["state"] == "running"]
        if new:
            break
        time.sleep(1)
    new_leader = new[0]["name"]
    assert new_leader in survivors, st
    present = {
        int(x) for x in cluster.sql(5000, f"SELECT id FROM probe_acks_{round_no};",
                                    hosts=[cluster.hosts[n].address for n in survivors]).split()
    }  # fmt: skip
    acked = {e["ack"] for e in acks}
    lost = sorted(acked - present)
    lost_at = [next(e["t"] for e in acks if e["ack"] == i) for i in lost]
    # only a write acknowledged within the replication lag of the failure may be lost
    allowed = lag_ms / 1000 + 0.05  # + the lag sample's own staleness (it was read just before)
    late = [t for t in lost_at if failed_at - t > allowed]
    assert not late, f"{len(late)} acknowledged writes older than the lag were lost: {lost}"
    result = {
        "round": round_no, "killed": lead, "promoted": new_leader,
        "window_s": round(window, 2),
        "kill_to_first_new_ack_s": round(first_new["t"] - killed_at, 2),
        "acks_after_kill_on_old_primary": sum(1 for e in after if e["t"] <= failed_at),
        "acked": len(acked), "acked_before_kill": len(before), "present": len(present & acked),
        "lost": len(lost), "lag_before_kill_bytes": lag_bytes, "lag_before_kill_ms": lag_ms,
        "write_rate_per_s": round(len(before) / (before[-1]["t"] - before[0]["t"]), 1),
        "errors_during_window": sum(1 for e in events if "err" in e),
        "loadavg": load_average(),
    }  # fmt: skip
    return result


def rejoin(cluster, old: str, round_no: int) -> dict:
    table = f"probe_acks_{round_no}"
    took, row = rejoin_as_replica(
        cluster, old, f"SELECT count(*), coalesce(max(id), 0) FROM {table};"
    )
    logs = cluster.docker(old, "logs", "aiia_patroni")
    rewound = "pg_rewind" in (logs.stdout + logs.stderr)
    return {"rejoined_s": round(took, 1), "pg_rewind_in_log": rewound, "timeline": row["timeline"]}


def test_the_primarys_host_dies_under_writes_a_replica_takes_over_the_old_one_rejoins(cluster):
    rounds = []
    for k in range(1, ROUNDS + 1):
        result = kill_primary_under_writes(cluster, k)
        result.update(rejoin(cluster, result["killed"], k))
        rounds.append(result)
        record(f"failover_round_{k}", result)
    record("failover", rounds)


def test_a_planned_switchover_moves_the_primary_and_keeps_every_row(cluster):
    lead = cluster.leader()
    cluster.sql(5000, "CREATE TABLE IF NOT EXISTS probe_switch (id int PRIMARY KEY);"
                "INSERT INTO probe_switch SELECT g FROM generate_series(1, 500) g;")  # fmt: skip
    out = invoke("db.switchover", "--yes", timeout=300).stdout
    new = cluster.leader()
    assert new != lead and f"primary {lead} -> {new}" in out, out
    assert cluster.sql(5000, "SELECT count(*) FROM probe_switch;") == "500"
    cluster.sql(5000, "INSERT INTO probe_switch VALUES (501);")
    st = streaming_all(cluster)
    assert next(m for m in st["members"] if m["name"] == lead)["role"] == "Replica"
    record("switchover", {"from": lead, "to": new, "task_output": out.strip().splitlines()[-1]})
    record("memory_mib_at_end", st["memory_mib"])


def test_bad_input_is_one_line_and_changes_nothing(cluster):
    lead = cluster.leader()
    bad = invoke_fail("db.switchover", "--to", "lab9", "--yes")
    assert (
        bad.strip() == "error: 'lab9' is not a database host; expected one of: lab15, lab16, lab17"
    )
    bad = invoke_fail("db.switchover", "--to", lead, "--yes")
    assert bad.strip() == f"error: {lead} is already the primary; name a replica or omit --to"
    bad = invoke_fail("db.down", "--wipe")
    assert "refusing to delete the cluster's data without confirmation; pass --yes" in bad
    assert cluster.leader() == lead


def invoke_fail(*args: str) -> str:
    proc = run_invoke(*args, timeout=300)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr
    return proc.stderr
