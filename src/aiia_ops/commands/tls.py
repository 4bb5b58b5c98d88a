"""TLS certificates: which ones the stack needs, which are due, the commands that renew them,
and the openssl output they are judged by.

Pure: this module builds argv lists and parses text; nothing here runs a command, opens a
socket or reads a file. `flows/tls.py` executes them (`invoke ssl-renew`, `invoke
ssl-status`); its `certificate_status()` is the one entry point that reads the facts, so the
monitor gets the same data as `invoke ssl-status`.

Layout (docs/tls.md):

    <state>/letsencrypt/      certbot's own config dir (account, lineages, archive, logs);
                              mounted only into the certbot one-off, never into nginx
    <state>/acme/             the http-01 webroot: certbot writes, nginx serves (read-only)
    <state>/ssl/              nginx's /etc/nginx/ssl:
      live/<name>             -> ../certs/<name>/<version>  (swapped in one rename)
      certs/<name>/<version>/ fullchain.pem, privkey.pem, meta.json
"""

from __future__ import annotations

import datetime as dt
import re
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import PurePosixPath

from aiia_ops.commands.hardening import run_flags
from aiia_ops.model import Stack
from aiia_ops.model.units import Duration, Size

CERTBOT_FOLDER = "certbot"  # services/certbot
CERTBOT_IMAGE = "aiia/certbot"
# A certbot run peaks near 40 MiB (measured, docs/tls.md); the limit leaves room for the
# key generation and a slow ACME server. It runs once a day for a few seconds, beside the
# stack's reservations (336 MB + 64 MB fits the 448 MB the budget allows), never during a
# deploy (a held deploy lock makes `ssl-renew` wait).
CERTBOT_MEMORY = Size.mb_(64)
CERTBOT_CPUS = 0.5
CERTBOT_UID = 10001  # aiia: the user nginx runs as, so it can read the keys certbot writes
CERTBOT_TIMEOUT = 300.0  # seconds for one certbot run, ACME round trips included
KEEP_VERSIONS = 3

# Inside the certbot one-off.
LE_DIR = "/etc/letsencrypt"
SSL_MOUNT = "/etc/nginx/ssl"
CA_BUNDLE_MOUNT = "/etc/aiia-acme/ca-bundle.pem"
# Host directories under the state dir.
LE_STATE = "letsencrypt"
SSL_STATE = "ssl"
ACME_STATE = "acme"

# A CA bundle that makes certbot trust a private ACME server (pebble in the tests, an
# internal CA); never REQUESTS_CA_BUNDLE itself, which hosts set for their own reasons.
CA_BUNDLE_ENV = "AIIA_ACME_CA_BUNDLE"

LETS_ENCRYPT = "https://acme-v02.api.letsencrypt.org/directory"
LETS_ENCRYPT_STAGING = "https://acme-staging-v02.api.letsencrypt.org/directory"


# --- what the stack needs ----------------------------------------------------------------


@dataclass(frozen=True)
class Lineage:
    """One certificate: nginx reads it from live/<name>/, it must cover `domains`."""

    name: str  # the first domain of the virtual host
    domains: tuple[str, ...]
    vhost: str  # the environment's name, or "status"

    @property
    def live(self) -> str:
        return f"live/{self.name}"


def lineages(stack: Stack) -> list[Lineage]:
    """One per virtual host, in the order nginx's templates name them."""
    out = [Lineage(e.domains[0], tuple(e.domains), e.name) for e in stack.environments.values()]
    out.append(Lineage(stack.status_domain, (stack.status_domain,), "status"))
    return out


def all_domains(stack: Stack) -> list[str]:
    return [d for lineage in lineages(stack) for d in lineage.domains]


# --- certificates as openssl describes them ------------------------------------------------


@dataclass(frozen=True)
class CertInfo:
    subject: str  # RFC 2253: "CN=eduaiia.com"
    issuer: str  # "CN=Pebble Intermediate CA 1a2b3c" / "CN=R11,O=Let's Encrypt,C=US"
    serial: str  # upper-case hex, as openssl prints it
    not_before: dt.datetime
    not_after: dt.datetime
    domains: tuple[str, ...] = ()

    @property
    def self_signed(self) -> bool:
        return self.subject == self.issuer

    @property
    def issuer_name(self) -> str:
        """The issuer's CN, else its O, else the whole DN: what a person reads."""
        for key in ("CN", "O"):
            value = dn_field(self.issuer, key)
            if value:
                return value
        return self.issuer

    def days_left(self, now: dt.datetime) -> int:
        """Whole days until expiry, rounded down (0 on the last day, negative after)."""
        return (self.not_after - now) // dt.timedelta(days=1)


def x509_argv(path: str) -> list[str]:
    """The facts of a PEM certificate (the first one of a chain)."""
    return [
        "openssl", "x509", "-in", path, "-noout", "-nameopt", "RFC2253",
        "-subject", "-issuer", "-serial", "-startdate", "-enddate", "-ext", "subjectAltName",
    ]  # fmt: skip


def x509_stdin_argv() -> list[str]:
    """The same, for a certificate given on stdin."""
    return [a for a in x509_argv("-") if a not in ("-in", "-")]


def s_client_argv(host: str, port: int, servername: str) -> list[str]:
    """The certificate a TLS server presents for a name (stdin closed: it exits after)."""
    return ["openssl", "s_client", "-connect", f"{host}:{port}", "-servername", servername]


_OPENSSL_DATE = "%b %d %H:%M:%S %Y GMT"


def parse_openssl_date(text: str) -> dt.datetime:
    """`Feb  4 14:21:46 2027 GMT` -> an aware UTC datetime."""
    return dt.datetime.strptime(" ".join(text.split()), _OPENSSL_DATE).replace(tzinfo=dt.UTC)


def dn_field(dn: str, key: str) -> str:
    """One attribute of an RFC 2253 DN (`CN=R11,O=Let's Encrypt,C=US`, key O)."""
    for part in re.split(r"(?<!\\),", dn):
        k, sep, v = part.partition("=")
        if sep and k.strip().upper() == key.upper():
            return v.strip().replace("\\,", ",")
    return ""


class ParseError(ValueError):
    pass


_X509_KEYS = ("subject", "issuer", "serial", "notBefore", "notAfter")


def parse_x509(text: str) -> CertInfo:
    """Parse the output of `x509_argv` (OpenSSL 1.1.1 and 3.x)."""
    values: dict[str, str] = {}
    lines = text.splitlines()
    domains: list[str] = []
    for i, line in enumerate(lines):
        key, sep, value = line.partition("=")
        if sep and key in _X509_KEYS:
            values[key] = value.strip()
        elif line.strip().startswith("X509v3 Subject Alternative Name"):
            following = lines[i + 1] if i + 1 < len(lines) else ""
            domains = [
                item.strip()[4:] for item in following.split(",") if item.strip().startswith("DNS:")
            ]
    missing = [k for k in _X509_KEYS if k not in values]
    if missing:
        raise ParseError(f"openssl x509 output lacks {', '.join(missing)}")
    return CertInfo(
        subject=values["subject"],
        issuer=values["issuer"],
        serial=values["serial"].upper(),
        not_before=parse_openssl_date(values["notBefore"]),
        not_after=parse_openssl_date(values["notAfter"]),
        domains=tuple(domains),
    )


def same_serial(a: str | None, b: str | None) -> bool:
    """Serials compared as numbers: openssl pads to whole bytes, Python's hex does not."""
    if not a or not b:
        return False
    try:
        return int(a, 16) == int(b, 16)
    except ValueError:
        return False


_PEM = re.compile(r"-----BEGIN CERTIFICATE-----.+?-----END CERTIFICATE-----", re.S)


def first_pem(text: str) -> str | None:
    """The first PEM certificate in `openssl s_client` output (the server's own)."""
    match = _PEM.search(text)
    return match.group(0) + "\n" if match else None


# --- which certificates are due ------------------------------------------------------------


@dataclass(frozen=True)
class Installed:
    """What is in live/<name>/ on the host."""

    cert: CertInfo | None  # None: no certificate (or unreadable)
    placeholder: bool = False  # the nginx entrypoint's self-signed stand-in
    directory: str = ""  # the ACME directory it came from (meta.json), "" if unknown
    error: str = ""  # why `cert` could not be read


@dataclass(frozen=True)
class Decision:
    lineage: Lineage
    due: bool
    reason: str
    installed: Installed = field(default_factory=lambda: Installed(None))


def decide(
    lineage: Lineage,
    installed: Installed,
    now: dt.datetime,
    renew_before: Duration,
    directory: str,
    force: bool = False,
) -> Decision:
    """Due: forced, missing, a placeholder, lacking a name, from another ACME directory,
    or `renew_before` (30 days) or less from expiry."""

    def due(reason: str) -> Decision:
        return Decision(lineage, True, reason, installed)

    cert = installed.cert
    if cert is None:
        return due(f"no certificate ({installed.error})" if installed.error else "no certificate")
    if installed.placeholder or cert.self_signed:
        return due("self-signed placeholder")
    missing = [d for d in lineage.domains if d not in cert.domains]
    if missing:
        return due(f"does not cover {', '.join(missing)}")
    if installed.directory and installed.directory != directory:
        return due(f"issued by another ACME directory ({installed.directory})")
    days = cert.days_left(now)
    left = cert.not_after - now
    if force:
        return due(f"forced (--force); {days} days left")
    threshold = renew_before.seconds / 86400
    if left <= dt.timedelta(seconds=renew_before.seconds):
        when = "expired" if left.total_seconds() <= 0 else f"expires in {days} days"
        return due(f"{when} (renewed at {threshold:g} days or less)")
    return Decision(lineage, False, f"valid for {days} more days", installed)


# --- the commands --------------------------------------------------------------------------


def certbot_image(tag: str) -> str:
    return f"{CERTBOT_IMAGE}:{tag}"


def container_name(stack: Stack) -> str:
    return f"{stack.project}_certbot"


def _one_off(stack: Stack, state_root: str, mounts: Iterable[tuple[str, str, bool]]) -> list[str]:
    """`docker run` of the certbot image: as UID 10001, on the stack's network (the ACME
    server is reached through it), with a hard memory and CPU limit."""
    argv = [
        "docker", "run", "--rm", "--name", container_name(stack),
        "--network", stack.network.name,
        "--user", f"{CERTBOT_UID}:{CERTBOT_UID}",
        "--memory", str(CERTBOT_MEMORY.bytes), "--memory-swap", str(CERTBOT_MEMORY.bytes),
        "--cpus", f"{CERTBOT_CPUS:g}",
        "--label", f"org.eduaiia.stack={stack.project}",
        "--label", "org.eduaiia.one-off=certbot",
        *run_flags("certbot"),  # cap_drop ALL, no-new-privileges, read-only root
    ]  # fmt: skip
    for source, target, read_only in mounts:
        spec = f"type=bind,source={source},target={target}"
        argv += ["--mount", spec + (",readonly" if read_only else "")]
    return argv


def certbot_argv(
    stack: Stack,
    state_root: str,
    image: str,
    lineage: Lineage,
    directory: str,
    ca_bundle: str | None = None,
) -> list[str]:
    """Obtain (or replace) one lineage with http-01 through the webroot nginx serves.

    Always `--force-renewal`: whether a certificate is due was decided here (`decide`),
    not by certbot's own rule. Non-interactive: safe for cron."""
    state = PurePosixPath(state_root)
    webroot = stack.tls.acme.webroot
    mounts = [(str(state / LE_STATE), LE_DIR, False), (str(state / ACME_STATE), webroot, False)]
    if ca_bundle:
        mounts.append((ca_bundle, CA_BUNDLE_MOUNT, True))
    argv = _one_off(stack, state_root, mounts)
    if ca_bundle:
        argv += ["--env", f"REQUESTS_CA_BUNDLE={CA_BUNDLE_MOUNT}"]
    argv += [
        image, "certbot", "certonly",
        "--non-interactive", "--agree-tos", "--no-eff-email",
        "--email", stack.tls.acme.email,
        "--server", directory,
        "--config-dir", LE_DIR,
        "--work-dir", f"{LE_DIR}/work",
        "--logs-dir", f"{LE_DIR}/logs",
        "--max-log-backups", "30",
        "--webroot", "--webroot-path", webroot,
        "--preferred-challenges", "http-01",
        "--key-type", "ecdsa", "--elliptic-curve", "secp256r1",
        "--cert-name", lineage.name,
        "--force-renewal",
    ]  # fmt: skip
    for domain in lineage.domains:
        argv += ["--domain", domain]
    return argv


def install_argv(
    stack: Stack, state_root: str, image: str, lineage: Lineage, directory: str
) -> list[str]:
    """Copy certbot's new pair into nginx's layout and swap live/<name> atomically."""
    state = PurePosixPath(state_root)
    mounts = [(str(state / LE_STATE), LE_DIR, True), (str(state / SSL_STATE), SSL_MOUNT, False)]
    return [
        *_one_off(stack, state_root, mounts),
        image, "aiia-install-cert", "install",
        "--ssl-dir", SSL_MOUNT,
        "--name", lineage.name,
        "--source", f"{LE_DIR}/live/{lineage.name}",
        "--domains", ",".join(lineage.domains),
        "--directory", directory,
        "--keep", str(KEEP_VERSIONS),
    ]  # fmt: skip


def rollback_argv(stack: Stack, state_root: str, image: str, lineage: Lineage) -> list[str]:
    state = PurePosixPath(state_root)
    mounts = [(str(state / SSL_STATE), SSL_MOUNT, False)]
    return [
        *_one_off(stack, state_root, mounts),
        image, "aiia-install-cert", "rollback", "--ssl-dir", SSL_MOUNT, "--name", lineage.name,
    ]  # fmt: skip


def certbot_error(output: str) -> str:
    """The part of certbot's output that says what went wrong: the ACME server's problem
    documents when it sent any, else the error certbot reports (connection refused ...)."""
    lines = [line.rstrip() for line in output.splitlines()]
    for start, line in enumerate(lines):
        if "The Certificate Authority reported these problems" in line:
            block = []
            for follow in lines[start + 1 :]:
                if follow.startswith("Hint:") or (block and not follow.strip()):
                    break
                if follow.strip():
                    block.append(follow.strip())
            return "\n".join(block) or line
    for start, line in enumerate(lines):
        if line.startswith(("An unexpected error occurred", "Error ", "Error:")):
            block = [line.strip()]
            for follow in lines[start + 1 :]:
                if not follow.strip() or follow.startswith(("Ask for help", "See the logfile")):
                    break
                block.append(follow.strip())
            return "\n".join(block)
    noise = ("Saving debug log", "Ask for help", "See the logfile", "Requesting a certificate")
    useful = [x.strip() for x in lines if x.strip() and not x.startswith(noise)]
    return "\n".join(useful[-8:]) or "certbot failed without saying why"


def account_missing(output: str) -> bool:
    """The ACME server no longer knows certbot's stored account (a test server restarted,
    an account deactivated): the local account must go before certbot registers anew."""
    return "accountDoesNotExist" in output or bool(
        re.search(r"Account \S+ (not found|does not exist)", output)
    )


def account_dir(directory: str) -> str:
    """Where certbot keeps its account for an ACME directory, under its config dir:
    accounts/<host[:port]><path> of the directory URL (query and fragment dropped)."""
    rest = directory.split("://", 1)[-1].split("#", 1)[0].split("?", 1)[0]
    netloc, slash, path = rest.partition("/")
    return f"accounts/{netloc}{slash}{path}"


# --- status, for people and for the monitor ------------------------------------------------


@dataclass(frozen=True)
class DomainStatus:
    """One name: the certificate nginx is configured with for it (and what it serves)."""

    domain: str
    certificate: str  # the lineage name (live/<name>)
    issuer: str | None
    not_after: str | None  # ISO 8601 UTC
    days_left: int | None
    serial: str | None
    placeholder: bool
    covered: bool  # the certificate's names include the domain
    # The serial nginx presented for this name; "" when it presented none (not running, the
    # handshake refused), None when it was not asked.
    served_serial: str | None = None
    error: str = ""

    @property
    def serving_current(self) -> bool | None:
        if self.served_serial is None:
            return None
        return same_serial(self.served_serial, self.serial)

    def as_dict(self) -> dict:
        return {**asdict(self), "serving_current": self.serving_current}


def domain_statuses(
    stack: Stack,
    installed: dict[str, Installed],
    now: dt.datetime,
    served: dict[str, str | None] | None = None,
) -> list[DomainStatus]:
    """Per domain, from what is installed per lineage (and, optionally, served per domain)."""
    rows = []
    for lineage in lineages(stack):
        inst = installed.get(lineage.name, Installed(None))
        cert = inst.cert
        for domain in lineage.domains:
            rows.append(
                DomainStatus(
                    domain=domain,
                    certificate=lineage.name,
                    issuer=cert.issuer_name if cert else None,
                    not_after=cert.not_after.strftime("%Y-%m-%dT%H:%M:%SZ") if cert else None,
                    days_left=cert.days_left(now) if cert else None,
                    serial=cert.serial if cert else None,
                    placeholder=bool(cert and (inst.placeholder or cert.self_signed)),
                    covered=bool(cert and domain in cert.domains),
                    served_serial=(served or {}).get(domain),
                    error=inst.error,
                )
            )
    return rows


def status_table_rows(rows: list[DomainStatus]) -> list[list[object]]:
    out = []
    for r in rows:
        if r.issuer is None:
            out.append([r.domain, r.certificate, "-", "-", "-", r.error or "no certificate"])
            continue
        notes = []
        if r.placeholder:
            notes.append("self-signed placeholder")
        if not r.covered:
            notes.append("does not cover this name")
        if r.served_serial == "":
            notes.append("nginx presents no certificate")
        elif r.serving_current is False:
            notes.append(f"nginx serves another certificate (serial {r.served_serial})")
        elif r.serving_current:
            notes.append("served")
        out.append(
            [r.domain, r.certificate, r.issuer, r.not_after[:10], r.days_left, ", ".join(notes)]
        )
    return out


STATUS_HEADERS = ["domain", "certificate", "issuer", "expires", "days left", "notes"]


def connect_host(stack: Stack) -> str:
    """Where this machine reaches nginx's published ports."""
    address = str(stack.local_host.publish_address)
    return "127.0.0.1" if address == "0.0.0.0" else address


# --- the certbot image and the host directories it writes ----------------------------------

CONTEXT_LABEL = "org.aiia.context-sha256"


def certbot_image_tag(context_sha: str) -> str:
    """Tagged by its build context: rebuilt only when services/certbot changes."""
    return f"ctx-{context_sha[:12]}"


def build_certbot_argv(context: str, context_sha: str) -> list[str]:
    return [
        "docker", "build", "--quiet",
        "--label", f"{CONTEXT_LABEL}={context_sha}",
        "--tag", certbot_image(certbot_image_tag(context_sha)), "--tag", certbot_image("latest"),
        context,
    ]  # fmt: skip


def remove_one_off_argv(stack: Stack) -> list[str]:
    """The certbot one-off's container, left over by a run killed mid-way."""
    return ["docker", "rm", "--force", container_name(stack)]


def prepare_dirs_argv(state_root: str, is_root: bool) -> list[list[str]]:
    """certbot (UID 10001 in its container) writes its config dir, the webroot and nginx's
    ssl dir; its own config dir (account key, private keys) is private."""
    state = PurePosixPath(state_root)
    owner = f"{CERTBOT_UID}:{CERTBOT_UID}"
    out: list[list[str]] = []
    for rel in (LE_STATE, ACME_STATE, SSL_STATE):
        path = str(state / rel)
        out.append(["mkdir", "-p", path])
        if is_root:
            out.append(["chown", "-h", *(["-R"] if rel == LE_STATE else []), owner, path])
        if rel == LE_STATE:
            out.append(["chmod", "700", path])
    return out
