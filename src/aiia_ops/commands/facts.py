"""Host facts for provisioning: each fact is a read-only command plus a pure parser.

`flows.provision.gather(runner)` asks them (`runner.query`: none of them changes anything)
and returns a `provision.HostFacts`. The parsers are plain functions of a `Result`, tested
as data.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from aiia_ops.commands.argv import Result
from aiia_ops.commands.provision import (
    BASE_IMAGE,
    BASE_SHA_LABEL,
    DAEMON_JSON,
    DEBIAN_IMAGE,
    PIDFILE,
)


@dataclass(frozen=True)
class Fact:
    field: str
    argv: tuple[str, ...]
    parse: Callable[[Result], Any]


def parse_os_release(r: Result) -> dict[str, Any]:
    values: dict[str, str] = {}
    for line in r.stdout.splitlines():
        key, sep, value = line.partition("=")
        if sep:
            values[key.strip()] = value.strip().strip('"').strip("'")
    return {
        "os_id": values.get("ID", "").lower(),
        "os_like": tuple(values.get("ID_LIKE", "").lower().split()),
        "os_version": values.get("VERSION_ID", ""),
    }


def _first_word_or_none(r: Result) -> str | None:
    words = r.stdout.split()
    return words[0] if r.ok and words else None


def parse_client_version(r: Result) -> str | None:
    """`docker --version` -> "Docker version 28.2.2, build e6534b4" -> "28.2.2"."""
    if not r.ok or "version" not in r.stdout:
        return None
    return r.stdout.split("version", 1)[1].split(",")[0].strip() or None


def parse_engine(r: Result) -> dict[str, Any]:
    """`docker version --format '{{.Server.Version}} {{.Server.APIVersion}}'`."""
    parts = r.stdout.split()
    if not r.ok or len(parts) != 2:
        return {"engine_version": None, "engine_api": None}
    return {"engine_version": parts[0], "engine_api": parts[1]}


def parse_compose(r: Result) -> str | None:
    """`docker compose version --short` -> "2.26.1" (None when the plugin is missing)."""
    return _first_word_or_none(r)


def parse_image_id(r: Result) -> str | None:
    """`docker image inspect --format '{{.Id}}' IMAGE` -> "sha256:..." (None: absent)."""
    return _first_word_or_none(r)


def parse_ok(r: Result) -> bool:
    return r.ok


def parse_label(r: Result) -> str | None:
    """Label value of an image; None when the image is absent, "" when it has no label."""
    if not r.ok:
        return None
    value = r.stdout.strip()
    return "" if value == "<no value>" else value


def parse_df_avail(r: Result) -> int | None:
    """`df -B1 --output=avail DIR` -> "    Avail\\n85720047616" -> 85720047616."""
    lines = r.stdout.split()
    return int(lines[-1]) if r.ok and lines and lines[-1].isdigit() else None


def parse_is_root(r: Result) -> bool:
    return r.ok and r.stdout.strip() == "0"


def parse_home(r: Result) -> str:
    return r.stdout.strip() or "/root"


def parse_dockerd_version(r: Result) -> str | None:
    return parse_client_version(r)


def parse_pidfile(r: Result) -> int | None:
    """`cat PIDFILE` -> the pid, or None."""
    text = r.stdout.strip()
    return int(text) if r.ok and text.isdigit() else None


def parse_file_text(r: Result) -> str | None:
    """`cat FILE` -> its text; None when it cannot be read (absent)."""
    return r.stdout if r.ok else None


def parse_comm(r: Result) -> str:
    return r.stdout.strip() if r.ok else ""


FACTS: tuple[Fact, ...] = (
    Fact("is_root", ("id", "-u"), parse_is_root),
    Fact("home", ("sh", "-c", "echo $HOME"), parse_home),
    Fact("_os", ("cat", "/etc/os-release"), parse_os_release),
    Fact("systemd", ("test", "-d", "/run/systemd/system"), parse_ok),
    Fact("docker_client", ("docker", "--version"), parse_client_version),
    Fact("dockerd", ("dockerd", "--version"), parse_dockerd_version),
    Fact("debootstrap", ("debootstrap", "--version"), parse_ok),
    Fact("iptables", ("iptables", "--version"), parse_ok),
    Fact("free_bytes", ("df", "-B1", "--output=avail", "/var/lib"), parse_df_avail),
    Fact("pidfile_pid", ("cat", PIDFILE), parse_pidfile),
    Fact("daemon_json", ("cat", DAEMON_JSON), parse_file_text),
)

ENGINE_FACTS: tuple[Fact, ...] = (
    Fact("compose_version", ("docker", "compose", "version", "--short"), parse_compose),
    Fact(
        "debian_image_id",
        ("docker", "image", "inspect", "--format", "{{.Id}}", DEBIAN_IMAGE),
        parse_image_id,
    ),
    Fact(
        "base_image_sha",
        (
            "docker",
            "image",
            "inspect",
            "--format",
            f'{{{{index .Config.Labels "{BASE_SHA_LABEL}"}}}}',
            BASE_IMAGE,
        ),
        parse_label,
    ),
)

ENGINE_FACT = Fact(
    "_engine",
    ("docker", "version", "--format", "{{.Server.Version}} {{.Server.APIVersion}}"),
    parse_engine,
)


def apply(values: dict[str, Any], fact: Fact, result: Result) -> None:
    """Parse one fact's answer into `values` (a "_" field spreads a dict of several)."""
    parsed = fact.parse(result)
    if fact.field.startswith("_"):
        values.update(parsed)
    else:
        values[fact.field] = parsed


def comm_argv(pid: int) -> tuple[str, ...]:
    """The name of process `pid`: is the pidfile's pid still a dockerd?"""
    return ("cat", f"/proc/{pid}/comm")
