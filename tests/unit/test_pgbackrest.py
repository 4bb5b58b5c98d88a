"""pgBackRest as data (commands/pgbackrest.py): config, archive settings, argv, info, targets."""

from __future__ import annotations

import json
from datetime import UTC, datetime

import pytest

from aiia_ops.commands import monitor as m
from aiia_ops.commands import pgbackrest as pb
from aiia_ops.commands import schedule
from aiia_ops.commands.compose import env_files
from aiia_ops.commands.render import render_stack
from aiia_ops.errors import OpsError
from aiia_ops.model.budget import check_budget, has_errors
from aiia_ops.model.load import stack_from_data
from aiia_ops.model.secrets import EnvSecrets, Secrets
from tests.stackfiles import patched_stack

LAB_REPO = {"endpoint": "10.77.0.19", "port": 8443, "bucket": "aiia-backups", "verify_tls": False}
INFO = (
    '[{"archive":[{"database":{"id":1,"repo-key":1},"id":"17-1","max":"000000010000000000000003",'
    '"min":"000000010000000000000001"}],"backup":[{"archive":{"start":"000000010000000000000002",'
    '"stop":"000000010000000000000002"},"info":{"delta":23421671,"repository":{"delta":2825832},'
    '"size":23421671},"label":"20261202-013434F","prior":null,"timestamp":{"start":1796175274,'
    '"stop":1796175276},"type":"full"}],"cipher":"aes-256-cbc","name":"aiia",'
    '"status":{"code":0,"message":"ok"}}]'
)


def stack(enabled: bool = True, **pitr):
    patch = {"backups": {"pitr": {"enabled": enabled, "repo1": LAB_REPO, **pitr}}}
    return stack_from_data(patched_stack(patch))


def secrets(model) -> Secrets:
    envs = {n: EnvSecrets("db-pw", "sk", "tok", "rp") for n in model.environments}
    return Secrets("pg-pw", "r", "b", envs, "", "CIPHER-KEY-x", "S3-KEY-y", "S3-SECRET-z")


def test_committed_stack_keeps_archiving_off_and_renders_no_pgbackrest_config():
    model = stack_from_data(patched_stack())
    assert model.backups.pitr is not None and not model.backups.pitr.enabled
    files = render_stack(model, secrets(model))
    assert "postgresql/pgbackrest.conf" not in files
    conf = files["postgresql/postgresql.conf"].text
    assert "archive_mode = off" in conf and "archive_command =" not in conf
    assert "PGBACKREST_REPO1_CIPHER_PASS" not in env_files(model, secrets(model))["postgresql"]


def test_enabled_archiving_renders_pgbackrest_encrypted_and_keys_only_in_the_env_file():
    model = stack(archive_timeout="30s")
    s = secrets(model)
    files = render_stack(model, s)
    conf = files["postgresql/postgresql.conf"].text
    assert "archive_mode = on" in conf
    assert (
        "archive_command = 'pgbackrest --config=/etc/aiia/pgbackrest.conf --stanza=aiia "
        "archive-push %p'" in conf
    )
    assert "archive_timeout = 30s" in conf
    pgb = files["postgresql/pgbackrest.conf"]
    assert not pgb.secret
    for line in ("repo1-type=s3", "repo1-cipher-type=aes-256-cbc", "repo1-s3-endpoint=10.77.0.19",
                 "repo1-storage-port=8443", "repo1-storage-verify-tls=n", "archive-async=y",
                 "repo1-retention-full=2", "repo1-retention-diff=7", "[aiia]"):  # fmt: skip
        assert line in pgb.text.splitlines(), line
    every_file = "".join(f.text for f in files.values())
    for value in ("CIPHER-KEY-x", "S3-KEY-y", "S3-SECRET-z"):
        assert value not in every_file
    env = env_files(model, s)["postgresql"]
    assert env["PGBACKREST_REPO1_CIPHER_PASS"] == "CIPHER-KEY-x"
    assert env["PGBACKREST_REPO1_S3_KEY_SECRET"] == "S3-SECRET-z"
    assert all(v in s.values() for v in ("CIPHER-KEY-x", "S3-KEY-y", "S3-SECRET-z"))  # redacted


def test_budget_counts_pgbackrest_when_archiving_is_on():
    """The committed allocation leaves pgBackRest its 40 MB inside PostgreSQL's 146 MB
    (tests/unit/test_budget.py: what does not fit)."""
    findings = check_budget(stack())
    assert not has_errors(findings)
    pg = next(f for f in findings if f.check == "postgresql memory")
    assert "+ pgBackRest 40MB (backups.pitr.memory) = 146MB, within 146MB" in pg.message


def test_conf_uses_small_buffers():
    """64 KiB buffers: the measured peak of a large full backup fits the 40 MB allowance."""
    assert "\nbuffer-size=64KiB\n" in pb.conf_text(stack())


def test_restore_argv_targets_a_moment_in_utc_or_the_end():
    model = stack()
    when = datetime(2026, 12, 2, 2, 30, 5, 120000, tzinfo=UTC)
    argv = pb.restore(model, when)
    assert "--type=time" in argv and "--target=2026-12-02 02:30:05.120000+00" in argv
    assert "--target-action=promote" in argv and "--delta" in argv
    assert "--type=default" in pb.restore(model, None)
    with pytest.raises(OpsError, match="unknown base backup type"):
        pb.backup(model, "weekly")


def test_parse_info_gives_the_window():
    w = pb.parse_info(INFO, "aiia")
    assert w.status == "ok" and len(w.backups) == 1
    assert w.oldest == datetime.fromtimestamp(1796175276, UTC)
    assert w.archive_min.endswith("01") and w.archive_max.endswith("03")
    with pytest.raises(OpsError, match="no stanza 'other'"):
        pb.parse_info(INFO, "other")
    with pytest.raises(OpsError, match="printed no JSON"):
        pb.parse_info("ERROR: [039]", "aiia")


@pytest.mark.parametrize("text", ["yesterday", "2026-13-45", "2026-12-02 25:00", "now; rm -rf /"])
def test_a_bad_target_is_refused_with_the_format(text):
    with pytest.raises(OpsError, match="is not a moment"):
        pb.parse_target(text)


def test_targets_outside_the_window_are_refused():
    w = pb.parse_info(INFO, "aiia")
    oldest = w.oldest
    assert pb.parse_target("latest") is None
    assert pb.parse_target("2026-12-02 01:30:00").tzinfo is not None
    newest = datetime(2026, 12, 2, 12, 0, tzinfo=UTC)
    pb.check_target(datetime(2026, 12, 2, 11, 0, tzinfo=UTC), w, newest)
    for bad in (datetime(2000, 1, 1, tzinfo=UTC), datetime(2026, 12, 2, 13, 0, tzinfo=UTC)):
        with pytest.raises(OpsError, match="outside the recoverable window"):
            pb.check_target(bad, w, newest)
    empty = pb.Window("aiia", "ok", (), "", "")
    with pytest.raises(OpsError, match="no base backup yet"):
        pb.check_target(None, empty, newest)
    assert oldest is not None


def test_cron_has_the_base_backup_only_when_archiving_is_on():
    on = [j for j in schedule.jobs(stack()) if j.task[0] == "backup.base"]
    assert len(on) == 1 and (on[0].hour, on[0].minute) == ("1", "30")
    assert not [j for j in schedule.jobs(stack(enabled=False)) if j.task[0] == "backup.base"]
    assert pb.backup_kind_for(6, stack().backups.pitr) == "full"  # Sunday
    assert pb.backup_kind_for(2, stack().backups.pitr) == "diff"


def test_archive_lag_check_goes_critical():
    pitr = stack(lag_warning="60s", lag_critical="120s").backups.pitr
    fresh = {"archive_lag_s": 5, "backup_age_s": 3600, "last_archived_wal": "0001",
             "status": "ok", "reachable": True,
             "repository": "repo1 s3://b/p at h:443"}  # fmt: skip
    checks = m.archive_checks(fresh, pitr)
    assert [c.metric for c in checks] == ["archive_lag", "base_backup_age", "repository"]
    assert [c.state for c in checks] == [m.OK, m.OK, m.OK]
    assert checks[2].detail == "repo1 s3://b/p at h:443"
    stalled = {**fresh, "archive_lag_s": 121, "archive_failed": 4}
    lag = m.archive_checks(stalled, pitr)[0]
    assert lag.state == m.CRIT and "4 failed pushes" in lag.detail
    never = {"archive_lag_s": None, "backup_age_s": None, "status": "no stanza"}
    assert [c.state for c in m.archive_checks(never, pitr)] == [m.CRIT, m.CRIT, m.CRIT]
    gone = {**fresh, "reachable": False, "status": "pgbackrest info failed: unreachable"}
    repo = m.archive_checks(gone, pitr)[2]
    assert repo.state == m.CRIT and repo.detail == "pgbackrest info failed: unreachable"


def test_pgbackrest_errors_are_explained():
    pitr = stack().backups.pitr
    key = pb.explain(
        "ERROR: [095]: unable to load info file: CryptoError: cipher header invalid", pitr
    )
    assert key.startswith("the repository cannot be read with this key: PGBACKREST_CIPHER_PASS")
    full = pb.explain("ERROR: [039]: HTTP request failed with 500 (Internal Server Error)", pitr)
    assert full.startswith(
        "the off-site store at 10.77.0.19:8443 refused the write: is its disk full?"
    )
    assert full.endswith(
        "(pgBackRest: ERROR: [039]: HTTP request failed with 500 (Internal Server Error))"
    )
    down = pb.explain("ERROR: [049]: unable to get address for 'x': [-2] Name or service "
                      "not known; unable to connect", pitr)  # fmt: skip
    assert down.startswith("the off-site store at 10.77.0.19:8443 is unreachable")
    assert pb.explain("ERROR: [056]: something else", pitr) == "ERROR: [056]: something else"
    lost = pb.explain("ERROR: [057]: unable to execute query 'select pg_catalog.pg_is_in_"
                      "recovery()': server closed the connection unexpectedly", pitr)  # fmt: skip
    assert lost.startswith("pgBackRest lost its connection to PostgreSQL (did the container")
    assert "off-site store" not in lost


def test_bad_pitr_keys_are_reported():
    with pytest.raises(OpsError) as err:
        stack(base_at="25:00", lag_warning="900s", lag_critical="300s")
    assert "backups.pitr.base_at" in str(err.value)
    assert "backups.pitr.lag_warning" in str(err.value)
    with pytest.raises(OpsError, match=r"backups\.pitr\.repo1\.bucket"):
        stack(repo1={**LAB_REPO, "bucket": "Bad_Bucket"})


def test_the_error_line_is_pgbackrests_error_not_its_last_hint():
    out = (
        "WARN: option 'repo1-retention-full' is not set\n"
        "ERROR: [087]: archive_mode must be enabled\n"
        "       HINT: use --no-archive-check to disable archive checks during backup.\n"
    )
    assert pb.error_line(out) == "ERROR: [087]: archive_mode must be enabled"
    full = ("ERROR: [101]: raised from local-1 protocol: [500] Internal Server Error\n"
            "           [ServiceError] on 12 retries from 368-60143ms: "
            "[500] Internal Server Error\n")  # fmt: skip
    assert pb.error_line(full).endswith("60143ms: [500] Internal Server Error")
    assert "is its disk full?" in pb.explain(pb.error_line(full), stack().backups.pitr)
    assert pb.error_line("only\nlast line\n") == "last line"


def test_a_wrong_key_reads_as_such_in_info():
    """`pgbackrest info` with the wrong key (seen with 2.55.1): status "other", the cause in
    the repository's status, with the garbage the key made of backup.info."""
    text = json.dumps([{"archive": [], "backup": [], "name": "aiia", "repo": [{"status": {
        "code": 99, "message": "[FormatError] unable to load info file '/pgbackrest/backup/aiia/"
        "backup.info' or '...copy':\nFormatError: key/value found outside of section at line "
        "1: \x01\x02V\b=F\nHINT: has a stanza-create been performed?"}}],
        "status": {"code": 99, "message": "other"}}])  # fmt: skip
    w = pb.parse_info(text, "aiia")
    assert w.status.startswith("[FormatError] unable to load info file") and not w.backups
    assert pb.explain(w.status, stack().backups.pitr).startswith(
        "the repository cannot be read with this key"
    )


CA_PEM = (
    "-----BEGIN CERTIFICATE-----\nMIIBszCCAVmgAwIBAgIUQ2FkZW1v\nQ2FkZW1vQ2FkZW1v==\n"
    "-----END CERTIFICATE-----\n"
)


def test_a_ca_of_ones_own_is_rendered_beside_the_config_and_given_to_restic():
    import base64

    model = stack(repo1={**LAB_REPO, "verify_tls": True, "ca": CA_PEM})
    files = render_stack(model, secrets(model))
    assert files["postgresql/pgbackrest-ca.pem"].text == CA_PEM
    conf = files["postgresql/pgbackrest.conf"].text
    lines = "\nrepo1-storage-verify-tls=y\nrepo1-storage-ca-file=/etc/aiia/pgbackrest-ca.pem\n"
    assert lines in conf
    env = env_files(model, secrets(model))["postgresql"]
    assert base64.b64decode(env[pb.CA_ENV]).decode() == CA_PEM  # one line in the env file
    # without one: the image's public CAs, nothing rendered, nothing in the env file
    plain = stack(repo1={**LAB_REPO, "verify_tls": True})
    files = render_stack(plain, secrets(plain))
    assert "postgresql/pgbackrest-ca.pem" not in files
    assert "ca-file" not in files["postgresql/pgbackrest.conf"].text
    assert pb.CA_ENV not in env_files(plain, secrets(plain))["postgresql"]


def test_a_real_ca_certificate_fits_and_an_endless_one_is_refused():
    """A PEM is longer than the 1000 characters other strings may have (LongText)."""
    body = "Q2FkZW1vQ2FkZW1vQ2FkZW1vQ2FkZW1vQ2FkZW1vQ2FkZW1vQ2FkZW1vQ2FkZW1vQ2FkZW1vQ2Fk\n" * 20
    real = f"-----BEGIN CERTIFICATE-----\n{body}-----END CERTIFICATE-----\n"
    assert len(real) > 1000
    assert stack(repo1={**LAB_REPO, "ca": real}).backups.pitr.repo1.ca == real
    with pytest.raises(OpsError, match="expected at most 20000 characters"):
        stack(repo1={**LAB_REPO, "ca": real * 20})


def test_a_ca_that_is_not_a_pem_certificate_is_refused_naming_the_key():
    with pytest.raises(OpsError) as err:
        stack(repo1={**LAB_REPO, "ca": "/etc/ssl/my-ca.pem"})
    text = str(err.value)
    assert "backups.pitr.repo1.ca" in text and "PEM text of the CA certificate" in text


def test_an_untrusted_store_certificate_is_explained_as_tls_not_as_a_wrong_key():
    pitr = stack().backups.pitr
    for line in (
        "[CryptoError] unable to verify certificate presented by '10.77.0.19:8443': [19] "
        "self-signed certificate in certificate chain",
        "[CryptoError] unable to set user-defined CA certificate location: [2147483650]",
    ):
        said = pb.explain(line, pitr)
        assert said.startswith("TLS to the off-site store at 10.77.0.19:8443 failed")
        assert "backups.pitr.repo1.ca" in said and "with this key" not in said
    assert "with this key" in pb.explain("[CryptoError] cipher: bad decrypt", pitr)
