"""The one engine client: docker CLI commands and parsers of their output, as data."""

from __future__ import annotations

import json

import pytest

from aiia_ops.commands import engine as cmd
from aiia_ops.commands import monitor as m
from aiia_ops.commands.argv import Result
from aiia_ops.errors import OpsError
from aiia_ops.host.engine import Engine, EngineError
from aiia_ops.host.runners import LocalRunner, RecordingRunner

ID_A, ID_B = "a" * 64, "b" * 64

INSPECT = [
    {
        "Id": ID_A,
        "Name": "/aiia-nginx",
        "RestartCount": 1,
        "State": {
            "Status": "running",
            "Running": True,
            "OOMKilled": False,
            "StartedAt": "2026-12-01T10:00:00.1Z",
            "Health": {"Status": "healthy"},
        },
        "HostConfig": {"Memory": 64 * 2**20, "NanoCpus": 250_000_000},
        "Config": {"Image": "aiia/nginx:abc"},
        "NetworkSettings": {"Networks": {"aiia": {"IPAddress": "172.30.0.2"}}},
    },
    {
        "Id": ID_B,
        "Name": "/aiia-redis",
        "State": {"Status": "exited", "Running": False, "OOMKilled": True, "StartedAt": ""},
        "HostConfig": {"Memory": 0, "NanoCpus": 0},
        "Config": {"Image": "aiia/redis:abc"},
        "NetworkSettings": {"Networks": {}},
    },
]

V1_GREP = f"""\
/sys/fs/cgroup/memory/docker/{ID_A}/memory.usage_in_bytes:4161536
/sys/fs/cgroup/memory/docker/{ID_A}/memory.stat:cache 8192
/sys/fs/cgroup/memory/docker/{ID_A}/memory.stat:total_inactive_file 8192
/sys/fs/cgroup/memory/docker/{ID_A}/memory.limit_in_bytes:67108864
/sys/fs/cgroup/memory/docker/{ID_A}/memory.max_usage_in_bytes:5000000
/sys/fs/cgroup/memory/docker/{ID_A}/memory.oom_control:oom_kill_disable 0
/sys/fs/cgroup/memory/docker/{ID_A}/memory.oom_control:under_oom 0
/sys/fs/cgroup/memory/docker/{ID_A}/memory.oom_control:oom_kill 2
/sys/fs/cgroup/cpuacct/docker/{ID_A}/cpuacct.usage:985472941
"""


def test_argv_of_each_question():
    assert cmd.info() == ["docker", "info", "--format", "{{json .}}"]
    assert cmd.ps("aiia") == [
        "docker", "ps", "--all", "--no-trunc", "--filter", "label=org.eduaiia.stack=aiia",
        "--format", "{{json .}}",
    ]  # fmt: skip
    assert cmd.inspect(["a", "b"]) == ["docker", "inspect", "--type", "container", "a", "b"]
    assert cmd.exec_in("aiia-redis", ["redis-cli", "PING"], 5) == [
        "docker", "exec", "aiia-redis", "timeout", "5", "redis-cli", "PING",
    ]  # fmt: skip
    assert cmd.exec_in("x", ["true"]) == ["docker", "exec", "x", "true"]
    assert cmd.read_cgroups([]) == []
    files = cmd.read_cgroups([ID_A])
    assert files[:3] == ["grep", "-sH", ""]
    assert f"/sys/fs/cgroup/memory/docker/{ID_A}/memory.usage_in_bytes" in files
    assert f"/sys/fs/cgroup/system.slice/docker-{ID_A}.scope/memory.current" in files
    assert len(files) == len(set(files))


def test_inspect_parsed_into_containers():
    found = cmd.parse_inspect(json.dumps(INSPECT))
    nginx = cmd.Container.from_inspect(found["aiia-nginx"])
    assert nginx == cmd.Container(
        name="aiia-nginx", id=ID_A, state="running", health="healthy", running=True,
        started_at="2026-12-01T10:00:00.1Z", restart_count=1, oom_killed=False,
        image="aiia/nginx:abc", memory_limit=64 * 2**20, cpu_limit=0.25,
        addresses={"aiia": "172.30.0.2"}, labels={},
    )  # fmt: skip
    redis = cmd.Container.from_inspect(found["aiia-redis"])
    assert (redis.health, redis.memory_limit, redis.cpu_limit, redis.oom_killed) == (
        "none", None, None, True,
    )  # fmt: skip
    assert cmd.parse_inspect("") == {} and cmd.parse_inspect("[]") == {}


def test_the_one_memory_formula():
    assert cmd.memory_used(60 * 2**20, 10 * 2**20) == 50 * 2**20
    assert cmd.memory_used(100, 200) == 0  # never negative
    assert cmd.memory_used(100, None) == 100
    assert cmd.memory_used(None, 5) is None
    # the monitor's Docker-stats-shaped reader is the same formula
    stats = {"memory_stats": {"usage": 100, "stats": {"inactive_file": 30}}}
    assert m.container_memory_used(stats) == cmd.memory_used(100, 30)


def test_cgroup_v1_counters_from_one_grep():
    usage = cmd.parse_cgroups(V1_GREP, [ID_A, ID_B])
    assert usage[ID_B] is None
    a = usage[ID_A]
    assert a.memory_used == 4161536 - 8192
    assert (a.memory_limit, a.memory_peak, a.cpu_ns, a.oom_kills, a.source) == (
        67108864, 5000000, 985472941, 2, "cgroup v1",
    )  # fmt: skip


def test_cgroup_v2_counters_and_unlimited():
    d = f"/sys/fs/cgroup/system.slice/docker-{ID_B}.scope"
    text = (
        f"{d}/memory.current:2000000\n{d}/memory.stat:anon 1\n{d}/memory.stat:inactive_file "
        f"1000000\n{d}/memory.max:max\n{d}/memory.events:oom 0\n{d}/memory.events:oom_kill 0\n"
        f"{d}/cpu.stat:usage_usec 1500\n{d}/cpu.stat:user_usec 1000\n"
    )
    b = cmd.parse_cgroups(text, [ID_B])[ID_B]
    assert (b.memory_used, b.memory_limit, b.cpu_ns, b.oom_kills, b.source) == (
        1000000, None, 1_500_000, 0, "cgroup v2",
    )  # fmt: skip


def test_docker_stats_is_the_lossy_fallback():
    text = '{"Name":"aiia-redis","MemUsage":"12.5MiB / 64MiB","CPUPerc":"0.10%"}\n'
    u = cmd.parse_stats(text)["aiia-redis"]
    assert (u.memory_used, u.memory_limit, u.cpu_ns) == (round(12.5 * 2**20), 64 * 2**20, None)
    assert cmd.parse_size_text("0B") == 0 and cmd.parse_size_text("1.5GB") == 1_500_000_000
    assert cmd.parse_size_text("n/a") is None


def test_engine_reads_through_any_runner():
    runner = RecordingRunner(
        {
            "docker info": '{"ServerVersion":"28.2.2","DockerRootDir":"/var/lib/docker"}',
            "docker inspect": json.dumps(INSPECT),
            "grep -sH": Result([], 2, V1_GREP, ""),  # some files missing: exit 2, still read
            "docker stats": '{"Name":"aiia-redis","MemUsage":"1MiB / 2MiB"}\n',
            "docker exec": "PONG\n",
        },
        host="web1",
    )
    engine = Engine(runner)
    assert engine.info()["DockerRootDir"] == "/var/lib/docker"
    found = engine.inspect(["aiia-nginx", "aiia-redis", "aiia-gone"])
    assert sorted(found) == ["aiia-nginx", "aiia-redis"]
    assert engine.inspect_raw(["aiia-nginx"])["aiia-nginx"]["HostConfig"]["NanoCpus"] == 250_000_000
    usage = engine.usage({"aiia-nginx": ID_A, "aiia-redis": ID_B})
    assert usage["aiia-nginx"].source == "cgroup v1"
    assert usage["aiia-redis"].source == "docker stats"
    assert engine.exec("aiia-redis", ["redis-cli", "PING"], 5).stdout == "PONG\n"
    assert runner.commands[-2] == cmd.stats(["aiia-redis"])  # only the one without cgroups
    assert runner.commands[-1] == cmd.exec_in("aiia-redis", ["redis-cli", "PING"], 5)


def test_an_unreachable_engine_says_what_to_do():
    runner = RecordingRunner(
        {
            "docker info": Result([], 1, '{"ServerErrors":["Cannot connect"]}', "Cannot connect"),
            "docker version": Result([], 1, '{"Server":null}', "Cannot connect"),
        },
        host="web1",
    )
    with pytest.raises(EngineError, match=r"on web1 does not answer .*invoke provision"):
        Engine(runner).info()
    with pytest.raises(EngineError, match=r"on web1 does not answer \(Cannot connect\)"):
        Engine(runner).ping()


def test_cgroup_files_read_from_a_real_tree(tmp_path):
    cid = "abc123"
    mem, cpu = tmp_path / "memory/docker" / cid, tmp_path / "cpuacct/docker" / cid
    mem.mkdir(parents=True)
    cpu.mkdir(parents=True)
    (mem / "memory.usage_in_bytes").write_text("4161536\n")
    (mem / "memory.stat").write_text("cache 8192\ntotal_inactive_file 8192\n")
    (cpu / "cpuacct.usage").write_text("985472941\n")
    u = Engine(LocalRunner(), cgroup_root=str(tmp_path)).usage({"c": cid})["c"]
    assert (u.memory_used, u.cpu_ns) == (4161536 - 8192, 985472941)


# --- invoke status over any runner ---------------------------------------------------------


def _attrs(name, cid, running=True, project="aiia", memory=0):
    return {
        "Id": cid,
        "Name": f"/{name}",
        "State": {"Status": "running" if running else "exited", "Running": running,
                  "Health": {"Status": "healthy"}},
        "HostConfig": {"Memory": memory, "NanoCpus": 500_000_000},
        "Config": {"Image": f"img/{name}:1", "Labels": {"org.eduaiia.stack": project}},
        "NetworkSettings": {"Networks": {"aiia_network": {"IPAddress": "172.30.0.9"}}},
    }  # fmt: skip


def test_stack_status_over_a_recorded_ssh_target():
    from aiia_ops import DEFAULT_STACK
    from aiia_ops.flows.status import stack_status, status_json, status_table_rows
    from aiia_ops.model import load_stack
    from aiia_ops.model.units import Size

    stack = load_stack(DEFAULT_STACK)
    inspect = [
        _attrs("aiia_nginx", ID_A, memory=64 * 2**20),
        _attrs("aiia_redis", ID_B, running=False),
        _attrs("aiia_pgbouncer", "c" * 64, project="other"),  # same name, another stack
    ]
    runner = RecordingRunner(
        {
            "docker version": '{"Client":{},"Server":{"Version":"28.2.2"}}',
            "docker inspect": Result([], 1, json.dumps(inspect), "No such container"),
            "grep -sH": Result([], 2, V1_GREP, ""),
        },
        host="web1",
    )
    rows = {r.service: r for r in stack_status(stack, runner)}
    assert runner.commands[0] == cmd.version()
    assert runner.commands[1] == cmd.inspect([c.container for c in stack.containers()])
    assert runner.commands[2] == cmd.read_cgroups([ID_A])  # only the running one
    assert len(runner.commands) == 3
    nginx = rows["nginx"]
    assert (nginx.state, nginx.health, nginx.address, nginx.image) == (
        "running", "healthy", "172.30.0.9", "img/aiia_nginx:1",
    )  # fmt: skip
    assert nginx.memory_used == Size(4161536 - 8192)
    assert (nginx.memory_limit, nginx.cpu_limit) == (Size(64 * 2**20), 0.5)
    assert (rows["redis"].state, rows["redis"].memory_used) == ("exited", None)
    assert rows["pgbouncer"].state == "absent" and rows["django_prod"].state == "absent"
    table = {r[0]: r for r in status_table_rows(list(rows.values()))}
    assert table["nginx"][3] == "4.0MB / 64MB"
    assert table["pgbouncer"][1:] == ["absent", "-", "- / -", "-", "-", "-"]
    data = {d["service"]: d for d in status_json(list(rows.values()))}
    assert data["nginx"]["memory_used"] == 4161536 - 8192
    assert data["redis"]["memory_limit"] is None


def test_stack_status_refuses_when_the_engine_does_not_answer():
    from aiia_ops import DEFAULT_STACK
    from aiia_ops.flows.status import stack_status
    from aiia_ops.model import load_stack

    runner = RecordingRunner(
        {"docker version": Result([], 1, '{"Server":null}', "Cannot connect")}, host="web1"
    )
    with pytest.raises(EngineError, match="Cannot connect"):
        stack_status(load_stack(DEFAULT_STACK), runner)
    assert len(runner.commands) == 1


# --- the monitor's engine facts ------------------------------------------------------------


def test_monitor_reads_every_container_in_two_commands_and_resamples_in_one():
    from aiia_ops import DEFAULT_STACK
    from aiia_ops.flows.monitor import containers, exec_in, read_usage
    from aiia_ops.model import load_stack

    stack = load_stack(DEFAULT_STACK)
    runner = RecordingRunner(
        {
            "docker inspect": json.dumps([_attrs("aiia_nginx", ID_A, memory=64 * 2**20)]),
            "grep -sH": Result([], 2, V1_GREP, ""),
            "docker exec aiia_redis timeout 5 redis-cli": "used_memory:1\n",
            "docker exec aiia_postgresql": Result([], 2, "", "psql: connection refused"),
        }
    )
    engine = Engine(runner)
    facts = {f.key: f for f in containers(stack, engine)}
    assert [c[:2] for c in runner.commands] == [["docker", "inspect"], ["grep", "-sH"]]
    nginx = facts["nginx"]
    assert (nginx.state, nginx.health, nginx.memory_limit, nginx.cpu_limit) == (
        "running", "healthy", 64 * 2**20, 0.5,
    )  # fmt: skip
    assert nginx.memory_used == 4161536 - 8192 and nginx.cpu[1] == 985472941
    assert facts["redis"].state == "absent" and facts["redis"].cpu is None
    read_usage(engine, list(facts.values()))
    assert runner.commands[-1] == cmd.read_cgroups([ID_A])
    assert exec_in(engine, "aiia_redis", ["redis-cli", "INFO", "memory"]) == "used_memory:1\n"
    with pytest.raises(OpsError, match=r"psql in aiia_postgresql failed \(2\): .*refused"):
        exec_in(engine, "aiia_postgresql", ["psql", "-c", "select 1"])


def test_one_monitor_run_at_a_time_through_the_one_lock(tmp_path):
    from aiia_ops.flows.monitor import RUN_LOCK, run_lock
    from aiia_ops.host import lock as locks
    from aiia_ops.model.state import StateDir

    state = StateDir(tmp_path)
    with run_lock(state, wait_s=0):
        assert locks.read(LocalRunner(), str(tmp_path), RUN_LOCK)["action"] == "monitor run"
        with pytest.raises(locks.LockHeld, match="monitor is locked by"), run_lock(state, 0.6):
            pass
    assert locks.read(LocalRunner(), str(tmp_path), RUN_LOCK) is None
