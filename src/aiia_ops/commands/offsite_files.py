"""The media and the configuration set off-site with restic, as data (pure).

restic (Debian 13's, in the PostgreSQL image beside pgBackRest) writes to the same S3 store
and bucket as pgBackRest, under `<bucket>/restic`: content-addressed, deduplicated (a copy
sends only new chunks: incremental), encrypted with AES-256 by a key derived from the same
PGBACKREST_CIPHER_PASS that encrypts the database repository. It runs in a one-off
container of the PostgreSQL image with the PostgreSQL env file (the S3 keys and the cipher
pass are already there, as PGBACKREST_REPO1_*; nothing new is written to disk).

What one snapshot holds (paths inside the container):
  /offsite/storage/<env>   each environment's storage volume (media uploads + static)
  /offsite/config          the rendered configs, minus the files that carry secrets
  /offsite/ssl             nginx's certificates (state dir ssl/)
  /offsite/stack.yml       the stack file the server ran
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from datetime import UTC, datetime

from aiia_ops.commands import pgbackrest as pb
from aiia_ops.commands.render import TEMPLATES
from aiia_ops.errors import OpsError
from aiia_ops.model import Stack

ROOT = "/offsite"
TAG = "aiia-files"
STATUS_FILE = "backups/offsite-files.json"  # under the state dir: the last copy's record

# Run restic with the repository keys that pgBackRest's env file already holds, and the
# store's own CA from it when the stack names one (repo1.ca; pb.CA_ENV).
_SCRIPT = (
    'export AWS_ACCESS_KEY_ID="$PGBACKREST_REPO1_S3_KEY" '
    'AWS_SECRET_ACCESS_KEY="$PGBACKREST_REPO1_S3_KEY_SECRET" '
    'RESTIC_PASSWORD="$PGBACKREST_REPO1_CIPHER_PASS"; '
    'if [ -n "${AIIA_STORE_CA_B64:-}" ]; then '
    'printf %s "$AIIA_STORE_CA_B64" | base64 -d >/tmp/store-ca.pem && '
    'set -- --cacert /tmp/store-ca.pem "$@"; fi; exec restic "$@"'
)


def repository(stack: Stack) -> str:
    r = pb.require(stack).repo1
    return f"s3:https://{r.endpoint}:{r.port}/{r.bucket}/restic"


def storage_path(env: str) -> str:
    return f"{ROOT}/storage/{env}"


def secret_configs() -> list[str]:
    """Rendered files that carry secrets (rendered 0640 for the service): not copied; a
    recovery renders them again from the secrets export."""
    return [f"{ROOT}/config/{t.output}" for t in TEMPLATES if t.secret]


def _restic(stack: Stack, image: str, env_file: str, mounts: list[str], args: list[str]):
    insecure = [] if pb.require(stack).repo1.verify_tls else ["--insecure-tls"]
    return [
        "docker",
        "run",
        "--rm",
        "--network",
        "bridge",
        "--user",
        "0:0",
        "--env-file",
        env_file,
        *mounts,
        "--entrypoint",
        "sh",
        image,
        "-c",
        _SCRIPT,
        "restic",
        "--repo",
        repository(stack),
        "--no-cache",
        *insecure,
        *args,
    ]


@dataclass(frozen=True)
class Sources:
    """What a copy mounts, from the server's facts: storage volume per environment (those
    that exist), the state's config and ssl dirs, the stack file."""

    volumes: dict[str, str]  # env -> volume name
    config_dir: str
    ssl_dir: str
    stack_file: str | None


def mounts(src: Sources, read_only: bool = True) -> list[str]:
    ro = ":ro" if read_only else ""
    out = []
    for env, volume in sorted(src.volumes.items()):
        out += ["-v", f"{volume}:{storage_path(env)}{ro}"]
    out += ["-v", f"{src.config_dir}:{ROOT}/config{ro}", "-v", f"{src.ssl_dir}:{ROOT}/ssl{ro}"]
    if src.stack_file:
        out += ["-v", f"{src.stack_file}:{ROOT}/stack.yml:ro"]
    return out


def init(stack: Stack, image: str, env_file: str) -> list[str]:
    return _restic(stack, image, env_file, [], ["init"])


def cat_config(stack: Stack, image: str, env_file: str) -> list[str]:
    """Succeeds when the repository exists and the key opens it."""
    return _restic(stack, image, env_file, [], ["cat", "config"])


def backup(stack: Stack, image: str, env_file: str, src: Sources) -> list[str]:
    excludes = [a for path in secret_configs() for a in ("--exclude", path)]
    return _restic(
        stack,
        image,
        env_file,
        mounts(src),
        ["backup", "--json", "--host", stack.project, "--tag", TAG, *excludes, ROOT],
    )


def snapshots(stack: Stack, image: str, env_file: str) -> list[str]:
    return _restic(
        stack, image, env_file, [], ["snapshots", "--json", "--host", stack.project, "--tag", TAG]
    )


def ls_latest(stack: Stack, image: str, env_file: str) -> list[str]:
    return _restic(
        stack,
        image,
        env_file,
        [],
        ["ls", "--json", "--host", stack.project, "--tag", TAG, "latest"],
    )


def restore(stack: Stack, image: str, env_file: str, include: list[str], target_mounts):
    """Restore `include` (paths under /offsite) of the newest snapshot onto `target_mounts`
    (the volumes and dirs mounted read-write at the same paths). As root: owners and modes
    come back as they were (the app's UID 10001)."""
    inc = [a for path in include for a in ("--include", path)]
    return _restic(
        stack,
        image,
        env_file,
        target_mounts,
        ["restore", "latest", "--host", stack.project, "--tag", TAG, "--target", "/", *inc],
    )


def volume_mount(volume: str, path: str) -> list[str]:
    return ["-v", f"{volume}:{path}"]


def dir_mount(source: str, path: str) -> list[str]:
    return ["-v", f"{source}:{path}"]


# --- reading restic's JSON -----------------------------------------------------------------


@dataclass(frozen=True)
class Snapshot:
    id: str
    time: datetime
    paths: tuple[str, ...]


def parse_snapshots(text: str) -> list[Snapshot]:
    try:
        data = json.loads(text or "[]")
    except json.JSONDecodeError as e:
        raise OpsError(f"restic snapshots printed no JSON ({e})") from None
    out = [Snapshot(s["short_id"], _time(s["time"]), tuple(s.get("paths", []))) for s in data or []]
    return sorted(out, key=lambda s: s.time)


def _time(text: str) -> datetime:
    # restic: 2026-12-02T10:01:02.123456789Z (nanoseconds; Python takes microseconds)
    head, _, frac = text.rstrip("Z").partition(".")
    frac = (frac.split("+")[0].split("-")[0] + "000000")[:6]
    when = datetime.fromisoformat(f"{head}.{frac}")
    return when.replace(tzinfo=UTC) if when.tzinfo is None else when


def parse_backup_summary(text: str) -> dict:
    """The `summary` line of `restic backup --json`."""
    for line in reversed(text.splitlines()):
        try:
            msg = json.loads(line)
        except json.JSONDecodeError:
            continue
        if msg.get("message_type") == "summary":
            return {
                "snapshot": msg.get("snapshot_id", "")[:8],
                "files_new": msg.get("files_new", 0),
                "files_changed": msg.get("files_changed", 0),
                "files": msg.get("total_files_processed", 0),
                "bytes": msg.get("total_bytes_processed", 0),
                "added": msg.get("data_added", 0),
            }
    raise OpsError("restic backup printed no summary: the copy did not finish")


def storage_envs(ls_text: str) -> list[str]:
    """The environments whose storage a snapshot holds (from `restic ls --json`)."""
    envs = set()
    prefix = f"{ROOT}/storage/"
    for line in ls_text.splitlines():
        try:
            node = json.loads(line)
        except json.JSONDecodeError:
            continue
        path = node.get("path", "")
        if path.startswith(prefix):
            envs.add(path[len(prefix) :].split("/", 1)[0])
    return sorted(envs)


# --- facts a recovery reads ----------------------------------------------------------------


def tcp_probe(address: str, port: int, seconds: int = 5) -> list[str]:
    """Exits 0 when something accepts a TCP connection (bash's /dev/tcp: no extra tool)."""
    return ["timeout", str(seconds), "bash", "-c", f"exec 3<>/dev/tcp/{address}/{port}"]


def compose_version() -> list[str]:
    return ["docker", "compose", "version", "--short"]


def project_containers(project: str) -> list[str]:
    return [
        "docker",
        "ps",
        "-a",
        "--format",
        "{{.Names}}",
        "--filter",
        f"label=com.docker.compose.project={project}",
    ]


def volume_inspect(name: str) -> list[str]:
    return ["docker", "volume", "inspect", "--format", "{{.Name}}", name]


def data_volume(stack: Stack) -> str:
    """The compose volume PostgreSQL keeps its data in."""
    for name, path in stack.services.postgresql.volumes.items():
        if path == pb.PGDATA:
            return f"{stack.project}_{name}"
    raise OpsError(f"services.postgresql.volumes mounts nothing at {pb.PGDATA}")


def run_in(image: str, options: list[str], argv: list[str]) -> list[str]:
    return ["docker", "run", "--rm", *options, image, *argv]


def s3_error(text: str) -> list[str]:
    """The S3 error codes in pgBackRest's `info` JSON (InvalidAccessKeyId ...), if any."""
    return [f"the store answers {code}" for code in re.findall(r"<Code>(\w+)</Code>", text)][:1]


def restore_newest(stack: Stack) -> list[str]:
    """pgBackRest's restore of the newest moment for a server that is then started by
    compose: its restore_command fetches WAL synchronously (--no-archive-async). The async
    prefetch forks a process that outlives archive-get; in the container it is reparented
    to the postmaster (PID 1), and when it exits non-zero (its spool on the small /tmp
    tmpfs fills: ENOSPC) the postmaster takes it for a crashed backend and restarts
    recovery, over and over (seen on lab19)."""
    argv = pb.restore(stack, None)
    return [
        a.replace(" archive-get ", " --no-archive-async archive-get ")
        if a.startswith("--recovery-option=restore_command=")
        else a
        for a in argv
    ]
