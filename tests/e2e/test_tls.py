"""Issue 6 end to end: certificates from a real ACME server through nginx's port 80.

pebble and pebble-challtestsrv (Debian 13, tests/e2e/pebble.py) run on the stack's own
network; challtestsrv resolves the four names to the nginx container, so pebble validates
http-01 against nginx exactly as Let's Encrypt would. `invoke ssl-renew` runs as people and
cron run it, with a stack file whose only difference is `tls.acme.directory` (pebble's) and
$AIIA_ACME_CA_BUNDLE (pebble's CA). The tests run in order: first issue, nothing due, the
renew_before rule, forced rotation under load, status, the scanner, then the failures
(a failed challenge, the ACME server stopped) last.
"""

from __future__ import annotations

import hashlib
import json
import socket
import ssl
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml

from aiia_ops.commands import tls
from aiia_ops.flows import tls as renewal
from tests.conftest import run_invoke
from tests.e2e.pebble import Pebble

pytestmark = [pytest.mark.docker, pytest.mark.e2e]

PEBBLE_ISSUER = "Pebble Intermediate CA"
VALIDITY_DAYS = 60  # pebble's certificate lifetime: > 30 days, so nothing is due at first
TESTSSL_IMAGE = "aiia/testssl:test"
TESTSSL_DOCKERFILE = """\
FROM aiia/base:trixie
RUN set -eux; apt-get update; apt-get install -y --no-install-recommends testssl.sh; \\
    rm -rf /var/lib/apt/lists/*; testssl --version >/dev/null
"""


# --- fixtures -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pebble(stack_up, stack, tmp_path_factory):
    server = Pebble(stack, tmp_path_factory.mktemp("pebble"), validity_days=VALIDITY_DAYS)
    server.build_image()
    server.make_certificates()
    server.start()
    yield server
    server.remove()


def _stack_file(stack, directory: str, path: Path, **acme) -> Path:
    """The stack under test (AIIA_STACK, or deploy/stack.yml) with other tls.acme values."""
    data = yaml.safe_load(Path(stack.source).read_text())
    data["tls"]["acme"].update(directory=directory, **acme)
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


@pytest.fixture(scope="module")
def acme_env(pebble, stack, e2e_state, tmp_path_factory) -> dict[str, str]:
    path = _stack_file(stack, pebble.directory, tmp_path_factory.mktemp("acme") / "stack.yml")
    return {
        "AIIA_STACK": str(path),
        "AIIA_STATE_DIR": str(e2e_state),
        "AIIA_ACME_CA_BUNDLE": str(pebble.ca_bundle),
    }


@pytest.fixture(scope="module")
def pebble_root(pebble, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("roots") / "pebble-root.pem"
    path.write_text(pebble.root_pem())
    return path


def ssl_renew(env: dict, *args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    return run_invoke("ssl-renew", *args, env=env, timeout=timeout)


# --- what nginx serves, seen from outside ----------------------------------------------------


@dataclass(frozen=True)
class Served:
    issuer: str
    serial: str
    domains: tuple[str, ...]
    verified: bool  # the chain verifies to pebble's root for this host name
    s_client: str


def served(stack, domain: str, root: Path | None = None) -> Served:
    """`openssl s_client` against the published port: what a client gets for `domain`."""
    port = stack.local_host.published(443)
    argv = tls.s_client_argv("127.0.0.1", port, domain)
    if root:
        argv += ["-CAfile", str(root), "-verify_hostname", domain]
    proc = subprocess.run(argv, input="", capture_output=True, text=True, timeout=20)
    pem = tls.first_pem(proc.stdout)
    assert pem, f"no certificate for {domain}: {proc.stdout[-500:]} {proc.stderr[-500:]}"
    x509 = subprocess.run(
        tls.x509_stdin_argv(), input=pem, capture_output=True, text=True, timeout=20
    )
    info = tls.parse_x509(x509.stdout)
    return Served(
        info.issuer_name,
        info.serial,
        info.domains,
        "Verify return code: 0 (ok)" in proc.stdout,
        proc.stdout,
    )


def serials(stack) -> dict[str, str]:
    return {d: served(stack, d).serial for d in tls.all_domains(stack)}


# --- a load generator: a new TLS connection per request --------------------------------------

TARGETS = [
    ("eduaiia.com", "/health/"),
    ("www.eduaiia.com", "/health/"),
    ("staging.eduaiia.com", "/health/"),
    ("devstatus.eduaiia.com", "/"),
]


@dataclass
class Load:
    """Threads that each open a fresh connection per request (a full handshake, so every
    request meets whichever certificate the accepting worker holds), bounded in time and
    count. Records failures (any error or a status other than 200) and, per name, the
    certificates seen in order."""

    port: int
    threads: int = 4
    max_seconds: float = 180
    max_requests: int = 30000
    ok: int = 0
    failures: list[str] = field(default_factory=list)
    seen: dict[str, list[str]] = field(default_factory=dict)

    def __post_init__(self):
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._workers = [
            threading.Thread(target=self._loop, args=(i,)) for i in range(self.threads)
        ]
        self._ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        self._ctx.check_hostname = False
        self._ctx.verify_mode = ssl.CERT_NONE  # the placeholder is self-signed

    def __enter__(self):
        self._deadline = time.monotonic() + self.max_seconds
        for w in self._workers:
            w.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        for w in self._workers:
            w.join(30)

    @property
    def total(self) -> int:
        return self.ok + len(self.failures)

    def _loop(self, offset: int) -> None:
        i = offset
        while not self._stop.is_set() and time.monotonic() < self._deadline:
            if self.total >= self.max_requests:
                return
            host, path = TARGETS[i % len(TARGETS)]
            i += 1
            try:
                fingerprint, status = self._request(host, path)
            except OSError as exc:
                with self._lock:
                    self.failures.append(f"{host}{path}: {exc!r}")
                continue
            with self._lock:
                if status == 200:
                    self.ok += 1
                else:
                    self.failures.append(f"{host}{path}: HTTP {status}")
                seen = self.seen.setdefault(host, [])
                if not seen or seen[-1] != fingerprint:
                    seen.append(fingerprint)

    def _request(self, host: str, path: str) -> tuple[str, int]:
        raw = socket.create_connection(("127.0.0.1", self.port), timeout=10)
        with raw, self._ctx.wrap_socket(raw, server_hostname=host) as conn:
            der = conn.getpeercert(binary_form=True)
            request = f"GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n"
            conn.sendall(request.encode())
            data = b""
            while len(data) < 1_000_000:
                chunk = conn.recv(65536)
                if not chunk:
                    break
                data += chunk
        status_line = data.split(b"\r\n", 1)[0].split()
        status = int(status_line[1]) if len(status_line) > 1 else 0
        return hashlib.sha256(der).hexdigest()[:16], status


def rotated(seen: list[str]) -> bool:
    """Two certificates, the old one first and the new one last. Old and new may alternate
    for a moment: during a graceful reload the old workers accept until they get the
    signal, and the threads record in the order requests finish, not handshakes."""
    return len(set(seen)) == 2 and seen[0] != seen[-1]


def run_under_load(stack, env: dict, *args: str) -> tuple[subprocess.CompletedProcess, Load]:
    with Load(stack.local_host.published(443)) as load:
        time.sleep(2)  # traffic flows before the task starts...
        proc = ssl_renew(env, *args)
        time.sleep(2)  # ...and after it returned
    return proc, load


def _output(proc: subprocess.CompletedProcess) -> str:
    return f"exit {proc.returncode}\n--- stdout\n{proc.stdout}\n--- stderr\n{proc.stderr}"


# --- the tests ----------------------------------------------------------------------------------


def test_first_issue_replaces_the_placeholder_without_downtime(stack, acme_env, pebble_root):
    before = served(stack, "eduaiia.com")
    assert before.issuer == "eduaiia.com", "expected the entrypoint's self-signed placeholder"

    proc, load = run_under_load(stack, acme_env)

    assert proc.returncode == 0, _output(proc)
    assert "3 renewed, 0 failed" in proc.stdout
    assert load.failures == [], f"{len(load.failures)} of {load.total} failed: {load.failures[:5]}"
    assert load.total >= 50, load.total
    for domain in tls.all_domains(stack):
        now = served(stack, domain, root=pebble_root)
        assert now.issuer.startswith(PEBBLE_ISSUER), (domain, now.issuer)
        assert domain in now.domains
        assert now.verified, f"{domain}: chain does not verify to pebble's root\n{now.s_client}"
    # The load saw the placeholder, then the real certificate, and nothing in between failed.
    assert rotated(load.seen["eduaiia.com"]), load.seen


def test_certificates_land_in_nginx_layout_readable_by_nginx_only(stack, pebble, e2e_state):
    ssl_dir = Path(e2e_state) / "ssl"
    for lineage in tls.lineages(stack):
        live = ssl_dir / "live" / lineage.name
        assert live.is_symlink(), f"{live} should be a link swapped in one rename"
        key = live / "privkey.pem"
        assert key.stat().st_uid == 10001
        assert oct(key.stat().st_mode & 0o777) == "0o600"
        meta = json.loads((live / "meta.json").read_text())
        assert meta["directory"] == pebble.directory
        assert meta["domains"] == list(lineage.domains)
    # certbot's own state (account key, its copies of the keys) is not in nginx's mount
    assert oct((Path(e2e_state) / "letsencrypt").stat().st_mode & 0o777) == "0o700"


def test_nothing_due_renews_nothing(stack, acme_env):
    before = serials(stack)
    proc = ssl_renew(acme_env)
    assert proc.returncode == 0, _output(proc)
    assert "nothing to renew" in proc.stdout
    assert f"valid for {VALIDITY_DAYS - 1} more days" in proc.stdout
    assert serials(stack) == before


def test_renews_what_has_renew_before_or_less_left(stack, pebble, acme_env, tmp_path):
    """pebble's certificates have 60 days: with renew_before 61d all are due, no --force."""
    before = serials(stack)
    rule = _stack_file(stack, pebble.directory, tmp_path / "stack.yml", renew_before="61d")
    proc = ssl_renew({**acme_env, "AIIA_STACK": str(rule)})
    assert proc.returncode == 0, _output(proc)
    assert "(renewed at 61 days or less)" in proc.stdout
    after = serials(stack)
    assert all(not tls.same_serial(after[d], before[d]) for d in after), (before, after)


def test_forced_renewal_rotates_every_certificate_under_load(stack, acme_env):
    before = serials(stack)
    started = time.monotonic()
    proc, load = run_under_load(stack, acme_env, "--force")
    took = time.monotonic() - started
    assert proc.returncode == 0, _output(proc)
    after = serials(stack)
    assert all(not tls.same_serial(after[d], before[d]) for d in after), (before, after)
    assert after["eduaiia.com"] == after["www.eduaiia.com"]  # one certificate for both names
    assert load.failures == [], f"{len(load.failures)} of {load.total} failed: {load.failures[:5]}"
    assert all(rotated(load.seen[d]) for d in tls.all_domains(stack)), load.seen
    print(f"\nforced renewal of 3 certificates: {took:.0f}s; load: {load.total} requests, 0 failed")


def test_ssl_status_reports_issuer_expiry_and_days_left_per_domain(stack, acme_env, e2e_state):
    proc = run_invoke("ssl-status", "--json", env=acme_env, check=True)
    rows = {r["domain"]: r for r in json.loads(proc.stdout)}
    assert list(rows) == tls.all_domains(stack)
    for row in rows.values():
        assert row["issuer"].startswith(PEBBLE_ISSUER)
        assert row["days_left"] in (VALIDITY_DAYS - 1, VALIDITY_DAYS)
        assert row["not_after"].endswith("Z")
        assert row["covered"] and not row["placeholder"]
        assert row["serving_current"] is True
    # The library function the monitor calls gives the same data.
    library = renewal.certificate_status(stack, str(e2e_state))
    assert [r.as_dict() for r in library] == list(rows.values())
    table = run_invoke("ssl-status", env=acme_env, check=True).stdout
    assert "devstatus.eduaiia.com" in table and PEBBLE_ISSUER in table


@pytest.fixture(scope="module")
def scan(stack, acme_env, pebble_root, tmp_path_factory) -> dict[str, dict]:
    """testssl.sh (Debian) from a container on the stack network against nginx, with SNI."""
    subprocess.run(
        ["docker", "build", "--quiet", "--tag", TESTSSL_IMAGE, "-"],
        input=TESTSSL_DOCKERFILE, text=True, check=True, capture_output=True, timeout=900,
    )  # fmt: skip
    out = tmp_path_factory.mktemp("testssl")
    out.chmod(0o777)
    (out / "root.pem").write_text(pebble_root.read_text())
    nginx = stack.services.nginx
    proc = subprocess.run(
        ["docker", "run", "--rm", "--network", stack.network.name, "--memory", "128m",
         "--mount", f"type=bind,source={out},target=/out",
         TESTSSL_IMAGE, "testssl", "--quiet", "--color", "0", "--warnings", "off",
         "--nodns", "none", "--ip", str(nginx.address), "--add-ca", "/out/root.pem",
         "--protocols", "--std", "--server-defaults", "--headers", "--cipher-per-proto",
         "--jsonfile", "/out/scan.json", "https://eduaiia.com/health/"],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert (out / "scan.json").exists(), proc.stdout[-3000:] + proc.stderr[-3000:]
    return {f["id"]: f for f in json.loads((out / "scan.json").read_text())}


def test_scanner_finds_only_tls12_and_tls13(scan):
    for old in ("SSLv2", "SSLv3", "TLS1", "TLS1_1"):
        assert scan[old]["finding"] == "not offered", scan[old]
    assert scan["TLS1_2"]["finding"] == "offered"
    assert scan["TLS1_3"]["finding"].startswith("offered")


def test_scanner_finds_no_weak_cipher(scan):
    for weak in ("NULL", "aNULL", "EXPORT", "LOW", "3DES_IDEA"):
        assert scan[f"cipherlist_{weak}"]["finding"] == "not offered", scan[f"cipherlist_{weak}"]
    offered = [f["finding"] for i, f in scan.items() if i.startswith("cipher-")]
    assert offered, "the scanner listed no cipher"
    for line in offered:
        parts = line.split()
        protocol, name, bits = " ".join(parts[:2]), parts[3], int(parts[-2])
        assert protocol in ("TLS 1.2", "TLS 1.3"), line
        assert bits >= 128, line
        assert not any(w in name for w in ("RC4", "DES", "MD5", "NULL", "EXP", "ADH", "AECDH"))


def test_scanner_finds_hsts_for_a_year_and_no_session_tickets(scan):
    assert "31536000" in scan["HSTS_time"]["finding"], scan["HSTS_time"]
    assert scan["TLS_session_ticket"]["finding"].startswith("no"), scan["TLS_session_ticket"]
    assert scan["sessionresumption_ticket"]["finding"] == "not supported"
    assert scan["sessionresumption_ID"]["finding"] == "supported"  # the 10-minute cache
    # with pebble's root added, the chain nginx sends is complete and trusted
    assert scan["cert_chain_of_trust"]["severity"] == "OK", scan["cert_chain_of_trust"]


def test_failed_challenge_keeps_the_certificate_and_says_why(stack, pebble, acme_env):
    before = serials(stack)
    # pebble's DNS now sends staging's challenge to an address where nothing answers on 80
    pebble.point_name_at("staging.eduaiia.com", pebble.pebble_ip)
    try:
        proc, load = run_under_load(stack, acme_env, "--force")
    finally:
        pebble.reset_name("staging.eduaiia.com")
    assert proc.returncode == 1, _output(proc)
    assert "staging.eduaiia.com" in proc.stderr
    assert "Type:   connection" in proc.stderr
    assert "connection refused" in proc.stderr
    assert "the certificates in place stay" in proc.stderr
    after = serials(stack)
    assert tls.same_serial(after["staging.eduaiia.com"], before["staging.eduaiia.com"])
    # the others were renewed and reloaded
    assert not tls.same_serial(after["eduaiia.com"], before["eduaiia.com"])
    assert load.failures == [], load.failures[:5]


def test_acme_server_down_fails_loudly_and_the_old_certificate_stays(stack, pebble, acme_env):
    before = serials(stack)
    pebble.stop_acme_server()
    proc, load = run_under_load(stack, acme_env, "--force")
    assert proc.returncode == 1, _output(proc)
    assert "0 renewed, 3 failed" in proc.stdout
    # certbot's own words: the directory it could not reach, and why
    assert f"Requesting {pebble.pebble_ip}/dir: " in proc.stderr, proc.stderr
    assert any(
        why in proc.stderr for why in ("Connection refused", "No route to host", "timed out")
    )
    assert serials(stack) == before
    assert all(served(stack, d).issuer.startswith(PEBBLE_ISSUER) for d in before)
    assert load.failures == [], load.failures[:5]
    assert load.ok > 0
