"""The model: the committed stack loads; every kind of broken stack is refused, line by line."""

from pathlib import Path

import pytest
import yaml

from aiia_ops.model import StackError, load_stack, stack_from_data
from tests.conftest import run_invoke
from tests.stackfiles import FIXTURES, isolated_stack, patched_stack, write_fixture_stack

BROKEN = sorted((FIXTURES / "broken").glob("*.yml"))


def test_committed_stack_holds_the_documents_topology():
    stack = load_stack()
    addresses = {c.container: str(c.address) for c in stack.containers()}
    assert addresses == {
        "aiia_nginx": "172.20.0.2",
        "aiia_django_prod": "172.20.0.3",
        "aiia_django_staging": "172.20.0.4",
        "aiia_pgbouncer": "172.20.0.5",
        "aiia_postgresql": "172.20.0.6",
        "aiia_redis": "172.20.0.7",
    }
    assert str(stack.network.subnet) == "172.20.0.0/16"
    prod, staging = stack.environments["prod"], stack.environments["staging"]
    # threads 2 -> 4 and max_requests 1000 -> 20000: tuned under load (docs/performance.md)
    assert (prod.port, prod.gunicorn.workers, prod.gunicorn.threads) == (8000, 2, 4)
    assert (staging.port, staging.gunicorn.workers, staging.gunicorn.threads) == (8001, 1, 4)
    assert prod.gunicorn.worker_class == staging.gunicorn.worker_class == "gthread"
    assert prod.gunicorn.timeout.seconds == 30 and prod.gunicorn.max_requests == 20000
    assert prod.gunicorn.keepalive.seconds == 60
    assert (prod.database, prod.redis_db, staging.database, staging.redis_db) == (
        "aiia_prod",
        0,
        "aiia_staging",
        1,
    )
    bouncer = stack.services.pgbouncer.settings
    assert (bouncer.pool_mode, bouncer.max_client_conn, bouncer.default_pool_size) == (
        "transaction",
        100,
        10,
    )
    assert stack.services.nginx.settings.worker_connections == 2048
    assert stack.services.nginx.settings.gzip_level == 6
    assert stack.backups.retention.pre_deploy == 3 and stack.backups.retention.daily == 7
    assert stack.monitoring.metrics.db_connections.critical == 48


def test_environments_share_the_app_block_and_override_only_what_differs():
    raw = yaml.safe_load(Path("deploy/stack.yml").read_text())
    assert set(raw["environments"]["staging"]) < set(
        load_stack().environments["staging"].__dataclass_fields__
    )
    assert "gunicorn" not in raw["environments"]["prod"]  # prod is the app block as written


def test_unknown_environment_names_the_known_ones():
    with pytest.raises(
        Exception,
        match=r"unknown environment 'qa'; expected one of: prod, "
        r"staging",
    ):
        load_stack().environment("qa")


def test_override_errors_point_at_the_override_not_the_shared_block():
    data = patched_stack({"environments": {"staging": {"gunicorn": {"threads": "two"}}}})
    with pytest.raises(StackError) as err:
        stack_from_data(data)
    assert err.value.problems == [
        "environments.staging.gunicorn.threads: expected a whole number, got 'two'"
    ]


def test_a_bad_shared_value_is_reported_once_at_its_own_path():
    data = patched_stack({"app": {"gunicorn": {"timeout": "forever"}}})
    with pytest.raises(StackError) as err:
        stack_from_data(data)
    assert err.value.problems == [
        "app.gunicorn.timeout: expected a duration such as 30s (units ms, s, m, h, d), "
        "got 'forever'"
    ]


@pytest.mark.parametrize("fixture", BROKEN, ids=[f.stem for f in BROKEN])
def test_broken_stack_is_refused_with_key_path_messages(fixture, tmp_path):
    stack_file = write_fixture_stack(fixture, tmp_path)
    before = stack_file.read_text()
    proc = run_invoke("config.check", "--stack", str(stack_file))
    assert proc.returncode == 1
    output = (proc.stdout + proc.stderr).strip().replace(str(stack_file), "STACK")
    assert output == yaml.safe_load(fixture.read_text())["expect"].strip()
    assert "Traceback" not in proc.stderr
    assert stack_file.read_text() == before  # nothing changed


def test_config_render_refuses_an_unknown_environment(state_dir):
    proc = run_invoke("config.render", "--env=qa", "--out", str(state_dir / "out"))
    assert proc.returncode == 1
    assert proc.stderr.strip() == "error: unknown environment 'qa'; expected one of: prod, staging"
    assert not (state_dir / "out").exists()


def test_the_stacks_the_project_writes_itself_pass_the_identifier_rules():
    """The strict names and paths refuse hostile values, not the project's own: the e2e
    stack (other project, names, subnet), an SSH host as the e2e tests add it, the test
    ACME server's directory, a registry image."""
    data = isolated_stack("aiiatest", 29, 10000, "/tmp/pytest-of-root/pytest-7/e2e0/state")
    data["hosts"] = {"sshbox": {"ssh": "root@127.0.0.1:2222", "state_dir": "/srv/aiia-e2e"}}
    for env in data["environments"].values():
        env["hosts"] = ["sshbox"]
    data["tls"]["acme"]["directory"] = "https://172.29.0.50:14000/dir"
    data["services"]["redis"]["image"] = "registry.example.com:5000/aiia/redis"
    stack = stack_from_data(data)
    assert (stack.project, stack.network.name) == ("aiiatest", "aiiatest_network")
    assert stack.hosts["sshbox"].ssh == "root@127.0.0.1:2222"
    assert [c.container for c in stack.containers()][:2] == ["aiiatest_nginx", "aiiatest_pgbouncer"]


def test_a_hostile_key_is_quoted_in_its_path_never_a_line_of_its_own():
    data = patched_stack({"services": {"nginx": {"settings": {"gzip\nlevel": 6}}}})
    with pytest.raises(StackError) as err:
        stack_from_data(data)
    (line,) = err.value.problems
    assert "\n" not in line
    assert line.startswith("services.nginx.settings['gzip\\nlevel']: unknown key")
