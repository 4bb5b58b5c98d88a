"""The budget check: the committed stack fits; the document's own figures do not."""

from aiia_ops.model import load_stack, stack_from_data
from aiia_ops.model.budget import check_budget, has_errors
from tests.conftest import run_invoke
from tests.stackfiles import FIXTURES, patched_stack

DOCUMENT = FIXTURES / "document.yml"


def test_committed_stack_passes_the_check():
    proc = run_invoke("config.check")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert ": 0 error(s)" in proc.stdout


def test_documents_figures_exceed_the_host():
    proc = run_invoke("config.check", "--stack", str(DOCUMENT))
    assert proc.returncode == 1
    lines = proc.stdout.splitlines()
    assert any(
        line.startswith("error") and "memory limits add up to 580MB on a 512MB host" in line
        for line in lines
    )
    assert any(
        line.startswith("error")
        and "maxmemory 50MB is not below the container limit "
        "50MB: Redis is OOM-killed before eviction starts"
        in line
        for line in lines
    )
    assert any(
        line.startswith("error") and "= 290MB, over the container limit 200MB" in line
        for line in lines
    )


def findings(patch):
    return {f.check: f for f in check_budget(stack_from_data(patched_stack(patch)))}


def test_cpu_reservations_may_not_exceed_the_machine():
    f = findings({"services": {"postgresql": {"cpu": {"limit": 1.0, "reservation": 1.0}}}})
    assert f["cpu reservations"].severity == "error"
    assert f["cpu reservations"].message == (
        "CPU reservations add up to 2.3 on 2 vCPUs: lower them or raise machine.cpus"
    )


def test_cpu_limits_may_oversubscribe():
    f = findings({})
    assert f["cpu limits"].severity == "ok"
    assert "oversubscribed" in f["cpu limits"].message


def test_pgbouncer_pools_must_fit_postgres_connections():
    f = findings({"services": {"pgbouncer": {"settings": {"default_pool_size": 30}}}})
    assert f["pgbouncer pools"].severity == "error"
    assert f["pgbouncer pools"].message == (
        "PgBouncer pools (default_pool_size 30 + reserve 2) x 2 (database, user) pairs = 64 "
        "server connections, more than PostgreSQL's max_connections 50 less 3 superuser slots"
    )


def test_more_gunicorn_threads_than_the_pool_is_a_warning():
    f = findings({"environments": {"prod": {"gunicorn": {"workers": 4, "threads": 4}}}})
    assert f["prod gunicorn vs pool"].severity == "warning"


def test_deploy_overlap_must_fit_reservations():
    f = findings({"environments": {"prod": {"memory": {"limit": "150MB", "reservation": "140MB"}}}})
    assert f["prod deploy overlap"].severity == "error"
    assert f["prod deploy overlap"].message == (
        "a second prod app container brings reservations to 520MB, over the 448MB available"
    )


def test_redis_needs_headroom_above_maxmemory():
    f = findings({"services": {"redis": {"settings": {"maxmemory": "40MB"}}}})
    assert f["redis maxmemory"].severity == "warning"
    assert f["redis maxmemory"].message == (
        "only 8MB between maxmemory 40MB and the limit 48MB; an AOF rewrite during a write "
        "burst can copy the whole dataset: leave 40MB"
    )


def test_without_aof_redis_needs_only_the_overhead_headroom():
    f = findings({"services": {"redis": {"settings": {"maxmemory": "30MB", "appendonly": False}}}})
    assert f["redis maxmemory"].severity == "ok"


def test_committed_stack_has_no_errors_in_process():
    assert not has_errors(check_budget(load_stack()))


def test_archiving_on_counts_pgbackrest_inside_postgresqls_limit():
    """The committed allocation makes room for pgBackRest (docs/allocation.md "Archiving on
    512 MB"): turning archiving on fits exactly; a bigger allowance is refused, naming it."""
    on = {"backups": {"pitr": {"enabled": True}}}
    assert findings(on)["postgresql memory"].message == (
        "shared_buffers 40MB + max_connections 50 x work_mem 1MB + maintenance_work_mem 16MB"
        " + pgBackRest 40MB (backups.pitr.memory) = 146MB, within 146MB"
    )
    big = {"backups": {"pitr": {"enabled": True, "memory": "64MB"}}}
    f = findings(big)["postgresql memory"]
    assert f.severity == "error"
    assert f.message.endswith(
        " + pgBackRest 64MB (backups.pitr.memory) = 170MB, over the container limit 146MB:"
        " raise services.postgresql.memory.limit or lower maintenance_work_mem"
    )
    fits = {**big, "services": {"postgresql": {"memory": {"limit": "170MB"}}}}
    assert findings(fits)["postgresql memory"].message.endswith("= 170MB, within 170MB")
    assert "pgBackRest" not in findings({})["postgresql memory"].message  # archiving off


def test_the_patroni_clusters_containers_count_on_each_database_host():
    """etcd, Patroni (with its PostgreSQL) and HAProxy run with hard memory limits on each
    of replication.hosts: the per-host budget adds them, so a cluster that does not fit is
    refused before `db.up`."""
    import dataclasses

    from aiia_ops.model.placement import host_loads
    from aiia_ops.model.units import Size

    stack = load_stack(None, "patroni-lab")
    loads = {load.name: load for load in host_loads(stack)}
    for host in ("lab15", "lab16", "lab17"):
        extra = {i.container: i.memory.limit for i in loads[host].replication}
        assert extra == {"aiia_etcd": Size.parse("64MB"), "aiia_patroni": Size.parse("256MB"),
                         "aiia_haproxy": Size.parse("32MB")}  # fmt: skip
        assert {i.cpu.limit for i in loads[host].replication} == {0.0}  # no CPU limit is set
    by = {f.check: f for f in check_budget(stack)}
    assert by["lab17 memory limits"].message.startswith("limits 472MB fit in 896MB")  # 120+352
    assert not has_errors(check_budget(stack))
    big = dataclasses.replace(
        stack.replication,
        memory=dataclasses.replace(stack.replication.memory, patroni=Size.parse("900MB")),
    )
    over = {f.check: f for f in check_budget(dataclasses.replace(stack, replication=big))}
    assert over["lab17 memory limits"].severity == "error"
    assert "add up to 1116MB on a 1024MB host" in over["lab17 memory limits"].message
