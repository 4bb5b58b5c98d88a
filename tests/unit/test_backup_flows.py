"""The backup flows with facts as data: RecordingRunner answers in, exact commands out."""

from __future__ import annotations

import hashlib
import io
import json

import pytest

from aiia_ops import DEFAULT_STACK
from aiia_ops.commands import backups as bk
from aiia_ops.commands.argv import Result, quote
from aiia_ops.errors import OpsError
from aiia_ops.flows import backup as flow
from aiia_ops.flows import restore as restores
from aiia_ops.host.lock import LockHeld
from aiia_ops.host.runners import PrintingRunner, RecordingRunner
from aiia_ops.model import load_stack
from aiia_ops.model.state import StateDir

ROOT = "/s"
STATE = StateDir(__import__("pathlib").Path(ROOT))
DUMP_BYTES = b"PGDMP fake dump"
DIGEST = hashlib.sha256(DUMP_BYTES).hexdigest()


@pytest.fixture(scope="module")
def stack():
    return load_stack(DEFAULT_STACK)


def manifest_text(backup_id: str, env: str = "prod", digest: str = DIGEST) -> str:
    _, _, kind = bk.parse_id(backup_id)
    return bk.render_manifest(
        {
            "id": backup_id,
            "env": env,
            "kind": kind,
            "database": f"aiia_{env}",
            "database_size": 1000,
            "started": "2026-11-26T02:00:00Z",
            "finished": "2026-11-26T02:00:01Z",
            "duration_s": 1.0,
            "who": "root@host",
            "versions": {},
            "files": {bk.DUMP: {"sha256": digest, "size": len(DUMP_BYTES)}},
            "tables": {"public.courses_course": [3, "1234"]},
            "restore_steps": [],
        }
    )


def on_disk(ids: list[str], env: str = "prod") -> tuple[dict, dict]:
    """(answers, files) of a RecordingRunner that sees these sets in <ROOT>/backups/<env>."""
    lines = [f"d\t{env}\t4096"]
    files = {}
    for backup_id in ids:
        lines += [
            f"d\t{env}/{backup_id}\t4096",
            f"f\t{env}/{backup_id}/{bk.DUMP}\t{len(DUMP_BYTES)}",
            f"f\t{env}/{backup_id}/{bk.MEDIA}\t20",
            f"f\t{env}/{backup_id}/{bk.CONFIG}\t30",
            f"f\t{env}/{backup_id}/{bk.MANIFEST}\t900",
        ]
        files[f"{ROOT}/backups/{env}/{backup_id}/{bk.MANIFEST}"] = manifest_text(backup_id, env)
    answers = {quote(bk.list_tree(f"{ROOT}/backups")): "\n".join(lines) + "\n"}
    return answers, files


def recording(answers: dict, files: dict) -> RecordingRunner:
    runner = RecordingRunner(answers)
    runner.files.update({k: v.encode() for k, v in files.items()})
    return runner


def ids(kind: str, n: int, env: str = "prod") -> list[str]:
    return [f"202611{day:02d}T020000Z-{env}-{kind}" for day in range(1, n + 1)]


# --- records ------------------------------------------------------------------------------


def test_records_are_read_through_the_runner(stack):
    answers, files = on_disk(ids("daily", 2))
    answers[quote(bk.list_tree(f"{ROOT}/backups"))] += (
        "d\tprod/20261130T020000Z-prod-manual.partial\t0\n"
    )
    runner = recording(answers, files)
    records = flow.list_records(STATE, "prod", runner)
    assert [r.id for r in records] == ids("daily", 2)
    assert records[0].files == {bk.DUMP: 15, bk.MEDIA: 20, bk.CONFIG: 30, bk.MANIFEST: 900}
    assert records[0].manifest["tables"] == {"public.courses_course": [3, "1234"]}
    assert flow.latest_record(STATE, "prod", runner).id == ids("daily", 2)[-1]
    with pytest.raises(OpsError, match="no backup '20000101T000000Z-prod-manual' in /s/backups"):
        flow.find_record(STATE, "20000101T000000Z-prod-manual", runner)


# --- prune --------------------------------------------------------------------------------


def test_prune_plan_becomes_exact_rm_commands_under_the_environment_s_lock(stack):
    sets = ids("manual", 5)
    runner = recording(*on_disk(sets))
    summary = flow.prune(stack, STATE, "prod", runner)
    assert summary.startswith("6 item(s); retention:")  # 2 sets, media and config of 2
    changes = [c for c in runner.commands if c[0] in ("rm", "mkdir")]
    assert changes == [
        ["mkdir", "-p", "/s/locks"],
        ["mkdir", "/s/locks/backup-prod"],
        ["rm", "-rf", "--", f"/s/backups/prod/{sets[0]}"],
        ["rm", "-rf", "--", f"/s/backups/prod/{sets[1]}"],
        ["rm", "-f", "--", f"/s/backups/prod/{sets[3]}/{bk.MEDIA}"],
        ["rm", "-f", "--", f"/s/backups/prod/{sets[2]}/{bk.MEDIA}"],
        ["rm", "-f", "--", f"/s/backups/prod/{sets[3]}/{bk.CONFIG}"],
        ["rm", "-f", "--", f"/s/backups/prod/{sets[2]}/{bk.CONFIG}"],
        ["rm", "-rf", "/s/locks/backup-prod"],
    ]
    # The trimmed set's manifest says what was pruned (restore then knows it is not missing).
    rewritten = bk.parse_manifest(runner.files[f"/s/backups/prod/{sets[3]}/{bk.MANIFEST}"].decode())
    assert set(rewritten["pruned"]) == {bk.MEDIA, bk.CONFIG}


def test_prune_dry_run_prints_the_same_commands_and_changes_nothing(stack):
    sets = ids("manual", 4)
    reader = recording(*on_disk(sets))
    out = io.StringIO()
    flow.prune(stack, STATE, None, PrintingRunner(out, reader=reader))
    printed = out.getvalue().splitlines()
    assert f"[local] rm -rf -- /s/backups/prod/{sets[0]}" in printed
    assert all(c[0] in ("find", "test") for c in reader.commands)  # only questions reached it
    assert all(path.endswith(bk.MANIFEST) for path in reader.files)  # nothing written


# --- the lock -----------------------------------------------------------------------------


def test_a_second_backup_of_an_environment_is_refused_naming_the_holder(stack):
    answers, files = on_disk([])
    answers["mkdir /s/locks/backup-prod"] = Result([], 1, "", "File exists")
    files["/s/locks/backup-prod/holder.json"] = json.dumps(
        {"holder": "ann@ops", "since": "2026-12-01T02:00:00Z", "action": "backup daily",
         "pid": 4242, "from": "elsewhere"}
    )  # fmt: skip
    runner = recording(answers, files)
    with pytest.raises(LockHeld, match="backup-prod is locked by ann@ops since 2026-12-01"):
        flow.take_backup(stack, STATE, "prod", "manual", runner)
    assert not any(c[:2] == ["rm", "-rf"] for c in runner.commands)  # not taken over
    last = json.loads(runner.files[f"/s/backups/prod/{bk.LAST_RUN}"])
    assert last["manual"]["ok"] is False and "backup-prod is locked" in last["manual"]["error"]


# --- taking a backup ------------------------------------------------------------------------


def test_a_backup_is_written_under_partial_and_renamed_when_complete(stack):
    answers, files = on_disk([])
    dump_prefix = 'sh -c \'out=$1; shift; exec "$@" > "$out"\' sh'
    answers.update(
        {
            quote(bk.psql(stack, "postgres", ("db", "aiia_prod"))): "17.2|5000\n",
            quote(bk.container_running("aiia_django_prod")): "false\n",
            dump_prefix: Result([], 0, "", "census|public.courses_course|3|1234\n"),
            "stat ": f"{len(DUMP_BYTES)}\t/x/{bk.DUMP}\n",
            "sha256sum ": f"{DIGEST}  /x/{bk.DUMP}\n",
            "sh -c 'p=$1": "Avail\n99999999999\n",
        }
    )
    runner = recording(answers, files)
    record = flow.take_backup(stack, STATE, "prod", "daily", runner)
    final = f"/s/backups/prod/{record.id}"
    partial = f"{final}{bk.PARTIAL_SUFFIX}"
    changes = [c for c in runner.commands if c[0] in ("mkdir", "mv", "rm")]
    assert changes == [
        ["mkdir", "-p", "/s/locks"],
        ["mkdir", "/s/locks/backup-prod"],
        ["mkdir", "-p", "--", "/s/backups/prod"],
        ["mkdir", "-m", "700", "--", partial],
        ["mv", "-T", "--", partial, final],
        ["rm", "-rf", "/s/locks/backup-prod"],
    ]
    manifest = bk.parse_manifest(runner.files[f"{partial}/{bk.MANIFEST}"].decode())
    assert manifest["files"] == {bk.DUMP: {"sha256": DIGEST, "size": len(DUMP_BYTES)}}
    assert manifest["tables"] == {"public.courses_course": [3, "1234"]}
    assert f"{partial}/{bk.CONFIG}" in runner.files
    assert json.loads(runner.files[f"/s/backups/prod/{bk.LAST_RUN}"])["daily"]["id"] == record.id
    assert any(c[:2] == ["sh", "-c"] and c[-2] == "/s/audit.log" for c in runner.commands)


def test_a_backup_without_a_census_is_not_kept(stack):
    answers, files = on_disk([])
    answers[quote(bk.psql(stack, "postgres", ("db", "aiia_prod")))] = "17.2|5000\n"
    runner = recording(answers, files)
    with pytest.raises(OpsError, match="came with no table census; not kept"):
        flow.take_backup(stack, STATE, "prod", "manual", runner)
    partial = next(c[-1] for c in runner.commands if c[:3] == ["mkdir", "-m", "700"])
    assert ["rm", "-rf", "--", partial] in runner.commands  # the partial set goes
    assert not any(c[0] == "mv" for c in runner.commands)


# --- restore ------------------------------------------------------------------------------


def test_restore_refuses_a_bad_checksum_before_changing_anything(stack):
    backup_id = ids("daily", 1)[0]
    answers, files = on_disk([backup_id])
    answers["stat "] = f"{len(DUMP_BYTES)}\t/x/{bk.DUMP}\n"
    answers["sha256sum "] = f"{'0' * 64}  /x/{bk.DUMP}\n"
    runner = recording(answers, files)
    with pytest.raises(OpsError) as exc:
        restores.restore_backup(stack, STATE, "prod", backup_id, runner, yes=True)
    assert "does not match its manifest, refusing to restore it" in str(exc.value)
    assert "database.dump: sha256 differs from the manifest" in str(exc.value)
    assert "Nothing was changed" in str(exc.value)
    assert {c[0] for c in runner.commands} == {"find", "stat", "sha256sum"}  # questions only


def test_restore_without_a_terminal_or_yes_is_refused(stack, monkeypatch):
    backup_id = ids("daily", 1)[0]
    answers, files = on_disk([backup_id])
    answers["stat "] = f"{len(DUMP_BYTES)}\t/x/{bk.DUMP}\n"
    answers["sha256sum "] = f"{DIGEST}  /x/{bk.DUMP}\n"
    answers[quote(bk.psql(stack, "postgres", ("db", "aiia_prod")))] = "17.2|5000\n"
    runner = recording(answers, files)
    monkeypatch.setattr("sys.stdin", io.StringIO(""))
    with pytest.raises(OpsError, match="refusing to restore without confirmation; pass --yes"):
        restores.restore_backup(stack, STATE, "prod", backup_id, runner)
    assert not any(c[0] in ("mkdir", "rm", "mv") for c in runner.commands)
    psql = [c for c in runner.commands if "psql" in c]
    assert psql == [bk.psql(stack, "postgres", ("db", "aiia_prod"))]  # the size, a question


def test_restore_dry_run_prints_the_dump_pause_swap_and_resume_and_writes_nothing(stack, tmp_path):
    backup_id = ids("daily", 1)[0]
    answers, files = on_disk([backup_id])
    answers.update(
        {
            "stat ": f"{len(DUMP_BYTES)}\t/x/{bk.DUMP}\n",
            "sha256sum ": f"{DIGEST}  /x/{bk.DUMP}\n",
            quote(bk.psql(stack, "postgres", ("db", "aiia_prod"))): "17.2|5000\n",
            quote(bk.container_running("aiia_pgbouncer")): "true\n",
            quote(bk.container_running("aiia_django_prod")): "true\n",
            quote(bk.pg_free_space(stack)): "Avail\n99999999999\n",
            "sh -c 'p=$1": "Avail\n99999999999\n",
        }
    )
    reader = recording(answers, files)
    out = io.StringIO()
    report = restores.restore_backup(
        stack, STATE, "prod", backup_id, PrintingRunner(out, reader=reader),
        yes=True, health=lambda stack, env: (True, {"http_status": 200}),
    )  # fmt: skip
    assert report["id"] == backup_id and report["healthy"] is True
    printed = out.getvalue()
    pg = "docker exec -i aiia_postgresql"
    bouncer = "docker exec aiia_pgbouncer psql -X -q -At -h /tmp -p 6432 -U pgbouncer pgbouncer -c"
    expected = [
        "database.dump docker exec -i aiia_postgresql bash -s -- aiia_prod",  # safety backup
        f"{pg} pg_restore --dbname=aiia_prod__restore_20261101t020000z",
        f"{bouncer} 'PAUSE aiia_prod'",
        "-v db=aiia_prod -v new=aiia_prod__restore_20261101t020000z",  # the swap
        f"{bouncer} 'RESUME aiia_prod'",
        "docker exec aiia_redis redis-cli -n 0 FLUSHDB",
        f"{bk.MEDIA} docker exec -i aiia_django_prod sh -c",
    ]
    at = [printed.index(text) for text in expected]
    assert at == sorted(at), printed
    assert list(tmp_path.iterdir()) == []
    assert all(path.endswith(bk.MANIFEST) for path in reader.files)  # the reader: read only
    assert {c[0] for c in reader.commands} <= {"find", "stat", "sha256sum", "docker", "sh"}
    assert not any("pg_restore" in c or "PAUSE aiia_prod" in c for c in reader.commands)
