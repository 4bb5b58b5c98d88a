"""The load test's procedure as data: recorded runner answers → the commands it runs, the
files it writes, the facts it draws (flows/loadtest.py, commands/loadtest.py)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from aiia_ops.commands import loadtest as lt
from aiia_ops.commands.argv import Result, quote
from aiia_ops.errors import OpsError
from aiia_ops.flows import loadtest as flow
from aiia_ops.host.engine import Engine
from aiia_ops.host.runners import RecordingRunner
from aiia_ops.model import load_stack
from aiia_ops.model.state import StateDir

ID = "c" * 64
STATE = StateDir(Path("/var/lib/aiia"))


@pytest.fixture(scope="module")
def stack():
    return load_stack()


def inspect_json(name: str, started="2026-12-01T10:00:00Z", restarts=0, oom=False, labels=None):
    return json.dumps(
        [
            {
                "Id": ID,
                "Name": f"/{name}",
                "RestartCount": restarts,
                "State": {"Status": "running", "Running": True, "OOMKilled": oom,
                          "StartedAt": started},
                "HostConfig": {},
                "Config": {"Labels": labels or {}},
            }
        ]
    )  # fmt: skip


def grep(cpu_ns: int, usage: int, oom_kills: int = 0) -> str:
    mem, cpu = f"/sys/fs/cgroup/memory/docker/{ID}", f"/sys/fs/cgroup/cpuacct/docker/{ID}"
    return (
        f"{mem}/memory.usage_in_bytes:{usage}\n{mem}/memory.stat:total_inactive_file 0\n"
        f"{mem}/memory.oom_control:oom_kill {oom_kills}\n{cpu}/cpuacct.usage:{cpu_ns}\n"
    )


def test_the_bare_app_runs_with_the_environments_limits_and_config(stack):
    prod = stack.environment("prod")
    argv = lt.bare_run_argv(stack, prod, "/var/lib/aiia/config", "aiia/django:abc", "/x/bare")
    assert quote(argv).startswith(
        f"docker run --detach --rm --name {stack.project}_loadtest_bare "
        f"--network {stack.network.name} --ip {lt.bare_address(stack)} "
        f"--memory {prod.memory.limit.bytes} --memory-swap {prod.memory.limit.bytes} "
        f"--cpus {prod.cpu.limit:g} "
    )
    assert "type=bind,source=/x/bare,target=/loadtest,readonly" in argv
    assert argv[-7:] == ["aiia/django:abc", "gunicorn", "-c", "/etc/aiia/gunicorn.conf.py",
                         "--pythonpath", "/loadtest", "bare:application"]  # fmt: skip
    assert lt.bare_address(stack).endswith(".30")
    assert lt.remove_container("x") == ["docker", "rm", "--force", "x"]
    assert lt.app_logs_since("app", 12.7) == ["docker", "logs", "--since", "12", "app"]


def test_small_facts():
    assert lt.token_from_env_file("A=1\nAPI_WRITE_TOKEN = s3cret \n") == "s3cret"
    assert lt.token_from_env_file("API_WRITE_TOKEN=\n") is None
    assert lt.parse_loadavg("1.234 0.5 0.25 2/345 6789\n") == (1.23, 0.5, 0.25)
    log = "[ERROR] WORKER TIMEOUT (pid:7)\n... WORKER TIMEOUT ...\nWorker failed to boot"
    assert lt.log_trouble(log) == {"WORKER TIMEOUT": 2, "Worker failed to boot": 1}
    assert lt.log_trouble("all quiet") == {}


def test_write_token_from_the_apps_env_file(stack, monkeypatch):
    monkeypatch.delenv("AIIA_API_WRITE_TOKEN", raising=False)
    prod = stack.environment("prod")
    runner = RecordingRunner()
    assert flow.write_token(runner, STATE, prod) is None
    runner.files[str(STATE.secrets / "prod.env")] = b"API_WRITE_TOKEN=from-secrets\n"
    assert flow.write_token(runner, STATE, prod) == "from-secrets"
    runner.files[str(STATE.env_files / "django_prod.env")] = b"API_WRITE_TOKEN=from-app\n"
    assert flow.write_token(runner, STATE, prod) == "from-app"


def test_wrk_is_found_or_named():
    runner = RecordingRunner({"wrk --version": Result([], 1, "", "wrk 4.1.0 [epoll] x\nUsage")})
    assert flow.require_wrk(runner) == "wrk 4.1.0 [epoll] x"
    missing = RecordingRunner({"wrk": Result([], 127, "", "wrk: command not found")})
    if flow.os.geteuid() != 0:
        with pytest.raises(OpsError, match="apt-get install wrk"):
            flow.require_wrk(missing)


def test_the_wrk_script_lives_only_for_the_run():
    runner = RecordingRunner({"wrk": "AIIA_LOADTEST {}\n"})
    out, code = flow.run_wrk(runner, STATE, "-- script", lambda p: ["wrk", "--script", p], 10)
    assert (out, code) == ("AIIA_LOADTEST {}\n", 0)
    (path,) = runner.files
    assert path.startswith("/var/lib/aiia/loadtest/wrk-") and path.endswith(".lua")
    assert runner.files[path] == b"-- script"
    assert runner.commands == [["wrk", "--script", path], ["rm", "-f", path]]


def test_integrity_before_and_after(stack):
    name = "aiia_redis"
    before = flow.integrity_snapshot(
        Engine(RecordingRunner({"docker inspect": inspect_json(name), "grep": grep(1, 1)})),
        [name, "gone"],
    )
    assert before == {
        name: {"present": True, "running": True, "started_at": "2026-12-01T10:00:00Z",
               "restart_count": 0, "oom_killed": False, "oom_kills": 0},
        "gone": {"present": False},
    }  # fmt: skip
    again = flow.integrity_snapshot(
        Engine(RecordingRunner({"docker inspect": inspect_json(name), "grep": grep(1, 1)})), [name]
    )
    assert lt.integrity_report(before, again, {})["ok"]
    restarted = flow.integrity_snapshot(
        Engine(
            RecordingRunner(
                {"docker inspect": inspect_json(name, "2026-12-01T11:00:00Z", 1, oom=True),
                 "grep": grep(1, 1, oom_kills=2)}
            )
        ),
        [name],
    )  # fmt: skip
    report = lt.integrity_report(before, restarted, {"app": {"WORKER TIMEOUT": 3}})
    assert report["problems"] == [
        f"{name} restarted",
        f"{name}: the engine reports OOMKilled",
        f"{name}: 2 process(es) OOM-killed",
        "app log: 'WORKER TIMEOUT' x3",
    ]


class Counting:
    """An engine whose container uses 0.5 core and 10 MB more at every reading."""

    def __init__(self):
        self.n = 0

    def usage(self, containers):
        self.n += 1
        from aiia_ops.commands.engine import Usage

        return {
            name: Usage(self.n * 10 * lt.MB, 0, None, None, self.n * 10**9, 0, "cgroup v1")
            for name in containers
        }


def test_the_sampler_reads_every_container_once_a_second(monkeypatch):
    monkeypatch.setattr(flow, "SAMPLE_EVERY_S", 0.05)
    with flow.Sampler(Counting(), {"a": ID}) as sampler:
        sampler.add("b", ID)
        flow.time.sleep(0.3)
    by = {s.container for s in sampler.samples}
    assert by == {"a", "b"}
    memories = [s.memory for s in sampler.samples if s.container == "a"]
    assert memories == sorted(memories) and memories[0] == 20 * lt.MB  # the first has no CPU
    assert all(s.cpu > 0 for s in sampler.samples)


def test_the_ceiling_runs_behind_nginx_and_is_gone_afterwards(stack, monkeypatch):
    monkeypatch.setattr(flow, "wait_for", lambda *a, **k: None)
    prod = stack.environment("prod")
    labels = {"org.eduaiia.release": "abc123"}
    runner = RecordingRunner({"docker inspect": inspect_json(prod.container, labels=labels)})
    with flow.bare_ceiling(runner, Engine(runner), stack, prod, STATE, 443) as name:
        assert name == lt.bare_container_name(stack)
        during = [quote(c) for c in runner.commands]
    conf = f"/var/lib/aiia/config/nginx/conf.d/{lt.BARE_CONF}"
    assert str(STATE.sub("loadtest") / "bare" / "bare.py") in runner.files
    assert b"server_name bare.loadtest.invalid;" in runner.files[conf]
    after = [quote(c) for c in runner.commands][len(during) :]
    nginx = stack.services.nginx.container
    assert during[0].startswith("docker inspect --type container")
    assert during[1] == "install -d -m 0755 /var/lib/aiia/loadtest/bare"
    assert during[2] == f"docker rm --force {name}"
    assert during[3].startswith(f"docker run --detach --rm --name {name} ")
    assert f"{prod.image}:abc123 gunicorn" in during[3]
    assert during[4].startswith(f"docker exec {nginx} nginx -t")
    assert during[5].startswith(f"docker exec {nginx} nginx -s reload")
    assert after[0] == f"rm -f {conf}"
    assert after[-1] == f"docker rm --force {name}"


def test_no_ceiling_without_a_running_app(stack):
    prod = stack.environment("prod")
    runner = RecordingRunner()
    ceiling = flow.bare_ceiling(runner, Engine(runner), stack, prod, STATE, 443)
    with pytest.raises(OpsError, match=f"{prod.container} is not running; run invoke setup"):
        ceiling.__enter__()


def test_options_are_checked():
    with pytest.raises(OpsError, match="--duration and --ceiling-duration must be 1 to 600"):
        flow.Options(duration=0).check()


LIVE_ID = "a" * 64
GONE_ID = "b" * 64
DMESG = (
    "[  100.000001] something else\n"
    f"[  900.500000] oom-kill:constraint=CONSTRAINT_MEMCG,nodemask=(null),"
    f"oom_memcg=/docker/{GONE_ID},"
    f"task_memcg=/docker/{GONE_ID},task=gunicorn,pid=22143,uid=10001\n"
    "[  900.500100] Memory cgroup out of memory: Killed process 22143 (gunicorn)\n"
    f"[ 1372.047185] oom-kill:constraint=CONSTRAINT_MEMCG,oom_memcg=/system.slice/docker-{LIVE_ID}"
    f".scope,task_memcg=/system.slice/docker-{LIVE_ID}.scope,task=gunicorn,pid=7,uid=10001\n"
    "[ 1400.000000] oom-kill:constraint=CONSTRAINT_NONE,task_memcg=/,task=python3,pid=99,uid=0\n"
)


def test_kernel_oom_kills_after_a_point_in_time():
    kills = lt.kernel_oom_kills(DMESG, since_s=500.0)
    assert [(k.at_s, k.task, k.pid, k.container_id) for k in kills] == [
        (900.5, "gunicorn", 22143, GONE_ID),
        (1372.047185, "gunicorn", 7, LIVE_ID),
        (1400.0, "python3", 99, ""),
    ]
    assert lt.kernel_oom_kills(DMESG, since_s=1400.0) == []
    assert lt.kernel_oom_kills("", since_s=0) == []


def test_kernel_oom_kills_the_live_counters_miss_are_problems():
    kills = lt.kernel_oom_kills(DMESG, since_s=500.0)
    names = {LIVE_ID: "aiia_django_prod", GONE_ID: "aiia_loadtest_bare"}
    problems, notes = lt.kernel_oom_problems(kills, names, live_at_end={"aiia_django_prod"})
    assert problems == ["kernel log: gunicorn (pid 22143) OOM-killed in aiia_loadtest_bare"]
    assert notes == [
        "the kernel OOM-killed python3 (pid 99) in a host process, outside this stack, "
        "during the run"
    ]
    problems, notes = lt.kernel_oom_problems(kills[:1], {}, live_at_end=set())
    assert problems == []
    assert notes == [
        "the kernel OOM-killed gunicorn (pid 22143) in container bbbbbbbbbbbb, outside this "
        "stack, during the run"
    ]


def test_integrity_fails_on_kernel_kills_and_notes_an_unreadable_log():
    snap = {"aiia_redis": {"present": True, "running": True, "started_at": "t", "restart_count": 0,
                           "oom_killed": False, "oom_kills": 0}}  # fmt: skip
    kills = lt.kernel_oom_kills(DMESG, since_s=500.0)
    names = {LIVE_ID: "aiia_redis", GONE_ID: "aiia_loadtest_bare"}
    report = lt.integrity_report(snap, snap, {}, kills, names)
    # aiia_redis is live at the end: its own counter counts its kill (0 here: not a problem)
    assert not report["ok"]
    assert report["problems"] == [
        "kernel log: gunicorn (pid 22143) OOM-killed in aiia_loadtest_bare"
    ]
    assert report["notes"] == [
        "the kernel OOM-killed python3 (pid 99) in a host process, outside this stack, "
        "during the run"
    ]
    elsewhere_only = lt.integrity_report(snap, snap, {}, kills[2:], names)
    assert elsewhere_only["ok"] and len(elsewhere_only["notes"]) == 1
    unread = lt.integrity_report(snap, snap, {}, None)
    assert unread["ok"] and "kernel log not readable" in unread["notes"][0]


def test_an_unreadable_kernel_log_is_none():
    runner = RecordingRunner(
        {"dmesg": Result(["dmesg"], 1, "", "dmesg: read kernel buffer failed")}
    )
    assert flow.kernel_oom_kills(runner, 0.0) is None
