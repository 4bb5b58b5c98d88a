"""The TLS core as data: which certificates the stack needs, which are due and why, the exact
certbot and installer commands, openssl output parsing, certbot's errors, the status rows."""

from __future__ import annotations

import datetime as dt
import json

import pytest

from aiia_ops import DEFAULT_STACK
from aiia_ops.commands import tls
from aiia_ops.commands.argv import Result, quote
from aiia_ops.flows import tls as renewal
from aiia_ops.host.runners import LocalRunner, PrintingRunner, RecordingRunner, Runner
from aiia_ops.model import load_stack
from aiia_ops.model.budget import check_budget, has_errors
from aiia_ops.model.state import StateDir
from aiia_ops.model.units import Duration

STACK = load_stack(DEFAULT_STACK)  # the committed stack, whatever $AIIA_STACK says
NOW = dt.datetime(2026, 11, 26, 12, 0, tzinfo=dt.UTC)
THIRTY_DAYS = Duration(30 * 86400)
LE = tls.LETS_ENCRYPT
PROD, STAGING, STATUS = tls.lineages(STACK)

# `openssl x509 -noout -nameopt RFC2253 -subject -issuer -serial -startdate -enddate
#  -ext subjectAltName` on real files (OpenSSL 3.0.19).
PEBBLE_X509 = """\
subject=
issuer=CN=Pebble Intermediate CA 424fc8
serial=04142B87BBADCAF5
notBefore=Nov 26 14:26:56 2026 GMT
notAfter=Feb 24 14:26:55 2027 GMT
X509v3 Subject Alternative Name: critical
    DNS:eduaiia.com, DNS:www.eduaiia.com
"""
PLACEHOLDER_X509 = """\
subject=CN=eduaiia.com
issuer=CN=eduaiia.com
serial=7CF06914231368B6C2BCA2BF7E279F89DFFF621C
notBefore=Nov 26 14:21:46 2026 GMT
notAfter=Feb 24 14:21:46 2027 GMT
X509v3 Subject Alternative Name:\x20
    DNS:eduaiia.com, DNS:www.eduaiia.com, DNS:staging.eduaiia.com, DNS:devstatus.eduaiia.com
"""
LETS_ENCRYPT_X509 = """\
subject=CN=staging.eduaiia.com
issuer=CN=R11,O=Let's Encrypt,C=US
serial=03A1
notBefore=Jan  4 08:00:00 2027 GMT
notAfter=Apr  4 07:59:59 2027 GMT
X509v3 Subject Alternative Name:\x20
    DNS:staging.eduaiia.com
"""

# certbot 4.0.0 (Debian 13) against pebble, captured: stdout + stderr.
CHALLENGE_FAILED = """\
Renewing an existing certificate for staging.eduaiia.com

Certbot failed to authenticate some domains (authenticator: webroot). The Certificate \
Authority reported these problems:
  Domain: staging.eduaiia.com
  Type:   connection
  Detail: Get "http://staging.eduaiia.com:80/.well-known/acme-challenge/HKwaFXRw": dial tcp \
172.23.0.250:80: connect: connection refused

Hint: The Certificate Authority failed to download the temporary challenge files created by \
Certbot. Ensure that the listed domains serve their content from the provided --webroot-path/-w \
and that files created there can be downloaded from the internet.


Saving debug log to /etc/letsencrypt/logs/letsencrypt.log
Some challenges have failed.
Ask for help or search for solutions at https://community.letsencrypt.org. See the logfile \
/etc/letsencrypt/logs/letsencrypt.log or re-run Certbot with -v for more details.
"""
UNREACHABLE = """
Saving debug log to /etc/letsencrypt/logs/letsencrypt.log
An unexpected error occurred:
ValueError: Requesting 172.23.0.250/dir: Connection refused
Ask for help or search for solutions at https://community.letsencrypt.org. See the logfile \
/etc/letsencrypt/logs/letsencrypt.log or re-run Certbot with -v for more details.
"""
ACCOUNT_GONE = """\
Saving debug log to /etc/letsencrypt/logs/letsencrypt.log
An unexpected error occurred:
Account https://172.23.0.250:14000/my-account/18f70feafe3ec276 not found.
Ask for help or search for solutions at https://community.letsencrypt.org. See the logfile \
/etc/letsencrypt/logs/letsencrypt.log or re-run Certbot with -v for more details.
"""


def cert(
    days_left: float, domains=("eduaiia.com", "www.eduaiia.com"), issuer="CN=R11"
) -> tls.CertInfo:
    return tls.CertInfo(
        subject="",
        issuer=issuer,
        serial="0A",
        not_before=NOW - dt.timedelta(days=60),
        not_after=NOW + dt.timedelta(days=days_left),
        domains=tuple(domains),
    )


# --- what the stack needs -----------------------------------------------------------------


def test_one_certificate_per_virtual_host_named_by_its_first_domain():
    assert [(lin.name, lin.domains, lin.vhost) for lin in tls.lineages(STACK)] == [
        ("eduaiia.com", ("eduaiia.com", "www.eduaiia.com"), "prod"),
        ("staging.eduaiia.com", ("staging.eduaiia.com",), "staging"),
        ("devstatus.eduaiia.com", ("devstatus.eduaiia.com",), "status"),
    ]
    assert tls.all_domains(STACK) == [
        "eduaiia.com", "www.eduaiia.com", "staging.eduaiia.com", "devstatus.eduaiia.com",
    ]  # fmt: skip


def test_the_certbot_one_off_fits_the_memory_budget_beside_the_stack():
    assert not has_errors(check_budget(STACK))
    reservations = sum((c.memory.reservation.bytes for c in STACK.containers()), 0)
    assert reservations + tls.CERTBOT_MEMORY.bytes <= STACK.machine.available_memory.bytes


# --- openssl output -----------------------------------------------------------------------


def test_parse_pebble_certificate():
    info = tls.parse_x509(PEBBLE_X509)
    assert info.issuer == "CN=Pebble Intermediate CA 424fc8"
    assert info.issuer_name == "Pebble Intermediate CA 424fc8"
    assert info.serial == "04142B87BBADCAF5"
    assert info.not_after == dt.datetime(2027, 2, 24, 14, 26, 55, tzinfo=dt.UTC)
    assert info.not_before == dt.datetime(2026, 11, 26, 14, 26, 56, tzinfo=dt.UTC)
    assert info.domains == ("eduaiia.com", "www.eduaiia.com")
    assert not info.self_signed


def test_parse_placeholder_is_self_signed():
    info = tls.parse_x509(PLACEHOLDER_X509)
    assert info.self_signed
    assert len(info.domains) == 4


def test_parse_lets_encrypt_issuer_and_single_digit_days():
    info = tls.parse_x509(LETS_ENCRYPT_X509)
    assert info.issuer_name == "R11"
    assert tls.dn_field(info.issuer, "O") == "Let's Encrypt"
    assert info.not_before == dt.datetime(2027, 1, 4, 8, 0, tzinfo=dt.UTC)
    assert info.not_after == dt.datetime(2027, 4, 4, 7, 59, 59, tzinfo=dt.UTC)


def test_parse_refuses_output_without_dates():
    with pytest.raises(tls.ParseError, match="lacks notBefore, notAfter"):
        tls.parse_x509("subject=CN=x\nissuer=CN=y\nserial=01\n")


def test_days_left_rounds_down_and_goes_negative_after_expiry():
    assert cert(30.5).days_left(NOW) == 30
    assert cert(0.2).days_left(NOW) == 0
    assert cert(-1.5).days_left(NOW) == -2


def test_serials_compare_as_numbers():
    assert tls.same_serial("04142B87BBADCAF5", "4142B87BBADCAF5")
    assert not tls.same_serial("04142B87BBADCAF5", "4142B87BBADCAF6")
    assert not tls.same_serial(None, "01")


def test_first_pem_of_s_client_output():
    out = "CONNECTED\n---\nServer certificate\n-----BEGIN CERTIFICATE-----\nMIIB\n" \
        "-----END CERTIFICATE-----\nsubject=\n-----BEGIN CERTIFICATE-----\nOTHER\n" \
        "-----END CERTIFICATE-----\n"  # fmt: skip
    assert tls.first_pem(out) == "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n"
    assert tls.first_pem("connect: Connection refused") is None


def test_openssl_commands():
    assert tls.x509_argv("/s/ssl/live/eduaiia.com/fullchain.pem") == [
        "openssl", "x509", "-in", "/s/ssl/live/eduaiia.com/fullchain.pem", "-noout",
        "-nameopt", "RFC2253", "-subject", "-issuer", "-serial", "-startdate", "-enddate",
        "-ext", "subjectAltName",
    ]  # fmt: skip
    assert tls.x509_stdin_argv()[:3] == ["openssl", "x509", "-noout"]
    assert tls.s_client_argv("127.0.0.1", 443, "www.eduaiia.com") == [
        "openssl", "s_client", "-connect", "127.0.0.1:443", "-servername", "www.eduaiia.com",
    ]  # fmt: skip


# --- which certificates are due -------------------------------------------------------------

CASES = [
    # (installed, force, due, reason)
    (tls.Installed(None), False, True, "no certificate"),
    (tls.Installed(cert(80), placeholder=True), False, True, "self-signed placeholder"),
    (tls.Installed(tls.parse_x509(PLACEHOLDER_X509)), False, True, "self-signed placeholder"),
    (tls.Installed(cert(80, ("eduaiia.com",))), False, True, "does not cover www.eduaiia.com"),
    (
        tls.Installed(cert(80), directory=tls.LETS_ENCRYPT_STAGING),
        False,
        True,
        f"issued by another ACME directory ({tls.LETS_ENCRYPT_STAGING})",
    ),
    (tls.Installed(cert(80), directory=LE), False, False, "valid for 80 more days"),
    (tls.Installed(cert(30.01)), False, False, "valid for 30 more days"),
    (tls.Installed(cert(30)), False, True, "expires in 30 days (renewed at 30 days or less)"),
    (tls.Installed(cert(12.5)), False, True, "expires in 12 days (renewed at 30 days or less)"),
    (tls.Installed(cert(-3)), False, True, "expired (renewed at 30 days or less)"),
    (tls.Installed(cert(80)), True, True, "forced (--force); 80 days left"),
]


@pytest.mark.parametrize(("installed", "force", "due", "reason"), CASES)
def test_decide(installed, force, due, reason):
    decision = tls.decide(PROD, installed, NOW, THIRTY_DAYS, LE, force)
    assert (decision.due, decision.reason) == (due, reason)


def test_the_threshold_is_the_stacks_renew_before():
    decision = tls.decide(PROD, tls.Installed(cert(45)), NOW, Duration(60 * 86400), LE)
    assert (decision.due, decision.reason) == (
        True,
        "expires in 45 days (renewed at 60 days or less)",
    )
    assert STACK.tls.acme.renew_before == THIRTY_DAYS


# --- the commands -----------------------------------------------------------------------------

RUN = (
    "docker run --rm --name aiia_certbot --network aiia_network --user 10001:10001 "
    "--memory 67108864 --memory-swap 67108864 --cpus 0.5 "
    "--label org.eduaiia.stack=aiia --label org.eduaiia.one-off=certbot "
    "--cap-drop ALL --security-opt no-new-privileges:true --read-only "
    "--tmpfs /tmp:rw,noexec,nosuid,nodev,size=4096k,mode=1777 "
    "--pids-limit 32 --ulimit nofile=1024:1024"
)


def test_certbot_command_for_lets_encrypt():
    argv = tls.certbot_argv(STACK, "/var/lib/aiia", "aiia/certbot:ctx-1", PROD, LE)
    assert " ".join(argv) == (
        f"{RUN} "
        "--mount type=bind,source=/var/lib/aiia/letsencrypt,target=/etc/letsencrypt "
        "--mount type=bind,source=/var/lib/aiia/acme,target=/var/www/acme "
        "aiia/certbot:ctx-1 certbot certonly --non-interactive --agree-tos --no-eff-email "
        "--email ops@eduaiia.com --server https://acme-v02.api.letsencrypt.org/directory "
        "--config-dir /etc/letsencrypt --work-dir /etc/letsencrypt/work "
        "--logs-dir /etc/letsencrypt/logs --max-log-backups 30 "
        "--webroot --webroot-path /var/www/acme --preferred-challenges http-01 "
        "--key-type ecdsa --elliptic-curve secp256r1 --cert-name eduaiia.com --force-renewal "
        "--domain eduaiia.com --domain www.eduaiia.com"
    )


def test_certbot_trusts_a_private_acme_server_through_a_mounted_bundle():
    argv = tls.certbot_argv(
        STACK, "/s", "img", STAGING, "https://10.0.0.9:14000/dir", "/tmp/pebble/ca.pem"
    )
    text = " ".join(argv)
    assert (
        "--mount type=bind,source=/tmp/pebble/ca.pem,target=/etc/aiia-acme/ca-bundle.pem,readonly "
        "--env REQUESTS_CA_BUNDLE=/etc/aiia-acme/ca-bundle.pem img certbot certonly"
    ) in text
    assert "--server https://10.0.0.9:14000/dir" in text
    assert text.endswith(
        "--cert-name staging.eduaiia.com --force-renewal --domain staging.eduaiia.com"
    )


def test_install_and_rollback_commands():
    argv = tls.install_argv(STACK, "/var/lib/aiia", "img", PROD, LE)
    assert " ".join(argv) == (
        f"{RUN} "
        "--mount type=bind,source=/var/lib/aiia/letsencrypt,target=/etc/letsencrypt,readonly "
        "--mount type=bind,source=/var/lib/aiia/ssl,target=/etc/nginx/ssl "
        "img aiia-install-cert install --ssl-dir /etc/nginx/ssl --name eduaiia.com "
        "--source /etc/letsencrypt/live/eduaiia.com --domains eduaiia.com,www.eduaiia.com "
        f"--directory {LE} --keep 3"
    )
    assert " ".join(tls.rollback_argv(STACK, "/var/lib/aiia", "img", STATUS)) == (
        f"{RUN} --mount type=bind,source=/var/lib/aiia/ssl,target=/etc/nginx/ssl "
        "img aiia-install-cert rollback --ssl-dir /etc/nginx/ssl --name devstatus.eduaiia.com"
    )


# --- certbot's errors ---------------------------------------------------------------------------


def test_error_of_a_failed_challenge_is_the_ca_problem_document():
    assert tls.certbot_error(CHALLENGE_FAILED) == (
        "Domain: staging.eduaiia.com\n"
        "Type:   connection\n"
        'Detail: Get "http://staging.eduaiia.com:80/.well-known/acme-challenge/HKwaFXRw": '
        "dial tcp 172.23.0.250:80: connect: connection refused"
    )


def test_error_of_an_unreachable_server():
    assert tls.certbot_error(UNREACHABLE) == (
        "An unexpected error occurred:\nValueError: Requesting 172.23.0.250/dir: Connection refused"
    )


def test_error_without_a_known_shape_keeps_the_last_lines():
    assert tls.certbot_error("Saving debug log to x\nsomething odd\n") == "something odd"
    assert tls.certbot_error("") == "certbot failed without saying why"


def test_account_unknown_to_the_server_is_recognised():
    assert tls.account_missing(ACCOUNT_GONE)
    assert tls.account_missing('{"type": "urn:ietf:params:acme:error:accountDoesNotExist"}')
    assert not tls.account_missing(UNREACHABLE)
    assert tls.account_dir(LE) == "accounts/acme-v02.api.letsencrypt.org/directory"
    assert tls.account_dir("https://172.23.0.250:14000/dir") == "accounts/172.23.0.250:14000/dir"


# --- status (what the monitor reads) -----------------------------------------------------------


def _answers(served_serial: str = "04142B87BBADCAF5") -> dict:
    pem = "-----BEGIN CERTIFICATE-----\nX\n-----END CERTIFICATE-----"
    return {
        "openssl x509 -in /s/ssl/live/eduaiia.com/": PEBBLE_X509,
        "openssl x509 -in /s/ssl/live/staging.eduaiia.com/": LETS_ENCRYPT_X509,
        "openssl x509 -in /s/ssl/live/devstatus.eduaiia.com/": Result(
            [], 1, "", "Could not open file or uri for loading certificate"
        ),
        "openssl s_client": f"CONNECTED\n{pem}\n",
        "openssl x509 -noout": PEBBLE_X509.replace("04142B87BBADCAF5", served_serial),
    }


class FilesRunner(RecordingRunner):
    def __init__(self, files: dict[str, bytes], **kw):
        super().__init__(**kw)
        self.files = files

    def read_file(self, path):
        return self.files.get(path)


def test_certificate_status_per_domain():
    runner = FilesRunner(
        {"/s/ssl/live/eduaiia.com/meta.json": json.dumps({"directory": LE}).encode()},
        answers=_answers(),
    )
    rows = renewal.certificate_status(STACK, "/s", runner, now=NOW)
    by_domain = {r.domain: r for r in rows}
    assert list(by_domain) == tls.all_domains(STACK)
    www = by_domain["www.eduaiia.com"]
    assert (www.certificate, www.issuer, www.not_after, www.days_left, www.covered) == (
        "eduaiia.com", "Pebble Intermediate CA 424fc8", "2027-02-24T14:26:55Z", 90, True,
    )  # fmt: skip
    assert www.serving_current is True
    assert by_domain["staging.eduaiia.com"].issuer == "R11"
    assert by_domain["staging.eduaiia.com"].serving_current is False  # nginx serves another
    status = by_domain["devstatus.eduaiia.com"]
    assert (status.issuer, status.days_left, status.error) == (None, None, "")
    rendered = tls.status_table_rows(rows)
    assert rendered[0] == ["eduaiia.com", "eduaiia.com", "Pebble Intermediate CA 424fc8",
                           "2027-02-24", 90, "served"]  # fmt: skip
    assert rendered[3] == ["devstatus.eduaiia.com", "devstatus.eduaiia.com", "-", "-", "-",
                           "no certificate"]  # fmt: skip
    assert json.loads(json.dumps(www.as_dict()))["serving_current"] is True


def test_certificate_status_when_nginx_presents_nothing():
    answers = {**_answers(), "openssl s_client": Result([], 1, "", "connect: Connection refused")}
    rows = renewal.certificate_status(STACK, "/s", FilesRunner({}, answers=answers), now=NOW)
    assert all(r.served_serial == "" and r.serving_current is False for r in rows)
    assert tls.status_table_rows(rows)[0][-1] == "nginx presents no certificate"


def test_certificate_status_without_asking_nginx_runs_no_s_client():
    runner = FilesRunner({}, answers=_answers())
    rows = renewal.certificate_status(STACK, "/s", runner, now=NOW, served=False)
    assert all(r.served_serial is None and r.serving_current is None for r in rows)
    assert not any(c[:2] == ["openssl", "s_client"] for c in runner.commands)


def test_placeholder_mark_and_meta_directory_are_read():
    runner = FilesRunner(
        {
            "/s/ssl/live/eduaiia.com/PLACEHOLDER": b"Self-signed placeholder\n",
            "/s/ssl/live/staging.eduaiia.com/meta.json": b'{"directory": "https://x/dir"}',
        },
        answers=_answers(),
    )
    prod = renewal.read_installed(runner, "/s", PROD)
    staging = renewal.read_installed(runner, "/s", STAGING)
    assert (prod.placeholder, prod.directory) == (True, "")
    assert (staging.placeholder, staging.directory) == (False, "https://x/dir")
    assert renewal.read_installed(runner, "/s", STATUS) == tls.Installed(None)


# --- the renewal flow against a fake host (every command recorded, nothing runs) ---------------

STATUS_X509 = """\
subject=
issuer=CN=R11,O=Let's Encrypt,C=US
serial=0B
notBefore=Nov  1 00:00:00 2026 GMT
notAfter=Jan 30 00:00:00 2027 GMT
X509v3 Subject Alternative Name:\x20
    DNS:devstatus.eduaiia.com
"""
INSTALLED = {"serial": "ABC1", "domains": ["eduaiia.com", "www.eduaiia.com"],
             "not_after": "2027-02-24T12:00:00Z", "name": "eduaiia.com"}  # fmt: skip


class FakeHost(Runner):
    """Answers the first rule whose text occurs in the command; records every command.
    File-system commands (the lock, the state directories) and file writes are done for
    real in the test's state dir, so their effects can be checked."""

    LOCAL = ("mkdir", "chmod", "chown", "rm", "ls", "test", "mv")

    def __init__(self, rules: list[tuple[str, Result | str]]):
        super().__init__()
        self.rules = rules
        self.commands: list[str] = []
        self.local = LocalRunner()

    def _execute(self, argv, *, input, env, timeout, stream) -> Result:
        text = quote(argv)
        self.commands.append(text)
        if argv[0] in self.LOCAL:
            return self.local.run(argv, check=False)
        for needle, answer in self.rules:
            if needle in text:
                return answer if isinstance(answer, Result) else Result(argv, 0, answer)
        return Result(argv)

    def write_file(self, path, data, mode=0o644, group=None) -> None:
        self.local.write_file(path, data, mode=mode)

    def read_file(self, path):
        return None

    def ran(self, needle: str) -> list[str]:
        return [c for c in self.commands if needle in c]


def host_rules(prod_x509: str = PLACEHOLDER_X509, certbot: Result | str = "") -> list:
    return [
        ("live/eduaiia.com/fullchain.pem", prod_x509),
        ("live/staging.eduaiia.com/fullchain.pem", LETS_ENCRYPT_X509),
        ("live/devstatus.eduaiia.com/fullchain.pem", STATUS_X509),
        ("docker inspect --format", "true\n"),
        ("certbot certonly", certbot),
        ("aiia-install-cert install", json.dumps(INSTALLED) + "\n"),
        ("openssl s_client", "-----BEGIN CERTIFICATE-----\nX\n-----END CERTIFICATE-----\n"),
        ("openssl x509 -noout", PEBBLE_X509.replace("04142B87BBADCAF5", "ABC1")),
    ]


@pytest.fixture
def flow(tmp_path, monkeypatch):
    monkeypatch.setattr(renewal, "_now", lambda: NOW)
    monkeypatch.delenv("AIIA_SLACK_WEBHOOK_URL", raising=False)
    return StateDir(tmp_path / "state")


def test_renewal_renews_only_what_is_due_then_reloads_once(flow):
    host = FakeHost(host_rules())
    installed = renewal.renew(host, STACK, flow, directory=LE)
    assert list(installed) == ["eduaiia.com"]
    certbot = host.ran("certbot certonly")
    assert len(certbot) == 1 and "--cert-name eduaiia.com" in certbot[0]
    order = [
        next(i for i, c in enumerate(host.commands) if needle in c)
        for needle in ("nginx -t", "certbot certonly", "aiia-install-cert install",
                       "nginx -s reload", "openssl s_client")
    ]  # fmt: skip
    assert order == sorted(order)
    assert len(host.ran("nginx -s reload")) == 1
    assert "eduaiia.com renewed until 2027-02-24" in (flow.root / "audit.log").read_text()
    assert oct((flow.root / "letsencrypt").stat().st_mode & 0o777) == "0o700"


def test_nothing_due_means_no_docker_command_at_all(flow):
    host = FakeHost(host_rules(prod_x509=PEBBLE_X509))  # 90 days left
    assert renewal.renew(host, STACK, flow, directory=LE) == {}
    assert not host.ran("docker")


def test_a_failed_challenge_installs_nothing_reloads_nothing_and_says_what_the_ca_said(flow):
    host = FakeHost(host_rules(certbot=Result([], 1, "", CHALLENGE_FAILED)))
    with pytest.raises(renewal.RenewFailed) as failure:
        renewal.renew(host, STACK, flow, directory=LE)
    message = str(failure.value)
    assert "1 of 1 certificate(s) not renewed; the certificates in place stay" in message
    assert "Type:   connection" in message and "connection refused" in message
    assert not host.ran("aiia-install-cert") and not host.ran("nginx -s reload")
    assert "eduaiia.com FAILED" in (flow.root / "audit.log").read_text()


def test_a_config_nginx_refuses_stops_before_any_acme_traffic(flow):
    rules = [("nginx -t", Result([], 1, "", "nginx: [emerg] unknown directive")), *host_rules()]
    host = FakeHost(rules)
    with pytest.raises(renewal.OpsError, match="nginx -t fails in aiia_nginx before any"):
        renewal.renew(host, STACK, flow, directory=LE)
    assert not host.ran("certbot")


def test_an_account_the_server_forgot_is_set_aside_and_certbot_registers_anew(flow):
    accounts = flow.root / "letsencrypt" / "accounts" / "acme-v02.api.letsencrypt.org"
    (accounts / "directory" / "abc").mkdir(parents=True)
    answers = iter([Result([], 1, "", ACCOUNT_GONE), Result([], 0, "ok", "")])

    class Forgetful(FakeHost):
        def _execute(self, argv, **kw):
            if "certbot certonly" in quote(argv):
                self.commands.append(quote(argv))
                return next(answers)
            return super()._execute(argv, **kw)

    host = Forgetful(host_rules())
    assert list(renewal.renew(host, STACK, flow, directory=LE)) == ["eduaiia.com"]
    assert len(host.ran("certbot certonly")) == 2
    assert [p.name for p in accounts.iterdir()] == ["directory.stale-20261126T120000Z"]


def test_a_second_run_is_refused_while_one_holds_the_lock(flow):
    with (
        renewal.renew_lock(LocalRunner(), flow),
        pytest.raises(renewal.OpsError, match="another ssl-renew"),
        renewal.renew_lock(LocalRunner(), flow),
    ):
        pass


def test_dry_run_reads_the_real_host_and_prints_every_change(flow):
    import io

    host = FakeHost(host_rules())
    printed = io.StringIO()
    runner = PrintingRunner(printed, reader=host)
    lines: list[str] = []
    assert renewal.renew(runner, STACK, flow, directory=LE, out=lines.append) == {}
    # facts from the host: the installed certificates and nginx's config check
    assert host.ran("openssl x509 -in") and host.ran("nginx -t")
    assert not host.ran("certbot certonly") and not host.ran("nginx -s reload")
    assert not host.ran("mkdir")
    text = printed.getvalue()
    assert "certbot certonly" in text and "--cert-name eduaiia.com" in text
    assert "aiia-install-cert install" in text and "nginx -s reload" in text
    assert f"mkdir {flow.root}/locks/renew" in text  # the lock, too, is only printed
    assert lines[-1] == "\ndry run: nothing was requested or changed"
    assert not (flow.root / "audit.log").exists() and not (flow.root / "letsencrypt").exists()


def test_renewal_waits_for_a_deploy_then_gives_up_with_the_reason(flow, monkeypatch):
    from aiia_ops.host import lock

    monkeypatch.setattr(renewal, "DEPLOY_WAIT_SECONDS", 0.2)
    monkeypatch.setattr(renewal, "DEPLOY_POLL_SECONDS", 0.05)
    lines: list[str] = []
    with (
        lock.holding(LocalRunner(), str(flow.root), "deploy-prod", action="deploy"),
        pytest.raises(renewal.OpsError, match="a deploy holds deploy-prod for more than 0 min"),
    ):
        renewal.renew(FakeHost(host_rules()), STACK, flow, directory=LE, out=lines.append)
    assert lines == ["-> waiting for the deploy to finish (deploy-prod) ..."]
    assert not (flow.root / "locks" / "renew").exists()  # released on the way out


def test_certbot_image_and_directories_commands():
    assert tls.build_certbot_argv("/r/services/certbot", "0123456789abcdef") == [
        "docker", "build", "--quiet", "--label", "org.aiia.context-sha256=0123456789abcdef",
        "--tag", "aiia/certbot:ctx-0123456789ab", "--tag", "aiia/certbot:latest",
        "/r/services/certbot",
    ]  # fmt: skip
    assert tls.prepare_dirs_argv("/s", is_root=True) == [
        ["mkdir", "-p", "/s/letsencrypt"],
        ["chown", "-h", "-R", "10001:10001", "/s/letsencrypt"],
        ["chmod", "700", "/s/letsencrypt"],
        ["mkdir", "-p", "/s/acme"],
        ["chown", "-h", "10001:10001", "/s/acme"],
        ["mkdir", "-p", "/s/ssl"],
        ["chown", "-h", "10001:10001", "/s/ssl"],
    ]
    assert ["chown"] not in [a[:1] for a in tls.prepare_dirs_argv("/s", is_root=False)]
