"""The level-3 plan as data (commands/cluster.py): order, per-host compose projects, the
load balancer's upstreams, pg_hba for the app hosts, each host's firewall."""

from __future__ import annotations

from aiia_ops import REPO_ROOT
from aiia_ops.commands import cluster as plan
from aiia_ops.commands.argv import Result
from aiia_ops.flows.rolling import batches
from aiia_ops.model import load_stack

STACK = str(REPO_ROOT / "deploy" / "stack.yml")


def stack():
    return load_stack(STACK, "2gb-4cpu")


def test_hosts_in_setup_order_database_first_load_balancer_last():
    parts = plan.host_parts(stack())
    assert [p.name for p in parts] == ["db1", "cache1", "app1", "app2", "lb1"]
    assert parts[0].keys == ["pgbouncer", "postgresql"]
    assert [i.container for _, i in parts[2].instances] == [
        "aiia_django_prod", "aiia_django_prod_2", "aiia_django_staging",
    ]  # fmt: skip


def test_each_host_composes_only_its_services_on_its_private_address():
    s = stack()
    parts = {p.name: p for p in plan.host_parts(s)}
    db = plan.compose_for(s, parts["db1"], "/var/lib/aiia", {})
    assert sorted(db["services"]) == ["pgbouncer", "postgresql"]
    assert db["services"]["pgbouncer"]["ports"] == ["10.77.0.12:6432:6432"]
    assert "depends_on" in db["services"]["pgbouncer"]  # PostgreSQL is on the same host
    lb = plan.compose_for(s, parts["lb1"], "/var/lib/aiia", {})
    assert list(lb["services"]) == ["nginx"]
    assert lb["services"]["nginx"]["ports"] == ["10.77.0.11:80:80", "10.77.0.11:443:443"]


def test_app_hosts_see_the_shared_services_at_their_hosts_addresses():
    view = plan.remote_view(stack())
    assert str(view.services.pgbouncer.address) == "10.77.0.12"
    assert str(view.services.redis.address) == "10.77.0.13"
    assert view.services.pgbouncer.name == "pgbouncer"  # fields set after loading kept


def test_instances_publish_primary_and_standby_ports():
    s = stack()
    inst = [i for _, i in plan.host_parts(s)[2].instances][1]
    assert plan.host_port(inst, str(inst.address)) == 8002
    assert plan.host_port(inst, str(inst.standby_address)) == 8102
    assert plan.instance_env(inst).container == "aiia_django_prod_2"
    assert plan.instance_env(inst).port == 8000  # inside its container: the environment's


def test_load_balancer_upstreams_list_every_live_instance():
    live = {("prod", 0): "10.77.0.14:8000", ("prod", 2): "10.77.0.15:8100"}
    up = plan.lb_upstreams(stack(), live)
    assert up["prod"] == (
        "10.77.0.14:8000 max_fails=1 fail_timeout=5s;\n"
        "    server 10.77.0.15:8100 max_fails=1 fail_timeout=5s"
    )
    assert "staging" not in up


def test_pg_hba_admits_each_role_from_the_app_hosts_before_the_rejects():
    text = "local all all reject\nhost all all 0.0.0.0/0 reject\n"
    out = plan.pg_hba_with_hosts(text, stack(), ["10.77.0.14"]).splitlines()
    assert out[-1] == "host all all 0.0.0.0/0 reject"
    assert any(line.split() == ["host", "aiia_prod", "aiia_prod", "10.77.0.14/32",
                                "scram-sha-256"] for line in out)  # fmt: skip


def test_firewall_admits_db_ports_from_app_hosts_and_drops_the_rest():
    s = stack()
    parts = plan.host_parts(s)
    rules = [" ".join(r) for r in plan.firewall_rules(s, parts[0], parts)]
    assert rules[0] == "iptables -w -F AIIA-FW"
    pgb = [r for r in rules if "--ctorigdstport 6432" in r]
    assert [r.split("-s ")[1].split()[0] for r in pgb if "-s " in r] == [
        "10.77.0.14", "10.77.0.15",
    ]  # fmt: skip
    assert pgb[-1].endswith("-j DROP") and "-s " not in pgb[-1]
    assert rules[-1].endswith("--ctorigdst 10.77.0.12 --ctstate NEW -j DROP")
    lb = [" ".join(r) for r in plan.firewall_rules(s, parts[-1], parts)]
    assert next(r for r in lb if "--ctorigdstport 443" in r).endswith("-j RETURN")
    app = [" ".join(r) for r in plan.firewall_rules(s, parts[2], parts)]
    assert any("--ctorigdstport 8000 -s 10.77.0.11" in r for r in app)


def test_batches_of_app_hosts():
    assert batches(["a", "b", "c"], 1) == [["a"], ["b"], ["c"]]
    assert batches(["a", "b", "c"], 2) == [["a", "b"], ["c"]]
    assert batches(["a"], 0) == [["a"]]


def test_monitor_lines_of_a_host_down_and_of_a_host_up():
    parts = {p.name: p for p in plan.host_parts(stack())}
    down = plan.host_checks(parts["app2"], False, {})
    assert [(c.metric, c.subject, c.state, c.detail) for c in down] == [
        ("host", "app2", "CRIT", "10.77.0.15: engine does not answer")
    ]
    states = {
        "aiia_django_prod": "running healthy",
        "aiia_django_prod_2": "running unhealthy",
        "aiia_django_staging": None,
    }
    up = plan.host_checks(parts["app1"], True, states)
    assert [(c.subject, c.state, c.detail) for c in up] == [
        ("app1", "OK", "10.77.0.14: engine answers"),
        ("app1/aiia_django_prod", "OK", "running healthy"),
        ("app1/aiia_django_prod_2", "CRIT", "running unhealthy"),
        ("app1/aiia_django_staging", "CRIT", "missing"),
    ]
    assert plan.host_checks(parts["lb1"], True, {"aiia_nginx": "running"})[1].state == "OK"
    assert plan.container_state("aiia_redis") == [
        "docker", "inspect", "--type", "container", "--format",
        "{{.State.Status}} {{if .State.Health}}{{.State.Health.Status}}{{end}}", "aiia_redis",
    ]  # fmt: skip


def test_static_files_go_from_an_app_host_to_the_load_balancers_volume():
    st = stack()
    prod = st.environments["prod"]
    pack = plan.static_pack(st, prod, "aiia/django:abc", "/var/lib/aiia")
    assert " ".join(pack) == (
        "docker run --rm --network none --user 0 --entrypoint tar"
        " --mount type=volume,source=aiia_storage_prod,target=/storage,readonly"
        " --mount type=bind,source=/var/lib/aiia/static-sync,target=/sync"
        " aiia/django:abc -C /storage -cf /sync/static-prod.tar static"
    )
    unpack = plan.static_unpack(st, prod, "aiia/nginx:def", "/srv/lb")
    assert " ".join(unpack) == (
        "docker run --rm --network none --user 0 --entrypoint tar"
        " --mount type=volume,source=aiia_storage_prod,target=/storage"
        " --mount type=bind,source=/srv/lb/static-sync,target=/sync,readonly"
        " aiia/nginx:def -C /storage --no-same-owner -xf /sync/static-prod.tar"
    )
    assert plan.static_bundle("/srv/lb", "prod") == "/srv/lb/static-sync/static-prod.tar"


def test_static_files_are_unpacked_with_the_image_lb1_runs_not_the_checkouts():
    """A change under services/nginx after setup gives the checkout a new nginx tag that lb1
    never received: the unpack must use the image lb1's nginx runs (found by the lab3
    rolling-deploy test: `docker run` exit 125, the rollout stopped at app1)."""
    from aiia_ops.flows.cluster import Cluster
    from aiia_ops.flows.targets import Target
    from aiia_ops.host.runners import RecordingRunner

    st = stack()
    inspect = "docker inspect --format"
    runners = {p.name: RecordingRunner() for p in plan.host_parts(st)}
    runners["lb1"].answers[inspect] = "aiia/nginx:running123\n"
    runners["app1"].files["/a/static-sync/static-prod.tar"] = b"tar bytes"
    targets = {n: Target(r, "/a" if n == "app1" else "/l", n, None) for n, r in runners.items()}
    c = Cluster(st, None, None, targets)
    app1 = next(p for p in c.parts if p.name == "app1")
    c.sync_static(app1, st.environments["prod"], "abc")
    unpack = runners["lb1"].commands[-1]
    assert unpack[0:2] == ["docker", "run"] and "aiia/nginx:running123" in unpack
    assert runners["lb1"].files["/l/static-sync/static-prod.tar"] == b"tar bytes"

    runners["lb1"].answers[inspect] = Result([], 1)  # no nginx there yet: the checkout's tag
    c.sync_static(app1, st.environments["prod"], "abc")
    assert any(a.startswith("aiia/nginx:") and a != "aiia/nginx:running123"
               for a in runners["lb1"].commands[-1])  # fmt: skip
