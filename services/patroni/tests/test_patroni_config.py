"""services/patroni: the rendered Patroni and HAProxy configs of the patroni-lab profile,
etcd's argv, the containers' flags, the image's files; and (@docker) the real programs of
the image accepting the rendered configs (`patroni --validate-config`, `haproxy -c`)."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import yaml
from datasvc_testkit import run_linter

from aiia_ops import DEFAULT_STACK
from aiia_ops.commands import patroni as p
from aiia_ops.model import load_stack

HERE = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def stack():
    return load_stack(DEFAULT_STACK, "patroni-lab")


def test_the_patroni_config_of_a_member(stack):
    me = p.member(stack, "lab16")
    c = yaml.safe_load(p.patroni_config(stack, me))
    assert (c["scope"], c["name"]) == ("aiia", "lab16")
    assert c["restapi"]["listen"] == "10.77.0.26:8008"
    assert c["etcd3"]["hosts"] == ["10.77.0.25:2379", "10.77.0.26:2379", "10.77.0.27:2379"]
    dcs = c["bootstrap"]["dcs"]
    assert (dcs["ttl"], dcs["loop_wait"], dcs["retry_timeout"]) == (20, 2, 5)
    assert dcs["loop_wait"] + 2 * dcs["retry_timeout"] <= dcs["ttl"]  # Patroni's rule
    assert dcs["maximum_lag_on_failover"] == 1048576
    assert dcs["postgresql"]["use_pg_rewind"] is True
    assert dcs["postgresql"]["parameters"]["shared_preload_libraries"] == "pg_stat_statements"
    assert "data-checksums" in c["bootstrap"]["initdb"]  # pg_rewind needs checksums or hints
    pg = c["postgresql"]
    assert pg["listen"] == pg["connect_address"] == "10.77.0.26:5432"
    assert pg["pg_hba"][:2] == ["local all aiia peer", "local all all scram-sha-256"]
    assert "host replication replicator 10.77.0.25/32 scram-sha-256" in pg["pg_hba"]
    assert pg["pg_hba"][-1] == "host all all 0.0.0.0/0 reject"
    # secrets come from PATRONI_* in the environment only
    for who in c["postgresql"]["authentication"].values():
        assert list(who) == ["username"]
    assert list(c["restapi"]["authentication"]) == ["username"]


def test_haproxy_sends_the_write_port_to_the_primary_and_the_read_port_to_replicas(stack):
    cfg = p.haproxy_config(stack, p.member(stack, "lab15"))
    primary, replicas = cfg.split("listen primary")[1].split("listen replicas")
    assert "bind 10.77.0.25:5000" in primary and "option httpchk GET /primary" in primary
    assert "bind 10.77.0.25:5001" in replicas
    assert "option httpchk GET /replica?lag=1MB" in replicas
    for host in ("lab15 10.77.0.25:5432", "lab16 10.77.0.26:5432", "lab17 10.77.0.27:5432"):
        assert f"server {host} maxconn 100 check port 8008" in primary
    assert "on-marked-down shutdown-sessions" in cfg


def test_etcd_and_the_containers(stack):
    me = p.member(stack, "lab17")
    argv = p.etcd_argv(stack, me)
    cluster = argv[argv.index("--initial-cluster") + 1]
    assert cluster == ("lab15=http://10.77.0.25:2380,lab16=http://10.77.0.26:2380,"
                       "lab17=http://10.77.0.27:2380")  # fmt: skip
    run = p.run_argv(stack, me, "aiia_patroni", "aiia/patroni:abc")
    assert run[:4] == ["docker", "run", "--detach", "--name"]
    for flag in (["--network", "host"], ["--memory", "256m"], ["--cap-drop", "ALL"],
                 ["--env-file", "/var/lib/aiia-patroni/lab17/secrets/patroni.env"],
                 ["--volume", "/var/lib/aiia-patroni/lab17/patroni:/etc/aiia:ro"]):  # fmt: skip
        assert any(run[i : i + 2] == flag for i in range(len(run))), flag
    assert "--read-only" in run and run[-2:] == ["patroni", "/etc/aiia/patroni.yml"]
    assert p.run_argv(stack, me, "aiia_etcd", "i")[-len(argv) :] == argv
    assert "GOMEMLIMIT=48MiB" in p.run_argv(stack, me, "aiia_etcd", "i")


def test_a_stack_without_three_database_hosts_is_refused_with_the_fix():
    with pytest.raises(Exception, match=r"no replication\.hosts: nothing runs Patroni"):
        p.members(load_stack(DEFAULT_STACK))


def test_timings_that_break_patronis_rules_are_refused_with_the_fix(stack):
    import dataclasses

    from aiia_ops.model.units import Duration

    bad = dataclasses.replace(stack.replication, ttl=Duration(10))
    with pytest.raises(Exception, match=r"ttl 10s, loop_wait 2s, retry_timeout 5s break"):
        p.members(dataclasses.replace(stack, replication=bad))
    bad = dataclasses.replace(stack.replication, retry_timeout=Duration(10))
    with pytest.raises(Exception, match=r"loop_wait \+ 2 x retry_timeout <= ttl"):
        p.members(dataclasses.replace(stack, replication=bad))


def test_the_parsers():
    text = json.dumps([
        {"Cluster": "aiia", "Member": "lab15", "Host": "10.77.0.25", "Role": "Leader",
         "State": "running", "TL": 3},
        {"Cluster": "aiia", "Member": "lab16", "Host": "10.77.0.26", "Role": "Replica",
         "State": "streaming", "TL": 3, "Lag in MB": 0},
    ])  # fmt: skip
    states = p.parse_list(text)
    assert p.leader(states).name == "lab15" and states[1].lag_mb == 0.0
    assert p.parse_mem("aiia_etcd 23.8MiB / 64MiB\naiia_haproxy 512KiB / 32MiB") == {
        "aiia_etcd": 23.8, "aiia_haproxy": 0.5}  # fmt: skip


def test_dockerfile_and_scripts_pass_the_linters():
    run_linter("hadolint", HERE / "Dockerfile")
    run_linter("shellcheck", HERE / "scripts" / "patroni-health")


@pytest.mark.docker
def test_the_image_accepts_the_rendered_configs(stack, tmp_path):
    inspect = ["docker", "image", "inspect", "--format", "{{.Id}}", "aiia/patroni:latest"]
    image = subprocess.run(inspect, capture_output=True, text=True)
    assert image.returncode == 0, "build it first: AIIA_PROFILE=patroni-lab invoke db.build"
    me = p.member(stack, "lab15")
    (tmp_path / "patroni.yml").write_text(p.patroni_config(stack, me))
    (tmp_path / "haproxy.cfg").write_text(p.haproxy_config(stack, me))
    tmp_path.chmod(0o755)
    for f in tmp_path.iterdir():
        f.chmod(0o644)
    env = [x for k in p.SECRET_KEYS for x in ("-e", f"{k}=not-a-secret")]
    base = ["docker", "run", "--rm", "--network", "none", "-v", f"{tmp_path}:/etc/aiia:ro",
            *env, "-e", "PATRONI_RESTAPI_USERNAME=patroni", "aiia/patroni:latest"]  # fmt: skip
    checked = subprocess.run([*base, "haproxy", "-c", "-f", "/etc/aiia/haproxy.cfg"],
                             capture_output=True, text=True, timeout=60)  # fmt: skip
    # the binds are the lab host's address, absent in this container: only that may fail
    assert checked.returncode == 0 or "cannot bind socket" in checked.stdout + checked.stderr, (
        checked.stdout + checked.stderr)  # fmt: skip
    valid = subprocess.run([*base, "patroni", "--validate-config", "/etc/aiia/patroni.yml"],
                           capture_output=True, text=True, timeout=60)  # fmt: skip
    out = valid.stdout + valid.stderr
    # the validator also checks the listen addresses exist on this machine: they are the lab
    # host's, so only those lines may be there
    problems = [line for line in out.splitlines() if line.strip() and "10.77.0.2" not in line]
    assert not problems, out
    versions = subprocess.run([*base, "cat", "/usr/local/share/aiia/postgres/versions"],
                              capture_output=True, text=True).stdout  # fmt: skip
    assert "patroni\t4.0.7" in versions and "etcd-server\t3.5.16" in versions
    assert "haproxy\t3.0.11" in versions
