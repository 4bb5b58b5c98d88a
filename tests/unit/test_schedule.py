import datetime as dt

from aiia_ops.commands.schedule import cron_daemon_commands, cron_file, jobs, utc_to_local
from aiia_ops.model import load_stack

STACK = load_stack()


def test_jobs_follow_the_stack():
    j = {" ".join(job.task): (job.minute, job.hour) for job in jobs(STACK)}
    assert j["backup --kind daily --env prod"] == ("0", "2")  # backups.daily_at 02:00 UTC
    assert j["backup --kind daily --env staging"] == ("10", "2")  # never two dumps at once
    assert j["monitor --quiet"] == ("*", "*")  # monitoring.interval 60s
    assert j["ssl-renew"] == ("30", "3")


def test_utc_times_shift_to_the_hosts_local_time():
    assert utc_to_local("02:00", dt.timedelta(hours=1)) == (3, 0)
    assert utc_to_local("02:00", dt.timedelta(hours=-5)) == (21, 0)
    assert utc_to_local("23:30", dt.timedelta(hours=1)) == (0, 30)


def test_cron_file_runs_the_same_tasks_people_run():
    text = cron_file(STACK, "/srv/ops", "/usr/bin/python3", {"AIIA_STATE_DIR": "/var/lib/aiia"})
    assert (
        "0 2 * * * root cd /srv/ops && /usr/bin/python3 -m invoke backup --kind daily "
        "--env prod >> /var/lib/aiia/logs/cron.log 2>&1"
    ) in text
    assert "AIIA_STATE_DIR=/var/lib/aiia\n" in text


def test_cron_daemon_started_only_when_needed():
    assert cron_daemon_commands(running=True, installed=True, systemd=False) == []
    assert cron_daemon_commands(running=False, installed=False, systemd=False) == [
        ["apt-get", "install", "-y", "--no-install-recommends", "cron"],
        ["/usr/sbin/cron"],
    ]
    assert cron_daemon_commands(False, True, True) == [["systemctl", "enable", "--now", "cron"]]


def test_install_writes_the_file_and_starts_cron_only_for_the_real_one(tmp_path, monkeypatch):
    from aiia_ops import DEFAULT_STACK
    from aiia_ops.commands.argv import Result
    from aiia_ops.flows.schedule import install_schedule
    from aiia_ops.host.runners import RecordingRunner
    from aiia_ops.model.state import StateDir

    model, state = load_stack(DEFAULT_STACK), StateDir(tmp_path / "state")
    monkeypatch.setenv("AIIA_CRON_FILE", str(tmp_path / "cron"))
    runner = RecordingRunner()
    assert install_schedule(model, state, runner) == str(tmp_path / "cron")
    assert b"ssl-renew" in runner.files[str(tmp_path / "cron")] and runner.commands == []

    monkeypatch.delenv("AIIA_CRON_FILE")
    fail = Result([], 1)
    runner = RecordingRunner({"pgrep": fail, "test -e /usr/sbin/cron": "", "test -e /run": fail})
    assert install_schedule(model, state, runner) == f"/etc/cron.d/{model.project}"
    assert runner.commands[-1] == ["/usr/sbin/cron"]  # installed, not running, no systemd


def test_each_project_has_its_own_cron_file():
    """An isolated stack (another project) on the same host must not replace the real
    stack's schedule: seen when a load-test copy's setup took over /etc/cron.d/aiia."""
    from aiia_ops.commands.schedule import cron_path, is_active

    assert cron_path("aiia") == "/etc/cron.d/aiia"
    assert cron_path("aiiaperf") == "/etc/cron.d/aiiaperf"
    assert cron_path("aiia", "/tmp/x/cron") == "/tmp/x/cron"
    assert is_active("/etc/cron.d/aiiaperf") and not is_active("/tmp/x/cron")
