"""Machine profiles and placement: the overlay rules, both shipped profiles passing their
own budget check with the document's figures, per-host budgets, bad placement refused with
its key path, and level 1 (no profile) exactly as before."""

from __future__ import annotations

import re
import shutil

import pytest
import yaml

from aiia_ops import DEFAULT_STACK
from aiia_ops.errors import OpsError
from aiia_ops.model import StackError, load_stack, stack_from_data
from aiia_ops.model.budget import check_budget, has_errors
from aiia_ops.model.placement import app_instances, host_loads, service_host
from aiia_ops.model.profiles import overlay, profile_names, sets, steps
from aiia_ops.tasks.common import load
from tests.conftest import run_invoke
from tests.stackfiles import FIXTURES, STACK, merge, patched_stack

PROFILES = STACK.parent / "profiles"
BROKEN = sorted((FIXTURES / "broken" / "profiles").glob("*.yml"))


def profiled(name: str, patch: dict | None = None):
    """The committed stack with a shipped profile (patched) laid over it, in process."""
    data = merge(yaml.safe_load((PROFILES / f"{name}.yml").read_text()), patch or {})
    return stack_from_data(overlay(yaml.safe_load(STACK.read_text()), data))


def by_check(stack) -> dict:
    return {f.check: f for f in check_budget(stack)}


# --- the overlay ----------------------------------------------------------------------


def test_mappings_merge_at_every_depth_and_values_replace():
    base = {"a": {"b": {"c": 1, "d": 2}, "e": 3}, "f": 4}
    assert overlay(base, {"a": {"b": {"c": 10}}}) == {"a": {"b": {"c": 10, "d": 2}, "e": 3}, "f": 4}
    assert base == {"a": {"b": {"c": 1, "d": 2}, "e": 3}, "f": 4}  # the base is not changed


def test_lists_are_replaced_whole_never_merged():
    base = {"domains": ["a.com", "b.com"], "instances": [{"host": "x", "port": 1}]}
    assert overlay(base, {"domains": ["c.com"]})["domains"] == ["c.com"]
    assert overlay(base, {"instances": [{"host": "y"}]})["instances"] == [{"host": "y"}]


def test_null_removes_a_key_and_new_keys_come_after_the_bases():
    base = {"hosts": {"local": {"ssh": None}, "old": {}}}
    merged = overlay(base, {"hosts": {"local": None, "lb1": {"ssh": "root@10.77.0.11"}}})
    assert list(merged["hosts"]) == ["old", "lb1"]
    assert overlay({"a": 1}, {"missing": None}) == {"a": 1}


def test_a_mapping_over_a_value_or_a_value_over_a_mapping_replaces_it():
    assert overlay({"a": 1}, {"a": {"b": 2}}) == {"a": {"b": 2}}
    assert overlay({"a": {"b": 2}}, {"a": 5}) == {"a": 5}


def test_a_problem_belongs_to_the_profile_when_it_sets_that_key_or_a_value_above_it():
    profile = {"services": {"redis": {"memory": {"limit": "64MB"}}}, "environments": {
        "prod": {"instances": [{"host": "app1"}]}}}  # fmt: skip
    assert steps("environments.prod.instances[1].host") == [
        "environments", "prod", "instances", 1, "host"]  # fmt: skip
    assert sets(profile, "services.redis.memory.limit")
    assert sets(profile, "environments.prod.instances[0].port")  # the list is the profile's
    assert not sets(profile, "services.redis.memory.reservation")
    assert not sets(profile, "services.nginx.host")
    # a mapping only the profile has (a new host) is the profile's, down to its missing keys
    added = {"hosts": {"lb1": {"ssh": "root@10.77.0.11"}}}
    assert sets(added, "hosts.lb1.address", {"hosts": {"local": {}}})
    assert not sets(added, "hosts.local.address", {"hosts": {"local": {}}})


# --- the shipped profiles --------------------------------------------------------------


def test_the_shipped_profiles_are_the_two_levels():
    assert profile_names(DEFAULT_STACK) == ["1gb", "2gb-4cpu", "patroni-lab", "swarm-lab"]


@pytest.mark.parametrize("name", ["1gb", "2gb-4cpu"])
def test_each_profile_passes_its_own_budget_check(name):
    proc = run_invoke("config.check", "--profile", name)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    last = proc.stdout.strip().splitlines()[-1]
    assert last == f"{STACK} with profile {PROFILES / name}.yml: 0 error(s), " + (
        "1 warning(s)" if name == "1gb" else "0 warning(s)"
    )
    assert "Traceback" not in proc.stderr


def test_level_2_has_the_documents_workers_buffers_and_a_grown_redis():
    stack = load_stack(DEFAULT_STACK, "1gb")
    assert stack.profile == str(PROFILES / "1gb.yml") and stack.source == str(STACK)
    assert (str(stack.machine.memory), stack.machine.cpus) == ("1GB", 2.0)
    assert list(stack.hosts) == ["local"]
    prod, staging = stack.environments["prod"], stack.environments["staging"]
    assert prod.gunicorn.workers == 4 and staging.gunicorn.workers == 1
    pg = stack.services.postgresql.settings
    assert (str(pg.shared_buffers), str(pg.work_mem), pg.max_connections) == ("256MB", "2MB", 50)
    redis = stack.services.redis
    assert (str(redis.settings.maxmemory), str(redis.memory.limit)) == ("64MB", "144MB")
    f = by_check(stack)
    assert f["memory limits"].message == "limits 914MB fit in 960MB (1024MB less 64MB OS reserve)"
    assert f["prod gunicorn vs pool"].message == "4 workers x 4 threads = 16 within the pool of 16"
    assert f["prod deploy overlap"].severity == "warning"  # as at level 1: limits, not reservations
    assert f["staging deploy overlap"].severity == "ok"


def test_level_3_places_each_service_and_four_prod_containers_on_five_hosts():
    stack = load_stack(DEFAULT_STACK, "2gb-4cpu")
    assert list(stack.hosts) == ["lb1", "db1", "cache1", "app1", "app2"]
    assert {h: stack.hosts[h].roles for h in stack.hosts} == {
        "lb1": ["load_balancer"],
        "db1": ["database", "pooler"],
        "cache1": ["cache"],
        "app1": ["app"],
        "app2": ["app"],
    }
    assert [str(h.address) for h in stack.hosts.values()] == [f"10.77.0.{n}" for n in range(11, 16)]
    placed = {s.name: service_host(stack, s) for s in stack.services.all()}
    assert placed == {"nginx": "lb1", "pgbouncer": "db1", "postgresql": "db1", "redis": "cache1"}
    prod = [(i.host, i.container, str(i.address), i.port) for i in app_instances(
        stack.environments["prod"])]  # fmt: skip
    assert prod == [
        ("app1", "aiia_django_prod", "172.20.0.3", 8000),
        ("app1", "aiia_django_prod_2", "172.20.0.23", 8002),
        ("app2", "aiia_django_prod", "172.20.0.3", 8000),
        ("app2", "aiia_django_prod_2", "172.20.0.23", 8002),
    ]
    assert [i.host for i in app_instances(stack.environments["staging"])] == ["app1", "app2"]
    # every container limit fits the lab's 2 cores (Docker refuses a limit above them)
    assert max(i.cpu.limit for load in host_loads(stack) for i in load.items) <= 2


def test_level_3_budget_is_per_host_against_each_hosts_machine():
    f = by_check(load_stack(DEFAULT_STACK, "2gb-4cpu"))
    assert not has_errors(list(f.values()))
    expected = {
        "lb1 memory limits": "limits 96MB fit in 448MB (512MB less 64MB OS reserve)",
        "db1 memory limits": "limits 1048MB fit in 1984MB (2048MB less 64MB OS reserve)",
        "db1 cpu reservations": "reservations 1.7 of 4 vCPUs",
        "cache1 memory limits": "limits 416MB fit in 448MB (512MB less 64MB OS reserve)",
        "cache1 cpu limits": "limits add up to 1 on 1 vCPUs",
        "app1 memory reservations": "reservations 256MB fit in 1984MB",
        "app2 prod deploy overlap": "reservations 352MB and limits 448MB fit while two prod "
        "containers run",
        "prod gunicorn vs pool": "4 instances x 2 workers x 4 threads = 32 within the pool of 32",
        "pgbouncer pools": "PgBouncer pools (default_pool_size 32 + reserve 4) x 2 (database, "
        "user) pairs = 72 server connections; PostgreSQL allows 97",
    }
    assert {check: f[check].message for check in expected} == expected
    # no host-wide check without a host name: nothing is summed across machines
    assert "memory limits" not in f and "lb1 prod deploy overlap" not in f


def test_a_container_over_its_hosts_cpus_is_an_error_of_that_host():
    f = by_check(profiled("2gb-4cpu", {"services": {"redis": {"cpu": {"limit": 2.0}}}}))
    assert f["cache1 cpu limits"].severity == "error"
    assert f["cache1 cpu limits"].message == (
        "aiia_redis may use 2 CPUs on a 1-vCPU host: lower services.redis.cpu.limit or raise "
        "hosts.cache1.machine.cpus"
    )
    assert f["app1 cpu limits"].severity == "ok"


def test_deploy_overlap_counts_one_more_container_on_its_own_host_only():
    big = {"environments": {"staging": {"memory": {"limit": "1700MB", "reservation": "900MB"}}}}
    f = by_check(profiled("2gb-4cpu", big))
    assert f["app1 staging deploy overlap"].severity == "error"
    assert f["app1 staging deploy overlap"].message == (
        "a second staging app container brings reservations to 1992MB, over the 1984MB available"
    )
    assert f["app1 memory limits"].severity == "ok"  # 120 + 120 + 1700 = 1940 of 1984: fits
    assert f["db1 memory limits"].severity == "ok"


def test_an_empty_host_is_a_warning():
    f = by_check(profiled("2gb-4cpu", {"hosts": {"spare": {"address": "10.77.0.16"}}}))
    assert (f["spare placement"].severity, f["spare placement"].message) == (
        "warning",
        "nothing is placed here",
    )


def test_config_show_prints_each_hosts_allocation():
    proc = run_invoke("config.show", "--profile", "2gb-4cpu")
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert out.startswith("5 hosts; on each, network aiia_network 172.20.0.0/16\n")
    assert (
        "host cache1 (10.77.0.13; cache): 512MB RAM (64MB kept for the OS), 1 vCPU, 20GB disk"
        in out
    )
    app1 = out[out.index("host app1") : out.index("host app2")]
    rows = [re.split(r"\s{2,}", line.strip()) for line in app1.splitlines()[4:8]]
    assert rows == [
        ["aiia_django_prod", "120MB", "96MB", "1", "0.5", "172.20.0.3", "8000"],
        ["aiia_django_prod_2", "120MB", "96MB", "1", "0.5", "172.20.0.23", "8002"],
        ["aiia_django_staging", "88MB", "64MB", "1", "0.3", "172.20.0.4", "8001"],
        ["total", "328MB", "256MB", "3", "1.3"],
    ]


# --- choosing a profile ----------------------------------------------------------------


def test_an_unknown_profile_names_the_known_ones():
    proc = run_invoke("config.check", "--profile", "x")
    assert proc.returncode == 1
    assert (
        proc.stderr.strip()
        == "error: unknown profile 'x'; expected one of: 1gb, 2gb-4cpu, patroni-lab, swarm-lab"
    )
    assert proc.stdout == ""
    with pytest.raises(OpsError, match=r"^unknown profile '\.\./stack'; expected one of: 1gb"):
        load_stack(DEFAULT_STACK, "../stack")


def test_aiia_profile_is_honoured_like_aiia_stack(tmp_path):
    proc = run_invoke("config.show", env={"AIIA_PROFILE": "2gb-4cpu"})
    assert proc.returncode == 0 and proc.stdout.startswith("5 hosts;")
    proc = run_invoke("config.check", env={"AIIA_PROFILE": "1gb"})
    assert proc.returncode == 0
    assert proc.stdout.strip().endswith(f"with profile {PROFILES / '1gb.yml'}: 0 error(s), "
                                        "1 warning(s)")  # fmt: skip
    # --profile wins over the environment
    proc = run_invoke("config.check", "--profile", "1gb", env={"AIIA_PROFILE": "nope"})
    assert proc.returncode == 0


def test_profiles_are_found_beside_the_stack_file_given(tmp_path):
    stack = tmp_path / "stack.yml"
    shutil.copy(STACK, stack)
    (tmp_path / "profiles").mkdir()
    (tmp_path / "profiles" / "big.yml").write_text("machine: {memory: 4GB}\n")
    model = load_stack(stack, "big")
    assert str(model.machine.memory) == "4GB" and model.profile == str(
        tmp_path / "profiles" / "big.yml"
    )
    with pytest.raises(OpsError, match=r"^unknown profile '1gb'; expected one of: big$"):
        load_stack(stack, "1gb")


def test_tasks_that_drive_one_engine_refuse_a_stack_on_several_hosts(tmp_path):
    with pytest.raises(OpsError) as err:
        load(str(STACK), "2gb-4cpu")
    assert str(err.value) == (
        "the stack places its services on 5 hosts (lb1, db1, cache1, app1, app2); this task "
        "runs on one host so far: `invoke config.check` and `config.show` take several"
    )
    model, _ = load(str(STACK), "1gb")  # one bigger host: every task takes it
    assert model.environments["prod"].gunicorn.workers == 4
    proc = run_invoke("config.render", "--profile", "2gb-4cpu", "--out", str(tmp_path / "out"))
    assert proc.returncode == 1 and "config.render runs on one host so far" in proc.stderr
    assert not (tmp_path / "out").exists()


def test_building_the_images_takes_any_placement():
    """`invoke build` works on this machine whatever the profile places where (the multi-host
    setups ship what it builds); with AIIA_PROFILE=swarm-lab it was refused, which broke the
    swarm and Patroni lab tests' image builds."""
    for profile in ("2gb-4cpu", "swarm-lab", "patroni-lab"):
        model, _ = load(str(STACK), profile, any_hosts=True)
        assert len(model.hosts) >= 3


def test_level_2_renders_its_figures(tmp_path, state_dir):
    run_invoke("config.render", "--profile", "1gb", "--out", str(tmp_path), check=True)
    conf = (tmp_path / "postgresql" / "postgresql.conf").read_text()
    assert "shared_buffers = 256MB" in conf
    assert "workers = 4" in (tmp_path / "app-prod" / "gunicorn.conf.py").read_text()


# --- level 1 stays as it was -----------------------------------------------------------


def test_without_a_profile_the_budget_checks_are_level_1s():
    checks = [f.check for f in check_budget(load_stack(DEFAULT_STACK))]
    assert checks == [
        "memory limits",
        "memory reservations",
        "cpu reservations",
        "cpu limits",
        "redis maxmemory",
        "postgresql memory",
        "pgbouncer pools",
        "prod gunicorn vs pool",
        "staging gunicorn vs pool",
        "prod deploy overlap",
        "staging deploy overlap",
    ]
    stack = load_stack(DEFAULT_STACK)
    assert stack.profile == "" and [load.name for load in host_loads(stack)] == ["local"]


def test_config_show_without_a_profile_is_the_single_table():
    out = run_invoke("config.show", check=True).stdout
    assert out.startswith("machine: 512MB RAM (64MB kept for the OS), 2 vCPU, 20GB disk; ")
    assert "host " not in out and out.count("total") == 1


# --- broken profiles: refused with the key path, in the file that holds it --------------


def write_profile_fixture(fixture, tmp_path):
    spec = yaml.safe_load(fixture.read_text())
    stack = tmp_path / "stack.yml"
    shutil.copy(STACK, stack)
    (tmp_path / "profiles").mkdir()
    profile = tmp_path / "profiles" / f"{fixture.stem}.yml"
    if "raw" in spec:
        profile.write_text(spec["raw"])
    else:
        data = yaml.safe_load((PROFILES / f"{spec['profile']}.yml").read_text())
        profile.write_text(yaml.safe_dump(merge(data, spec.get("patch") or {}), sort_keys=False))
    return spec, stack, profile


@pytest.mark.parametrize("fixture", BROKEN, ids=[f.stem for f in BROKEN])
def test_broken_profile_is_refused_with_key_path_messages(fixture, tmp_path):
    spec, stack, profile = write_profile_fixture(fixture, tmp_path)
    before = stack.read_text(), profile.read_text()
    proc = run_invoke("config.check", "--stack", str(stack), "--profile", fixture.stem)
    assert proc.returncode == 1
    output = (proc.stdout + proc.stderr).strip()
    output = output.replace(str(profile), "PROFILE").replace(str(stack), "STACK")
    if "expect" in spec:
        assert output == spec["expect"].strip()
    else:  # a budget refusal: its error rows (columns as printed) and the summary
        cells = [re.split(r"\s{2,}", line.strip()) for line in output.splitlines()]
        errors = [c for c in cells if c[0] == "error"]
        expected = [re.split(r"\s{2,}", line) for line in spec["expect_errors"].splitlines()]
        assert errors == expected
        assert output.splitlines()[-1] == spec["expect_summary"]
    assert "Traceback" not in proc.stderr
    assert (stack.read_text(), profile.read_text()) == before  # nothing changed


def test_a_service_on_an_unknown_host_in_process():
    data = patched_stack({"services": {"nginx": {"host": "edge"}}})
    with pytest.raises(StackError) as err:
        stack_from_data(data)
    assert err.value.problems == [
        "services.nginx.host: unknown host 'edge'; expected one of: local (defined under hosts)"
    ]
