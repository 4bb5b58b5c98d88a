"""pgBackRest as data: its config, PostgreSQL's archive settings, argv, and reading `info`.

Pure: nothing here runs a program. flows/pitr.py runs these argv in the PostgreSQL
container (`docker exec`) or in a one-off container of the same image on the same volume.

Secrets never appear in the config file: pgBackRest reads the cipher key and the S3 keys
from PGBACKREST_REPO1_* environment variables, which the PostgreSQL container gets from its
0600 env file (commands/compose.py env_files) and archive_command inherits.
"""

from __future__ import annotations

import base64
import json
import re
from dataclasses import dataclass
from datetime import UTC, datetime

from aiia_ops.errors import OpsError
from aiia_ops.model import Stack
from aiia_ops.model.secrets import Secrets
from aiia_ops.model.types import Pitr

# In the PostgreSQL container: the rendered postgresql/ dir is mounted at /etc/aiia.
CONFIG = "/etc/aiia/pgbackrest.conf"
CA_FILE = "/etc/aiia/pgbackrest-ca.pem"  # repo1.ca, rendered beside the config
CA_ENV = "AIIA_STORE_CA_B64"  # the same, one line, in the env file
PGDATA = "/var/lib/postgresql/data"
SOCKET = "/var/run/postgresql"
SPOOL = "/tmp/pgbackrest-spool"  # async archive-push status files only: safe to lose
LOCK = "/tmp/pgbackrest"
CIPHER = "aes-256-cbc"

BACKUP_TYPES = ("full", "diff", "incr")


def pitr_of(stack: Stack) -> Pitr | None:
    """The stack's archiving policy when it is switched on, else None."""
    pitr = stack.backups.pitr
    return pitr if pitr is not None and pitr.enabled else None


def require(stack: Stack) -> Pitr:
    pitr = pitr_of(stack)
    if pitr is None:
        raise OpsError(
            "point-in-time recovery is off in this stack: set backups.pitr.enabled: true and "
            "backups.pitr.repo1 (an S3 store on another host), then `invoke deploy`"
        )
    return pitr


def postgres_settings(stack: Stack) -> dict[str, str]:
    """Lines for postgresql.conf: archiving on with pgBackRest, or off (no WAL kept)."""
    pitr = pitr_of(stack)
    if pitr is None:
        # archive_mode=on with no working command would keep every WAL segment forever.
        return {"archive_mode": "off"}
    return {
        "archive_mode": "on",
        "archive_command": f"'pgbackrest --config={CONFIG} --stanza={pitr.stanza} archive-push %p'",
        "archive_timeout": f"{int(pitr.archive_timeout.seconds)}s",
        "wal_level": "replica",
    }


def conf_text(stack: Stack) -> str:
    """pgbackrest.conf (no secrets in it)."""
    pitr = require(stack)
    r = pitr.repo1
    pg = stack.services.postgresql
    lines = [
        "# pgBackRest for the stack: rendered from deploy/stack.yml backups.pitr; do not edit.",
        "# Keys (cipher, S3) come from PGBACKREST_REPO1_* in the container's 0600 env file.",
        "[global]",
        "repo1-type=s3",
        f"repo1-s3-endpoint={r.endpoint}",
        f"repo1-storage-port={r.port}",
        f"repo1-s3-bucket={r.bucket}",
        f"repo1-s3-region={r.region}",
        f"repo1-s3-uri-style={r.uri_style}",
        f"repo1-path={r.path}",
        f"repo1-storage-verify-tls={'y' if r.verify_tls else 'n'}",
        *([f"repo1-storage-ca-file={CA_FILE}"] if r.ca else []),
        f"repo1-cipher-type={CIPHER}",
        f"repo1-retention-full={r.retention_full}",
        f"repo1-retention-diff={r.retention_diff}",
        # Small files bundled into few objects; block-level incrementals.
        "repo1-bundle=y",
        "repo1-block=y",
        "compress-type=zst",
        # One core is PostgreSQL's whole CPU limit.
        "process-max=1",
        # 64 KiB instead of 1 MiB buffers: a 1 GB full backup beside a draining archive
        # backlog peaked at 32-38 MB PSS instead of 48-52 MB, no slower (docs/backups-offsite.md).
        "buffer-size=64KiB",
        "start-fast=y",
        # archive-push returns at once and a background process sends: a slow store does
        # not hold PostgreSQL's archiver; a stopped one leaves WAL in pg_wal until it is back.
        "archive-async=y",
        f"spool-path={SPOOL}",
        f"lock-path={LOCK}",
        "log-level-console=warn",
        "log-level-stderr=warn",
        "log-level-file=off",
        "",
        f"[{pitr.stanza}]",
        f"pg1-path={PGDATA}",
        f"pg1-socket-path={SOCKET}",
        f"pg1-port={pg.port}",
        f"pg1-user={pg.settings.superuser}",
        "",
    ]
    return "\n".join(lines)


def config_files(stack: Stack) -> dict[str, str]:
    """What pgBackRest reads from /etc/aiia: its config, and the store's CA when the stack
    names one (no secrets in either)."""
    r = require(stack).repo1
    files = {CONFIG.rsplit("/", 1)[1]: conf_text(stack)}
    if r.ca:
        files[CA_FILE.rsplit("/", 1)[1]] = r.ca.strip() + "\n"
    return files


def env(stack: Stack, secrets: Secrets) -> dict[str, str]:
    """The secret environment pgBackRest needs (empty when archiving is off)."""
    if (pitr := pitr_of(stack)) is None:
        return {}
    out = {
        "PGBACKREST_REPO1_CIPHER_PASS": secrets.pgbackrest_cipher_pass,
        "PGBACKREST_REPO1_S3_KEY": secrets.offsite_s3_key,
        "PGBACKREST_REPO1_S3_KEY_SECRET": secrets.offsite_s3_secret,
    }
    if pitr.repo1.ca:  # for restic's one-off containers, which get this file and no configs
        out[CA_ENV] = base64.b64encode(pitr.repo1.ca.encode()).decode()
    return out


# --- argv (run inside the PostgreSQL image) ------------------------------------------------


def _base(stack: Stack) -> list[str]:
    return ["pgbackrest", f"--config={CONFIG}", f"--stanza={require(stack).stanza}"]


def stanza_create(stack: Stack) -> list[str]:
    return [*_base(stack), "stanza-create"]


def check(stack: Stack) -> list[str]:
    return [*_base(stack), "check"]


def backup(stack: Stack, kind: str) -> list[str]:
    if kind not in BACKUP_TYPES:
        raise OpsError(
            f"unknown base backup type {kind!r}; expected one of: {', '.join(BACKUP_TYPES)}"
        )
    return [*_base(stack), "backup", f"--type={kind}"]


def info(stack: Stack, io_timeout: int | None = None) -> list[str]:
    """`io_timeout`: seconds per try against the store (pgBackRest's default 60 s makes an
    unreachable store take minutes of retries; the monitor's read must not)."""
    extra = [] if io_timeout is None else [f"--io-timeout={io_timeout}"]
    return [*_base(stack), *extra, "info", "--output=json"]


def repo_ls(stack: Stack) -> list[str]:
    """Every object of the repository with its size (a fingerprint: "nothing changed")."""
    return [*_base(stack), "repo-ls", "--recurse", "--output=json"]


def error_line(output: str) -> str:
    """pgBackRest's error in one printable line: its `ERROR: [code]: ...` line (the first),
    with the next line when that one only names a cause below (`... retries: [500] ...`);
    else the last line. Binary bytes (an undecryptable file's) are dropped."""
    lines = ["".join(ch for ch in ln if ch.isprintable()).strip() for ln in output.splitlines()]
    lines = [ln for ln in lines if ln]
    for i, ln in enumerate(lines):
        if "ERROR:" in ln:
            text = ln[ln.index("ERROR:") :]
            nxt = lines[i + 1] if i + 1 < len(lines) else ""
            if nxt and not nxt.startswith("HINT") and "ERROR:" not in nxt:
                text += f" {nxt}"
            return text
    return lines[-1] if lines else ""


def explain(message: str, pitr: Pitr) -> str:
    """pgBackRest's last error line, with what it most likely means for this repository."""
    low = message.lower()
    store = f"the off-site store at {pitr.repo1.endpoint}:{pitr.repo1.port}"
    unreadable_info = "formaterror" in low and "info file" in low  # garbage once decrypted
    if "certificate" in low:  # a TLS CryptoError: not the repository's key
        hint = (
            f"TLS to {store} failed: its certificate is not trusted here. A store signed by a "
            "CA of your own needs that CA's PEM in backups.pitr.repo1.ca, then `invoke "
            "config.render`; a public store's certificate must name the endpoint"
        )
    elif "cipher" in low or "decrypt" in low or "crypto" in low or unreadable_info:
        hint = (
            "the repository cannot be read with this key: PGBACKREST_CIPHER_PASS (state "
            "secrets/shared.env) must be the key the repository was made with; put back the "
            "one from the operator's export"
        )
    elif re.search(r"\b(500|503|507)\b", message) or "no space" in low or "insufficient" in low:
        hint = f"{store} refused the write: is its disk full? Free space there and run again"
    elif "[082]" in message or "was not archived before" in low:
        hint = (
            f"WAL does not reach {store}: it is unreachable or refuses writes (is its disk "
            "full?); `invoke backup.list` shows the archive lag"
        )
    elif "[087]" in message or "archive_mode" in low or "archive_command" in low:
        hint = (
            "PostgreSQL is not archiving with pgBackRest: `invoke deploy` to restart it "
            "with backups.pitr's settings"
        )
    elif "[057]" in message or "unable to execute query" in low:
        # seen on a 1 GB full backup: the kernel's OOM killer took a PostgreSQL backend
        # inside the container's limit, and "server closed the connection" is not the store
        hint = (
            "pgBackRest lost its connection to PostgreSQL (did the container hit its memory "
            "limit? `dmesg` names OOM kills; backups.pitr.memory is pgBackRest's share of it)"
        )
    elif "403" in message or "signature" in low or "access denied" in low:
        hint = f"{store} refused the keys: check OFFSITE_S3_KEY / OFFSITE_S3_SECRET"
    elif "connect" in low or "timeout" in low or "resolve" in low:
        hint = f"{store} is unreachable: is it running, and is the network up?"
    else:
        return message
    return f"{hint} (pgBackRest: {message})"


def restore(stack: Stack, target: datetime | None) -> list[str]:
    """Restore the cluster into PGDATA (run with PostgreSQL stopped): to `target` or the end.

    --delta keeps files that already match; the target is the last commit at or before it
    (inclusive); at the target PostgreSQL promotes and takes a new timeline."""
    # restore_command written explicitly: with the project's config path (pgBackRest's own
    # default names /etc/pgbackrest/pgbackrest.conf, which the image does not have).
    get = f'pgbackrest --config={CONFIG} --stanza={require(stack).stanza} archive-get %f "%p"'
    argv = [*_base(stack), "restore", "--delta", "--log-level-console=info",
            f"--recovery-option=restore_command={get}"]  # fmt: skip
    if target is None:
        return [*argv, "--type=default"]
    when = target.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S.%f+00")
    return [*argv, "--type=time", f"--target={when}", "--target-action=promote"]


def backup_kind_for(weekday: int, pitr: Pitr) -> str:
    """Full on the stack's weekday (0 = Monday), differential on the others."""
    days = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")
    return "full" if days[weekday] == pitr.full_weekday else "diff"


# --- reading `pgbackrest info --output=json` --------------------------------------------


@dataclass(frozen=True)
class BaseBackup:
    label: str
    kind: str
    started: datetime
    stopped: datetime
    size: int  # bytes in the repository


@dataclass(frozen=True)
class Window:
    """What a repository can restore to: from the oldest backup's end to the newest WAL."""

    stanza: str
    status: str  # "ok" or pgBackRest's message
    backups: tuple[BaseBackup, ...]
    archive_min: str  # oldest and newest WAL segment names kept
    archive_max: str

    @property
    def oldest(self) -> datetime | None:
        return self.backups[0].stopped if self.backups else None

    @property
    def newest_backup(self) -> BaseBackup | None:
        return self.backups[-1] if self.backups else None


def _ts(value: int) -> datetime:
    return datetime.fromtimestamp(int(value), UTC)


def parse_info(text: str, stanza: str) -> Window:
    try:
        # strict=False: a wrong key's garbage reaches the repo status message as raw control
        # characters inside a JSON string (seen: "Invalid control character at ...").
        data = json.loads(text, strict=False)
    except json.JSONDecodeError as e:
        raise OpsError(f"pgbackrest info printed no JSON ({e}); run it by hand to see why") from e
    for entry in data if isinstance(data, list) else []:
        if entry.get("name") != stanza:
            continue
        status = entry.get("status", {})
        message = "ok" if status.get("code") == 0 else status.get("message", "unknown")
        if message == "other":  # the cause is the repository's own status
            repos = [r.get("status", {}).get("message", "") for r in entry.get("repo", [])]
            firsts = ["".join(c for c in m.splitlines()[0] if c.isprintable()) for m in repos if m]
            message = firsts[0] if firsts else message
        backups = tuple(
            BaseBackup(
                b["label"],
                b["type"],
                _ts(b["timestamp"]["start"]),
                _ts(b["timestamp"]["stop"]),
                int(b.get("info", {}).get("repository", {}).get("delta", 0)),
            )
            for b in entry.get("backup", [])
        )
        mins = [a.get("min") for a in entry.get("archive", []) if a.get("min")]
        maxs = [a.get("max") for a in entry.get("archive", []) if a.get("max")]
        return Window(stanza, message, backups, min(mins, default=""), max(maxs, default=""))
    raise OpsError(f"the repository holds no stanza {stanza!r}: run `invoke backup.pitr-init`")


_TARGET = re.compile(r"\d{4}-\d\d-\d\d[ T]\d\d:\d\d(:\d\d(\.\d{1,6})?)?(Z|[+-]\d\d(:?\d\d)?)?")


def parse_target(text: str) -> datetime | None:
    """`latest` -> None; an ISO timestamp (UTC unless it names an offset) -> aware datetime."""
    value = text.strip()
    if value == "latest":
        return None
    if not _TARGET.fullmatch(value):
        raise OpsError(
            f"--to {text!r} is not a moment; give 'latest' or an ISO time such as "
            "'2026-12-02 01:30:00' (UTC) or '2026-12-02T01:30:00+01:00'"
        )
    try:
        when = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError as exc:
        raise OpsError(
            f"--to {text!r} is not a moment: {exc}; give 'latest' or an ISO time"
        ) from None
    return when if when.tzinfo else when.replace(tzinfo=UTC)


def check_target(target: datetime | None, window: Window, newest: datetime) -> None:
    """Refuse a moment the repository cannot reach: before the oldest backup ended or after
    the newest archived moment (`newest`: the last archived WAL's time)."""
    if window.oldest is None:
        raise OpsError(
            "the repository has no base backup yet: nothing to restore; "
            "run `invoke backup.pitr-backup --kind full` first"
        )
    if target is None:
        return
    if target < window.oldest or target > newest:
        raise OpsError(
            f"{target:%Y-%m-%d %H:%M:%S} UTC is outside the recoverable window "
            f"{window.oldest:%Y-%m-%d %H:%M:%S} .. {newest:%Y-%m-%d %H:%M:%S} UTC; "
            "pick a moment inside it (`invoke backup.list` shows it)"
        )


# --- docker argv for flows/pitr.py -------------------------------------------------------


def in_container(container: str, argv: list[str], stdin: bool = False) -> list[str]:
    return ["docker", "exec", *(["-i"] if stdin else []), container, *argv]


def inspect(container: str, fmt: str) -> list[str]:
    return ["docker", "inspect", "-f", fmt, container]


def remove_container(name: str) -> list[str]:
    return ["docker", "rm", "-f", name]


def create_volume(name: str) -> list[str]:
    return ["docker", "volume", "create", name]


def remove_volume(name: str) -> list[str]:
    return ["docker", "volume", "rm", "-f", name]


def logs(container: str, tail: int = 5) -> list[str]:
    return ["docker", "logs", "--tail", str(tail), container]


def scratch_options(volume: str, config_dir: str, env_file: str) -> list[str]:
    """A one-off container of the PostgreSQL image on `volume`, with the rendered config and
    the 0600 env file (the repository's keys) of the live one. The default bridge reaches
    the off-site store (Docker masquerades outbound traffic); nothing is published."""
    data = [] if volume is None else ["-v", f"{volume}:{PGDATA}"]
    return ["--env-file", env_file, "--user", "10001:10001", "--network", "bridge",
            *data, "-v", f"{config_dir}:/etc/aiia:ro"]  # fmt: skip


def one_off(image: str, options: list[str], argv: list[str]) -> list[str]:
    return ["docker", "run", "--rm", *options, image, *argv]


def restore_into_volume(stack: Stack, image: str, options: list[str], target) -> list[str]:
    return one_off(image, options, restore(stack, target))


def scratch_server(name: str, image: str, options: list[str], shared_buffers: str) -> list[str]:
    """PostgreSQL on the restored volume: archiving off (it must never write to the
    repository: it would add a timeline), small shared_buffers. max_connections stays the
    live server's: recovery refuses a lower value than the primary had."""
    return ["docker", "run", "-d", "--name", name, *options, image, "postgres",
            "-c", "archive_mode=off", "-c", f"shared_buffers={shared_buffers}"]  # fmt: skip
