"""The Swarm stack file and its argv, as data (commands/swarm.py): exact values from the
model with the swarm-lab profile."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from aiia_ops import SERVICES_DIR
from aiia_ops.commands import swarm as sw
from aiia_ops.errors import OpsError
from aiia_ops.model import load_stack
from aiia_ops.model.secrets import EnvSecrets, Secrets

STACK = load_stack(None, "swarm-lab")
TAGS = {"nginx": "n1", "postgresql": "p1", "pgbouncer": "b1", "redis": "r1",
        "prod": "app1", "staging": "app2"}  # fmt: skip
SECRETS = Secrets(
    "pg-secret-1",
    "redis-secret-2",
    "admin-secret-3",
    {
        "prod": EnvSecrets("prod-db-4", "prod-key-5", "prod-token-8"),
        "staging": EnvSecrets("stg-db-6", "stg-key-7", "stg-token-9"),
    },
)


def data(replicas=None) -> dict:
    return sw.stack_data(STACK, sw.swarm_objects(STACK, SECRETS), TAGS, replicas)


def test_the_profile_is_a_swarm_of_three_hosts():
    assert STACK.runtime == "swarm"
    assert sw.swarm_hosts(STACK) == ["lab6", "lab7", "lab8"]
    assert sw.node_labels(STACK, "lab6") == {
        "aiia.role.app": "true", "aiia.role.cache": "true", "aiia.role.database": "true",
        "aiia.role.load_balancer": "true", "aiia.role.pooler": "true",
    }  # fmt: skip
    assert sw.node_labels(STACK, "lab7") == {"aiia.role.app": "true"}


def test_every_service_has_the_stacks_replicas_limits_and_dnsrr():
    services = data()["services"]
    assert set(services) == {"nginx", "postgresql", "pgbouncer", "redis", "django_prod",
                             "django_staging"}  # fmt: skip
    items = {**{s.name: s for s in STACK.services.all()},
             **{f"django_{e.name}": e for e in STACK.environments.values()}}  # fmt: skip
    for key, svc in services.items():
        item = items[key]
        d = svc["deploy"]
        assert d["endpoint_mode"] == "dnsrr"  # no IPVS on this kernel
        mb = item.memory.limit.bytes // (1024 * 1024)
        assert d["resources"]["limits"] == {"cpus": f"{item.cpu.limit:g}", "memory": f"{mb}M"}
        res_mb = item.memory.reservation.bytes // (1024 * 1024)
        assert d["resources"]["reservations"]["memory"] == f"{res_mb}M"
        assert svc["healthcheck"]["interval"] == str(item.healthcheck.interval)
        assert svc["healthcheck"]["retries"] == item.healthcheck.retries
    assert services["django_prod"]["deploy"]["replicas"] == 2  # its two instances
    assert services["django_staging"]["deploy"]["replicas"] == 1
    assert data({"staging": 0})["services"]["django_staging"]["deploy"]["replicas"] == 0


def test_placement_follows_the_roles_and_apps_spread():
    services = data()["services"]
    want = {"nginx": "load_balancer", "postgresql": "database", "pgbouncer": "pooler",
            "redis": "cache", "django_prod": "app", "django_staging": "app"}  # fmt: skip
    for key, role in want.items():
        placement = services[key]["deploy"]["placement"]
        assert placement["constraints"] == [f"node.labels.aiia.role.{role} == true"]
    prod = services["django_prod"]["deploy"]["placement"]
    assert prod["preferences"] == [{"spread": "node.id"}]
    # a preference alone let start-first updates put both replicas on one node (lab test)
    assert prod["max_replicas_per_node"] == 1  # 2 replicas, 3 app nodes
    assert "max_replicas_per_node" not in services["postgresql"]["deploy"]["placement"]
    # computed from the planned replicas, also while setup runs the service at 0
    zero = data({"prod": 0})["services"]["django_prod"]["deploy"]
    assert zero["placement"]["max_replicas_per_node"] == 1


@pytest.mark.parametrize(
    "replicas, nodes, per_node, order, survives",
    [
        (2, 3, 1, "start-first", True),   # the lab: a free node for updates and for a loss
        (2, 2, 1, "stop-first", False),   # full: the update stops one first; a loss waits
        (3, 2, 2, "start-first", False),  # room for one new task, not for a lost node's two
        (4, 2, 2, "stop-first", False),
        (1, 1, 1, "stop-first", False),
        (1, 3, 1, "start-first", True),
        (4, 3, 2, "start-first", True),
        (5, 3, 2, "start-first", False),  # 2 nodes x 2 left for 5
    ],
)  # fmt: skip
def test_spread_rule_order_and_node_loss(replicas, nodes, per_node, order, survives):
    from aiia_ops.model.placement import Spread

    got = Spread.of(replicas, nodes)
    assert (got.per_node, got.order, got.survives_node_loss) == (per_node, order, survives)


def test_two_app_nodes_make_prod_updates_stop_first_and_config_check_says_why():
    from aiia_ops.model.budget import check_budget
    from aiia_ops.model.types import Host

    hosts = dict(STACK.hosts)
    hosts["lab6"] = Host(**{**vars(hosts["lab6"]), "roles": ["load_balancer", "database",
                                                             "pooler", "cache"]})  # fmt: skip
    two = STACK.__class__(**{**vars(STACK), "hosts": hosts})
    app = sw.stack_data(two, sw.swarm_objects(two, SECRETS), TAGS)["services"]["django_prod"]
    assert app["deploy"]["update_config"]["order"] == "stop-first"
    assert app["deploy"]["placement"]["max_replicas_per_node"] == 1
    found = {(f.severity, f.check, f.message.split(":")[1].strip()[:22])
             for f in check_budget(two) if f.check.endswith("spread")}  # fmt: skip
    assert ("warning", "prod spread", "no free slot, so an up") in found
    assert ("warning", "prod spread", "a lost node's replicas") in found
    assert ("ok", "staging spread", "start-first updates, a") in found


def test_updates_are_start_first_with_engine_rollback_except_host_ports():
    services = data()["services"]
    app = services["django_prod"]["deploy"]
    assert app["update_config"]["order"] == "start-first"
    assert app["update_config"]["failure_action"] == "rollback"
    assert app["update_config"]["monitor"] == sw.MONITOR
    assert app["rollback_config"]["order"] == "start-first"
    # nginx holds the node's 80/443 in host mode: two tasks cannot, so it is stop-first
    assert services["nginx"]["deploy"]["update_config"]["order"] == "stop-first"
    ports = services["nginx"]["ports"]
    assert [(p["target"], p["published"], p["mode"]) for p in ports] == [
        (80, 80, "host"), (443, 443, "host")
    ]  # fmt: skip


def test_secrets_are_swarm_secrets_and_never_in_the_stack_file():
    text = sw.dump(data())
    for value in [SECRETS.postgres_password, SECRETS.redis_password, "prod-db-4", "prod-key-5"]:
        assert value not in text
    objects = {o.key: o for o in sw.swarm_objects(STACK, SECRETS)}
    assert objects["django_prod_db_password"].data == b"prod-db-4"
    assert objects["django_prod_db_password"].kind == "secret"
    assert objects["django_prod_db_password"].target == "DB_PASSWORD"  # /run/secrets/DB_PASSWORD
    assert objects["pgbouncer_userlist_txt"].kind == "secret"
    assert objects["pgbouncer_userlist_txt"].target == "/etc/aiia/userlist.txt"
    assert objects["nginx_nginx_conf"].kind == "config"
    prod = data()["services"]["django_prod"]
    targets = {s["target"] for s in prod["secrets"]}
    assert {"DB_PASSWORD", "DJANGO_SECRET_KEY", "REDIS_PASSWORD"} <= targets
    assert all(s["mode"] == 0o400 and s["uid"] == "10001" for s in prod["secrets"])


def test_object_names_change_with_their_content():
    a = {o.key: o.name for o in sw.swarm_objects(STACK, SECRETS)}
    changed = Secrets("pg-secret-CHANGED", "redis-secret-2", "admin-secret-3", SECRETS.environments)
    b = {o.key: o.name for o in sw.swarm_objects(STACK, changed)}
    assert a["postgresql_postgres_password"] != b["postgresql_postgres_password"]
    assert a["nginx_nginx_conf"] == b["nginx_nginx_conf"]
    assert all(len(n) <= 64 for n in a.values())


def test_nginx_follows_the_app_tasks_through_dockers_dns():
    conf = sw.swarm_configs(STACK, SECRETS)["nginx/conf.d/prod.conf"][0]
    assert "upstream aiia_prod" not in conf  # resolved once at start: not for moving tasks
    assert "map $host $aiia_prod_upstream {\n    default django_prod:8000;\n}" in conf
    assert "proxy_pass http://$aiia_prod_upstream;" in conf
    assert conf.count("resolver 127.0.0.11 valid=2s ipv6=off;") == conf.count("\nserver {")
    assert sw.DRAIN_S > sw.RESOLVE_VALID_S  # a stopping task outlives nginx's cached answer


def test_pgbouncer_and_the_app_reach_services_by_name():
    ini = sw.swarm_configs(STACK, SECRETS)["pgbouncer/pgbouncer.ini"][0]
    assert "host=postgresql port=5432 dbname=aiia_prod" in ini
    assert str(STACK.services.postgresql.address) not in ini
    env = data()["services"]["django_prod"]["environment"]
    assert (env["DB_HOST"], env["REDIS_HOST"], env["APP_VERSION"]) == ("pgbouncer", "redis", "app1")


def test_the_stack_file_escapes_dollars_for_stack_deploy():
    prod = data()["services"]["django_prod"]
    script = prod["entrypoint"][2]
    assert "$$" in script and re.search(r"(?<!\$)\$(?!\$)", script) is None
    assert prod["command"] == sw.IMAGE_COMMANDS["app"]
    # the redis check needs its password from /run/secrets, as the service does
    assert data()["services"]["redis"]["healthcheck"]["test"][:3] == ["CMD", "/bin/sh", "-c"]
    yaml.safe_load(sw.dump(data()))  # and it is YAML


def test_image_commands_equal_the_dockerfiles():
    import json

    def dockerfile_command(folder: str) -> list[str]:
        text = (SERVICES_DIR / folder / "Dockerfile").read_text()
        entry = re.findall(r"^ENTRYPOINT (\[.*\])", text, re.M)
        cmd = re.findall(r"^CMD (\[.*\])", text, re.M)
        return [*(json.loads(entry[-1]) if entry else []), *json.loads(cmd[-1])]

    assert dockerfile_command("postgres") == sw.IMAGE_COMMANDS["postgresql"]
    assert dockerfile_command("redis") == sw.IMAGE_COMMANDS["redis"]
    assert dockerfile_command("django") == sw.IMAGE_COMMANDS["app"]


def test_files_for_the_manager():
    files = sw.stack_files(STACK, SECRETS, "/var/lib/x", TAGS)
    paths = {f.path: f for f in files}
    assert "/var/lib/x/swarm/stack.yml" in paths
    secret_files = [f for f in files if "/swarm/secrets/" in f.path]
    assert secret_files and all(f.mode == 0o600 for f in secret_files)


def test_argv():
    assert sw.stack_deploy(STACK, "/s") == [
        "docker", "stack", "deploy", "--compose-file", "/s/swarm/stack.yml",
        "--resolve-image", "never", "--prune", "aiia",
    ]  # fmt: skip
    join = sw.swarm_join("10.77.0.17", "10.77.0.16")
    assert "10.77.0.16:2377" in join[-1] and "--token" in join[-1]  # token on stdin, not argv
    assert sw.service_update_image("aiia_django_prod", "aiia/django:t2", force=True)[-2:] == [
        "--force", "aiia_django_prod"
    ]  # fmt: skip


def test_parsers():
    ps = (
        '{"ID":"a","Name":"aiia_django_prod.1","Image":"aiia/django:t2","Node":"vm",'
        '"DesiredState":"Running","CurrentState":"Running 3 seconds ago","Error":""}\n'
        '{"ID":"b","Name":"aiia_django_prod.1","Image":"aiia/django:t1","Node":"vm",'
        '"DesiredState":"Shutdown","CurrentState":"Shutdown 1 second ago","Error":""}\n'
        "not json\n"
    )
    tasks = sw.parse_tasks(ps)
    assert [t.state for t in tasks] == ["running", "shutdown"]
    assert sw.converged(tasks, "aiia/django:t2", 1)
    assert not sw.converged(tasks, "aiia/django:t2", 2)
    assert not sw.converged(tasks, "aiia/django:t1", 1)
    assert sw.parse_replicas("2/2") == (2, 2)
    assert sw.parse_replicas("0/1 (1/1 completed)") == (0, 1)
    assert (
        sw.update_state({"UpdateStatus": {"State": "rollback_completed"}}) == "rollback_completed"
    )
    assert sw.update_state({}) == ""


def test_a_stack_without_ssh_hosts_is_refused_with_the_fix():
    with pytest.raises(OpsError, match=r"hosts\.<name>\.ssh"):
        sw.swarm_hosts(load_stack())


def test_compose_stack_is_refused_by_the_cluster_tasks():
    from aiia_ops.flows.swarm import require_swarm

    with pytest.raises(OpsError, match="runtime: swarm"):
        require_swarm(load_stack())
    assert Path(STACK.profile).name == "swarm-lab.yml"


def test_deploy_on_a_swarm_skips_the_default_pre_deploy_backup_and_says_so(monkeypatch, capsys):
    """`invoke deploy --env prod` on a swarm, with the task's defaults (backup on): it was
    refused as if --backup had been asked for (tests/lab_swarm found it)."""
    import pytest

    from aiia_ops.errors import OpsError
    from aiia_ops.flows import deploy as flow
    from aiia_ops.flows import swarm

    monkeypatch.setattr(swarm, "deploy", lambda model, env, ref: {"release": "abc", "seconds": 1})
    got = flow.deploy(STACK, "prod", None, host=None, dry_run=False, backup=True)
    assert got["release"] == "abc" and "pre-deploy backup: skipped" in capsys.readouterr().out
    with pytest.raises(OpsError, match="--dry-run: not on runtime: swarm"):
        flow.deploy(STACK, "prod", None, dry_run=True, backup=False)
