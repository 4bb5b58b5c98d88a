"""The media/config copy off-site (commands/offsite_files.py), the secrets export
(host/export.py) and recover's refusals before anything is contacted (flows/recover.py)."""

from __future__ import annotations

import json
from datetime import UTC, datetime

import pytest

from aiia_ops.commands import offsite_files as of
from aiia_ops.errors import OpsError
from aiia_ops.flows import recover
from aiia_ops.host import export
from aiia_ops.model.load import stack_from_data
from tests.stackfiles import patched_stack

LAB_REPO = {"endpoint": "10.77.0.30", "port": 8443, "bucket": "aiia-backups", "verify_tls": False}


def stack(**repo):
    patch = {"backups": {"pitr": {"enabled": True, "repo1": {**LAB_REPO, **repo}}}}
    return stack_from_data(patched_stack(patch))


SRC = of.Sources({"prod": "aiia_storage_prod"}, "/s/config", "/s/ssl", "/repo/stack.yml")


def test_backup_argv_is_restic_in_the_postgres_image_with_pgbackrests_keys():
    argv = of.backup(stack(), "aiia/postgres:abc", "/s/env/postgresql.env", SRC)
    assert argv[:11] == [
        "docker",
        "run",
        "--rm",
        "--network",
        "bridge",
        "--user",
        "0:0",
        "--env-file",
        "/s/env/postgresql.env",
        "-v",
        "aiia_storage_prod:/offsite/storage/prod:ro",
    ]
    assert "/s/config:/offsite/config:ro" in argv and "/s/ssl:/offsite/ssl:ro" in argv
    assert "/repo/stack.yml:/offsite/stack.yml:ro" in argv
    i = argv.index("aiia/postgres:abc")
    assert argv[i - 2 : i] == ["--entrypoint", "sh"]
    assert 'RESTIC_PASSWORD="$PGBACKREST_REPO1_CIPHER_PASS"' in argv[i + 2]
    assert argv[i + 3 :] == [
        "restic",
        "--repo",
        "s3:https://10.77.0.30:8443/aiia-backups/restic",
        "--no-cache",
        "--insecure-tls",
        "backup",
        "--json",
        "--host",
        "aiia",
        "--tag",
        of.TAG,
        "--exclude",
        "/offsite/config/pgbouncer/userlist.txt",
        "--exclude",
        "/offsite/config/redis/redis.conf",
        "/offsite",
    ]


def test_a_store_with_a_real_certificate_is_verified():
    assert "--insecure-tls" not in of.init(stack(verify_tls=True), "img", "/e")


def test_restore_argv_mounts_the_target_read_write():
    argv = of.restore(
        stack(),
        "img",
        "/e",
        ["/offsite/storage/prod"],
        of.volume_mount("v", "/offsite/storage/prod"),
    )
    assert "v:/offsite/storage/prod" in argv
    assert argv[-10:] == [
        "restore",
        "latest",
        "--host",
        "aiia",
        "--tag",
        of.TAG,
        "--target",
        "/",
        "--include",
        "/offsite/storage/prod",
    ]


def test_parsers_of_restics_json():
    snaps = of.parse_snapshots(
        json.dumps(
            [
                {
                    "short_id": "bbb",
                    "time": "2026-12-02T10:05:00.123456789Z",
                    "paths": ["/offsite"],
                },
                {"short_id": "aaa", "time": "2026-12-02T09:05:00.5+00:00", "paths": ["/offsite"]},
            ]
        )
    )
    assert [s.id for s in snaps] == ["aaa", "bbb"]
    assert snaps[1].time == datetime(2026, 12, 2, 10, 5, 0, 123456, tzinfo=UTC)
    assert of.parse_snapshots("null") == []
    summary = '{"message_type":"status"}\n' + json.dumps(
        {
            "message_type": "summary",
            "snapshot_id": "0123456789ab",
            "files_new": 5,
            "files_changed": 1,
            "total_files_processed": 30,
            "total_bytes_processed": 1500000,
            "data_added": 1400000,
        }
    )
    got = of.parse_backup_summary(summary)
    assert got["snapshot"] == "01234567" and got["files_new"] == 5 and got["added"] == 1400000
    with pytest.raises(OpsError, match="no summary"):
        of.parse_backup_summary('{"message_type":"status"}')
    ls = "\n".join(
        json.dumps({"path": p})
        for p in [
            "/offsite",
            "/offsite/storage/prod/media/a",
            "/offsite/storage/staging",
            "/offsite/config/nginx/nginx.conf",
        ]
    )
    assert of.storage_envs(ls) == ["prod", "staging"]


def test_data_volume_is_the_one_at_pgdata():
    assert of.data_volume(stack()) == "aiia_pgdata"


def test_export_round_trip_and_wrong_passphrase(tmp_path):
    (tmp_path / "secrets").mkdir()
    (tmp_path / "secrets" / "shared.env").write_text("POSTGRES_PASSWORD=p1\n")
    (tmp_path / "secrets" / "prod.env").write_text("DB_PASSWORD=p2\n")
    out = tmp_path / "x.aiia"
    assert export.export(tmp_path, "aiia", ["shared", "prod"], out, "a long passphrase") == 2
    assert out.stat().st_mode & 0o777 == 0o600
    raw = out.read_bytes()
    assert raw.startswith(b"Salted__") and b"p1" not in raw and b"POSTGRES" not in raw
    doc = export.read(out, "a long passphrase")
    assert doc["files"] == {"shared.env": "POSTGRES_PASSWORD=p1\n", "prod.env": "DB_PASSWORD=p2\n"}
    with pytest.raises(OpsError, match="wrong passphrase"):
        export.read(out, "not the passphrase")
    with pytest.raises(OpsError, match="shorter than 12"):
        export.export(tmp_path, "aiia", ["shared"], tmp_path / "y", "short")
    assert not (tmp_path / "y").exists()
    with pytest.raises(OpsError, match="missing"):
        export.export(tmp_path, "aiia", ["staging"], tmp_path / "y", "a long passphrase")
    target = tmp_path / "new"
    export.unpack(doc, target)
    assert (target / "secrets" / "prod.env").read_text() == "DB_PASSWORD=p2\n"
    assert (target / "secrets" / "prod.env").stat().st_mode & 0o777 == 0o600


def test_recover_refuses_unknown_and_local_hosts_and_another_projects_export():
    model = stack()
    with pytest.raises(OpsError, match="unknown host 'lab99'"):
        recover.resolve(model, "lab99")
    with pytest.raises(OpsError, match="is this machine"):
        recover.resolve(model, "local")
    with pytest.raises(OpsError, match="of project 'other'"):
        recover.secrets_from({"project": "other", "files": {}}, model)


def test_last_offsite_copy_age_check():
    from aiia_ops.commands import monitor as m

    pitr = stack().backups.pitr
    assert m.files_copy_check(None, 1e9, pitr).state == m.CRIT
    rec = {"time": "2026-12-02T10:00:00+00:00", "snapshot": "ab12cd34", "files": 7}
    t = datetime(2026, 12, 2, 10, 0, tzinfo=UTC).timestamp()
    assert m.files_copy_check(rec, t + 600, pitr).state == m.OK
    assert m.files_copy_check(rec, t + 4 * 3600, pitr).state == m.WARN
    assert m.files_copy_check(rec, t + 27 * 3600, pitr).state == m.CRIT


def test_the_schedule_copies_the_files_hourly_when_archiving_is_on():
    from aiia_ops.commands import schedule

    jobs = [j for j in schedule.jobs(stack()) if j.task == ["backup.media"]]
    assert [(j.minute, j.hour) for j in jobs] == [("20", "*")]


def test_the_recovery_fetches_wal_synchronously():
    argv = of.restore_newest(stack())
    opt = [a for a in argv if a.startswith("--recovery-option=restore_command=")]
    assert opt == [
        "--recovery-option=restore_command=pgbackrest --config=/etc/aiia/pgbackrest.conf "
        '--stanza=aiia --no-archive-async archive-get %f "%p"'
    ]
    assert "--type=default" in argv
