"""Log rotation as data (commands/logrotate.py) and run for real on a directory."""

from __future__ import annotations

import gzip
from pathlib import Path

from aiia_ops import DEFAULT_STACK
from aiia_ops.commands import logrotate as lr
from aiia_ops.commands.argv import Result
from aiia_ops.commands.schedule import jobs
from aiia_ops.flows.logrotate import rotate_logs
from aiia_ops.host.runners import LocalRunner
from aiia_ops.model import load_stack
from aiia_ops.model.state import StateDir


def test_generations_read_only_the_rotated_names():
    listing = ["access.log", "access.log.1", "access.log.2.gz", "access.log.10.gz"]
    listing += ["access.log.2.gz.tmp", "access.log.x.gz", "error.log.3.gz", "access.log.1.gz"]
    assert lr.generations(listing, "access.log") == [1, 2, 10]


def test_due_daily_when_not_empty_hourly_only_past_the_maximum():
    assert not lr.due(None, False, 100) and not lr.due(0, False, 100)
    assert lr.due(1, False, 100)
    assert not lr.due(99, True, 100) and lr.due(100, True, 100)


def test_rotate_shifts_compresses_and_drops_past_keep():
    p = "/s/logs/nginx/access.log"
    assert lr.rotate(p, [], 3) == [["mv", "-f", p, f"{p}.1"]]
    plan = lr.rotate(p, [1, 2, 3, 4], 3)
    assert plan == [
        ["rm", "-f", f"{p}.4.gz"],
        ["rm", "-f", f"{p}.3.gz"],
        ["mv", "-f", f"{p}.2.gz", f"{p}.3.gz"],
        ["sh", "-c", f"gzip -c {p}.1 > {p}.2.gz.tmp"],
        ["mv", "-f", f"{p}.2.gz.tmp", f"{p}.2.gz"],
        ["rm", "-f", f"{p}.1"],
        ["mv", "-f", p, f"{p}.1"],
    ]
    assert lr.rotate(p, [1], 1) == [["rm", "-f", f"{p}.1"], ["mv", "-f", p, f"{p}.1"]]


class NoDocker(LocalRunner):
    """Real file commands; the engine's part recorded (no container in a unit test)."""

    def __init__(self):
        super().__init__()
        self.signals = []

    def _execute(self, argv, *, input, env, timeout, stream):
        if argv[0] == "docker":
            self.signals.append(argv)
            return Result(argv, 0)
        return super()._execute(argv, input=input, env=env, timeout=timeout, stream=stream)


def test_rotating_for_real_keeps_every_line_and_at_most_keep_generations(tmp_path):
    model, state = load_stack(DEFAULT_STACK), StateDir(tmp_path / "state")
    keep = model.services.nginx.settings.access_log_keep
    log = state.root / "logs" / "nginx" / "access.log"
    log.parent.mkdir(parents=True)
    written = []
    for day in range(keep + 3):
        line = f"request of day {day}\n"
        log.write_text(line)
        written.append(line)
        runner = NoDocker()
        out = rotate_logs(model, state, runner)
        assert any("access.log: rotated" in o for o in out) and "cron.log: missing" in out[-1]
        assert runner.signals == [["docker", "kill", "--signal", "USR1", "aiia_nginx"]]
    names = sorted(p.name for p in log.parent.iterdir())
    assert "access.log" not in names and "access.log.1" in names  # nginx recreates it on USR1
    assert len(names) == keep and not any(n.endswith(".tmp") for n in names)
    assert (log.parent / "access.log.1").read_text() == written[-1]  # the newest, plain
    assert gzip.decompress((log.parent / "access.log.2.gz").read_bytes()).decode() == written[-2]
    oldest = gzip.decompress((log.parent / f"access.log.{keep}.gz").read_bytes()).decode()
    assert oldest == written[-keep]


def test_the_hourly_check_leaves_a_small_log_alone_and_the_schedule_has_both(tmp_path):
    model, state = load_stack(DEFAULT_STACK), StateDir(tmp_path / "state")
    log = state.root / "logs" / "nginx" / "access.log"
    log.parent.mkdir(parents=True)
    log.write_text("one line\n")
    runner = NoDocker()
    out = rotate_logs(model, state, runner, only_if_larger=True)
    assert "not due" in out[0] and log.exists() and runner.signals == []
    tasks = [job.task for job in jobs(model)]
    assert ["logrotate"] in tasks and ["logrotate", "--if-larger"] in tasks


def test_bad_rotation_settings_are_refused_with_the_key_path(tmp_path):
    import yaml

    from aiia_ops.errors import OpsError

    data = yaml.safe_load(Path(DEFAULT_STACK).read_text())
    data["services"]["nginx"]["settings"].update(access_log_keep=0, access_log_max="10KB")
    bad = tmp_path / "stack.yml"
    bad.write_text(yaml.safe_dump(data))
    try:
        load_stack(bad)
    except OpsError as exc:
        text = str(exc)
    else:
        raise AssertionError("accepted")
    assert "services.nginx.settings.access_log_keep" in text
    assert "services.nginx.settings.access_log_max" in text
