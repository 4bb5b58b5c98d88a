"""Backups as data: ids, census, manifest, redaction, retention and the exact commands."""

from __future__ import annotations

import datetime as dt

import pytest

from aiia_ops import DEFAULT_STACK
from aiia_ops.commands import backups as bk
from aiia_ops.errors import OpsError
from aiia_ops.model import Retention, load_stack

T0 = dt.datetime(2026, 11, 26, 2, 0, 0, tzinfo=dt.UTC)
RETENTION = Retention(pre_deploy=3, daily=7, manual=3, media=1, config=1)


@pytest.fixture(scope="module")
def stack():
    return load_stack(DEFAULT_STACK)


# --- ids ---------------------------------------------------------------------------------


def test_id_says_when_which_environment_and_kind():
    assert bk.new_id(T0, "prod", "daily") == "20261126T020000Z-prod-daily"
    taken = {"20261126T020000Z-prod-daily"}
    assert bk.new_id(T0, "prod", "daily", taken) == "20261126T020000Z-prod-daily-2"


def test_id_round_trips_and_bad_ids_are_refused_with_a_hint():
    assert bk.parse_id("20261126T020000Z-staging-pre-deploy") == (T0, "staging", "pre-deploy")
    assert bk.parse_id("20261126T020000Z-prod-pre-restore-2")[2] == "pre-restore"
    with pytest.raises(OpsError) as exc:
        bk.parse_id("nope")
    assert str(exc.value) == (
        "'nope' is not a backup id (like 20260101T020000Z-prod-daily); see invoke backup.list"
    )
    with pytest.raises(OpsError, match="unknown backup kind 'weekly'"):
        bk.new_id(T0, "prod", "weekly")


# --- census ------------------------------------------------------------------------------


CENSUS = """\
census|public.courses_course|3|1234
census|public.odd|name|0|0
migration|courses|0001_initial
NOTICE: something else
"""


def test_census_lines_are_parsed_and_other_lines_ignored():
    c = bk.parse_census(CENSUS)
    assert c.tables == {"public.courses_course": (3, "1234"), "public.odd|name": (0, "0")}
    assert c.migrations == {"courses": "0001_initial"}


def test_census_comparison_names_every_difference():
    source = {"a": (3, "1"), "b": (2, "5"), "c": (1, "9")}
    restored = {"a": (3, "1"), "b": (2, "6"), "d": (0, "0")}
    assert bk.compare_census(source, restored) == [
        "b: same 2 rows, content differs (hash 5 -> 6)",
        "c: missing after restore",
        "d: not in the source",
    ]
    assert bk.compare_census(source, dict(source)) == []
    assert bk.compare_census({"a": (3, "1")}, {"a": (2, "7")}) == ["a: 3 rows, now 2 (hash 1 -> 7)"]


# --- manifest ----------------------------------------------------------------------------


def manifest(stack, **over) -> dict:
    env = stack.environment("prod")
    data = {
        "id": "20261126T020000Z-prod-daily",
        "env": "prod",
        "kind": "daily",
        "database": env.database,
        "database_size": 9000,
        "started": "2026-11-26T02:00:00Z",
        "finished": "2026-11-26T02:00:03Z",
        "duration_s": 3.0,
        "who": "root@host",
        "versions": {"postgresql server": "17.12"},
        "files": {
            "database.dump": {"sha256": "a" * 64, "size": 10},
            "media.tar.gz": {"sha256": "b" * 64, "size": 20},
        },
        "tables": {"public.courses_course": [3, "1234"]},
        "migrations": {"courses": "0001_initial"},
        "restore_steps": bk.restore_steps(env, "20261126T020000Z-prod-daily", "aiia_postgresql"),
    }
    data.update(over)
    return data


def test_manifest_is_for_people_and_reads_back(stack):
    text = bk.render_manifest(manifest(stack))
    assert f"{'a' * 64}  database.dump\n" in text  # sha256sum -c format
    assert "invoke backup.restore --env prod --id 20261126T020000Z-prod-daily" in text
    assert "pg_restore --dbname=aiia_prod --no-owner" in text
    assert "public.courses_course" in text and "0001_initial" in text
    assert bk.parse_manifest(text) == manifest(stack)


def test_a_manifest_without_its_data_is_refused():
    with pytest.raises(OpsError, match="no machine-readable part"):
        bk.parse_manifest("AI-IA backup x\n")
    with pytest.raises(OpsError, match="damaged"):
        bk.parse_manifest(f"x\n{bk.MANIFEST_JSON_MARK}\n{{not json")


def test_secrets_are_redacted_longest_first():
    data = b'requirepass "abcdefgh12345"\n"u" "abcdefgh"\n'
    out = bk.redact(data, {"SHORT": "abcdefgh", "LONG": "abcdefgh12345"})
    assert out == b'requirepass "<redacted:LONG>"\n"u" "<redacted:SHORT>"\n'


# --- retention ---------------------------------------------------------------------------


def rec(n: int, kind: str, env: str = "prod", verify=None, files=None) -> bk.BackupRecord:
    when = T0 + dt.timedelta(hours=n)
    return bk.BackupRecord(
        bk.new_id(when, env, kind),
        env,
        kind,
        when,
        f"/b/{n}",
        files or {bk.DUMP: 100, bk.MEDIA: 10, bk.CONFIG: 1},
        {},
        verify,
    )


def survivors(records, plan):
    gone = {r.id for r, _ in plan.delete_sets}
    return [r for r in records if r.id not in gone]


def test_after_more_backups_than_retention_exactly_the_documented_number_remains():
    records, n = [], 0
    for kind, count in (("pre-deploy", 5), ("daily", 10), ("manual", 6), ("pre-restore", 4)):
        for _ in range(count):
            records.append(rec(n, kind))
            n += 1
    plan = bk.plan_prune(records, RETENTION)
    left = survivors(records, plan)
    counts = {k: sum(r.kind == k for r in left) for k in bk.ALL_KINDS}
    assert counts == {"pre-deploy": 3, "daily": 7, "manual": 3, "pre-restore": 3}
    # The newest of each kind stay.
    for kind in bk.ALL_KINDS:
        of_kind = [r.id for r in records if r.kind == kind]
        assert {r.id for r in left if r.kind == kind} == set(of_kind[-3:] if kind != "daily"
                                                             else of_kind[-7:])  # fmt: skip
    # Media and config: only in the newest set.
    trimmed = {(r.id, name) for r, name, _ in plan.delete_files}
    newest = max(left, key=lambda r: r.id)
    for name in (bk.MEDIA, bk.CONFIG):
        assert {r.id for r in left if (r.id, name) not in trimmed} == {newest.id}
    why = dict((r.id, w) for r, w in plan.delete_sets)
    assert why[records[0].id] == "older than the newest 3 pre-deploy"


def test_pruning_never_deletes_the_newest_verified_backup():
    records = [rec(0, "daily", verify={"ok": True})] + [rec(n, "daily") for n in range(1, 10)]
    plan = bk.plan_prune(records, RETENTION)
    left = survivors(records, plan)
    assert records[0] in left and len(left) == 8  # 7 newest + the newest verified one
    assert all(r.id != records[0].id for r, _, _ in plan.delete_files)  # and whole


def test_a_failed_verification_does_not_make_a_set_deletable():
    """Replaces the old "failed = deleted by the next prune" rule (issue 13): the newest 3
    manual sets stay whatever their verification said; the oldest goes by age only."""
    records = [rec(n, "manual") for n in range(3)] + [rec(3, "manual", verify={"ok": False})]
    plan = bk.plan_prune(records, RETENTION)
    assert [(r.id, why) for r, why in plan.delete_sets] == [
        (records[0].id, "older than the newest 3 manual")
    ]
    assert records[3] in survivors(records, plan)


def test_three_failed_verifications_in_a_row_leave_the_newest_dumps_in_place():
    good = rec(0, "daily", verify={"ok": True})
    old = [rec(n, "daily") for n in range(1, 8)]
    failed = [rec(n, "daily", verify={"ok": False, "problems": ["oom"]}) for n in (8, 9, 10)]
    records = [good, *old, *failed]
    plan = bk.plan_prune(records, RETENTION)
    left = survivors(records, plan)
    # The 7 newest dailies (the three failed ones among them) and the newest verified one.
    assert [r.id for r in left] == [good.id] + [r.id for r in records[-7:]]
    assert all(r in left for r in failed)
    assert {r.id for r, _ in plan.delete_sets} == {r.id for r in old[:3]}
    assert all(why == "older than the newest 7 daily" for _, why in plan.delete_sets)
    # Pruning again after the same failures changes nothing more.
    again = bk.plan_prune(left, RETENTION)
    assert again.delete_sets == []
    # And the failures are an alert, naming the sets and the newest restorable one.
    (alert,) = bk.verify_alerts(records)
    assert alert.startswith("ALERT prod: 3 backup(s) failed verification")
    assert all(r.id in alert for r in failed) and f"Newest verified: {good.id}" in alert


def test_old_sets_beyond_retention_go_whatever_their_verification():
    records = [rec(n, "pre-deploy", verify={"ok": False}) for n in range(6)]
    plan = bk.plan_prune(records, RETENTION)
    assert [r.id for r, _ in plan.delete_sets] == [r.id for r in records[:3]]
    assert survivors(records, plan) == records[3:]


def test_no_alert_once_a_newer_set_verifies():
    records = [rec(0, "daily", verify={"ok": False}), rec(1, "daily", verify={"ok": True})]
    assert bk.verify_alerts(records) == []
    assert bk.verify_alerts([rec(0, "daily"), rec(1, "manual", "staging")]) == []
    (alert,) = bk.verify_alerts([rec(0, "daily", "staging", verify={"ok": False})])
    assert alert.startswith("ALERT staging: 1 backup(s)") and "Newest verified: none" in alert


def test_environments_are_pruned_separately():
    records = [rec(n, "manual", env) for env in ("prod", "staging") for n in range(3)]
    assert bk.plan_prune(records, RETENTION).delete_sets == []


def test_nothing_to_prune_is_an_empty_plan():
    assert bk.plan_prune([rec(0, "manual")], RETENTION).empty


# --- space -------------------------------------------------------------------------------


def test_too_little_disk_is_a_clear_refusal():
    with pytest.raises(OpsError) as exc:
        bk.check_space(300 * 1024**2, 100 * 1024**2, "/var/lib/aiia/backups/prod", "backup")
    assert str(exc.value) == (
        "not enough free disk for backup: /var/lib/aiia/backups/prod has 300.0 MB free, the "
        "backup needs about 100.0 MB and 256.0 MB must stay free; nothing was written. Free "
        "space (invoke backup.prune, docker image prune) and try again"
    )
    bk.check_space(400 * 1024**2, 100 * 1024**2, "/x", "backup")


def test_estimate_uses_the_last_dump_when_it_is_smaller_than_the_database():
    assert bk.backup_estimate(1000 * 1024**2, 0, None) == 1001 * 1024**2
    assert bk.backup_estimate(1000 * 1024**2, 5, 100 * 1024**2) == 151 * 1024**2 + 5


# --- commands ----------------------------------------------------------------------------


def test_dump_runs_the_script_in_the_postgres_container_into_a_host_file(stack):
    argv = bk.stdout_to("/s/backups/prod/x/database.dump", bk.dump_database(stack, "aiia_prod"))
    assert argv == [
        "sh", "-c", 'out=$1; shift; exec "$@" > "$out"', "sh", "/s/backups/prod/x/database.dump",
        "docker", "exec", "-i", "aiia_postgresql", "bash", "-s", "--", "aiia_prod",
    ]  # fmt: skip
    assert bk.BACKUP_SCRIPT.is_file()


def test_restore_makes_every_object_the_environment_role_s(stack):
    assert " ".join(bk.restore_into(stack, "aiia_prod__restore_x", "aiia_prod")) == (
        "docker exec -i aiia_postgresql pg_restore --dbname=aiia_prod__restore_x --no-owner "
        "--no-privileges --role=aiia_prod --exit-on-error --single-transaction"
    )


def test_pgbouncer_admin_goes_over_its_socket_with_no_password(stack):
    assert " ".join(bk.pause(stack, "aiia_staging")) == (
        "docker exec aiia_pgbouncer psql -X -q -At -h /tmp -p 6432 -U pgbouncer pgbouncer "
        "-c PAUSE aiia_staging"
    )
    assert bk.resume(stack, "aiia_staging")[-1] == "RESUME aiia_staging"
    assert bk.kill(stack, "aiia_staging")[-1] == "KILL aiia_staging"


def test_cache_flush_empties_only_the_environment_s_redis_database(stack):
    assert bk.flush_cache(stack, stack.environment("staging")) == [
        "docker", "exec", "aiia_redis", "redis-cli", "-n", "1", "FLUSHDB",
    ]  # fmt: skip


def test_names_are_checked_before_they_reach_a_command(stack):
    with pytest.raises(OpsError, match="not a plain lower-case database name"):
        bk.pause(stack, "aiia_prod; SHUTDOWN")
    name = bk.scratch_name("a" * 60, "restore", "20261126T020000Z-prod-daily")
    assert len(name) == 63


def test_swap_refuses_new_connections_and_ends_the_old_ones_before_renaming():
    sql = bk.swap_sql()
    order = [
        sql.index("ALLOW_CONNECTIONS false"),
        sql.index("pg_terminate_backend"),
        sql.index('RENAME TO :"old"'),
        sql.index('ALTER DATABASE :"new" RENAME TO :"db"'),
    ]
    assert order == sorted(order)


def test_a_dry_run_deploy_s_backup_prints_the_commands_and_writes_nothing(stack, tmp_path):
    import io

    from aiia_ops.flows.backup import take_backup
    from aiia_ops.host.runners import PrintingRunner, RecordingRunner
    from aiia_ops.model.state import StateDir

    out = io.StringIO()
    record = take_backup(stack, StateDir(tmp_path), "prod", "pre-deploy", PrintingRunner(out))
    assert record.kind == "pre-deploy" and record.env == "prod"
    lines = out.getvalue().splitlines()
    # pg_isready is a question (query), asked of the target, not a printed change: with a
    # reader it is the first thing asked; the first command touching the engine is the dump.
    docker = [line for line in lines if " docker " in line]
    assert docker[0].endswith("database.dump docker exec -i aiia_postgresql bash -s -- aiia_prod")
    assert list(tmp_path.iterdir()) == []
    reader = RecordingRunner()
    take_backup(stack, StateDir(tmp_path), "prod", "pre-deploy", PrintingRunner(out, reader))
    assert reader.commands[0] == ["docker", "exec", "aiia_postgresql", "pg_isready", "-q"]
    assert list(tmp_path.iterdir()) == []
