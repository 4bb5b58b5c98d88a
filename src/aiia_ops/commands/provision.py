"""Facts -> plan to make a machine able to run the stack: engine, compose v2, base images.

Pure: this module builds argv commands from `HostFacts` and touches nothing. Reading the
facts is `aiia_ops.commands.facts`; executing the steps is the task (`invoke provision`).

The plan has three phases, run in order, with the facts re-read before each one, because
each phase changes what the next one sees:

1. engine  - install docker.io (+ debootstrap, iptables) and start dockerd
2. images  - `debian:trixie-slim` (pulled, or built with debootstrap when it cannot be),
             then compose v2 (fetched from Debian 13 inside that image)
3. base    - `aiia/base:trixie` from services/base, labelled with the hash of its build
             context and the id of its parent image, so it is rebuilt when either changes

Every step whose fact says it is done stays in the plan, skipped, with its reason.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

from aiia_ops.errors import OpsError

DEBIAN_IMAGE = "debian:trixie-slim"
BASE_IMAGE = "aiia/base:trixie"
BASE_SHA_LABEL = "org.aiia.context-sha256"
PIDFILE = "/run/aiia-dockerd.pid"
LOGFILE = "/var/log/aiia-dockerd.log"
DOCKERD = "/usr/sbin/dockerd"
DAEMON_JSON = "/etc/docker/daemon.json"
# What the project needs of the engine, merged into DAEMON_JSON (dockerd reads it at start,
# whether systemd or provision starts it; other keys there are kept).
ENGINE_SETTINGS = {
    # Published ports through the kernel's NAT (DNAT, route_localnet for 127.0.0.1) instead
    # of docker-proxy, a process copying every byte: a client on this machine (load test,
    # monitor, deploy probe) then costs what an outside client costs. Under the load test
    # the proxy took 0.6 of the 2 cores (docs/performance.md, "Issue 17, sixth pass").
    "userland-proxy": False,
}
ROOT_PLUGIN_DIR = "/usr/local/lib/docker/cli-plugins"
ROOTFS_DIR = "/var/tmp/aiia-trixie-rootfs"
ROOTFS_TAR = "/var/tmp/aiia-trixie-rootfs.tar"
FETCH_CONTAINER = "aiia-compose-fetch"
MIN_FREE_BYTES = 3 * 1024**3
ENGINE_WAIT_SECONDS = 60.0
PULL_TIMEOUT_SECONDS = 120.0
SUPPORTED_OS = ("debian", "ubuntu")
PHASES = ("engine", "images", "base")

Argv = tuple[str, ...]


class Refused(OpsError):
    """The plan cannot be carried out on this machine; the message says why and what to do."""


@dataclass(frozen=True)
class HostFacts:
    """What provisioning needs to know about a host. `None` means absent / not answering."""

    is_root: bool = True
    os_id: str = "debian"
    os_like: tuple[str, ...] = ()
    os_version: str = ""
    home: str = "/root"
    systemd: bool = False
    docker_client: str | None = None  # client version, e.g. "28.2.2"
    dockerd: str | None = None  # installed engine binary version, e.g. "20.10.24"
    engine_version: str | None = None  # the engine that answers, e.g. "20.10.24"
    engine_api: str | None = None  # e.g. "1.41"
    compose_version: str | None = None  # `docker compose version --short`, e.g. "2.26.1"
    debian_image_id: str | None = None  # id of debian:trixie-slim; None: absent
    base_image_sha: str | None = None  # label of aiia/base:trixie; None: image absent
    free_bytes: int | None = None  # free space where the engine keeps its data
    debootstrap: bool = False
    iptables: bool = False
    pidfile_pid: int | None = None  # pid in PIDFILE whose process is a running dockerd
    daemon_json: str | None = None  # text of DAEMON_JSON; None: absent

    @property
    def debian_like(self) -> bool:
        return self.os_id in SUPPORTED_OS or any(o in SUPPORTED_OS for o in self.os_like)

    @property
    def compose_v2(self) -> bool:
        return bool(self.compose_version) and self.compose_version.lstrip("v").startswith("2.")


@dataclass(frozen=True)
class Command:
    argv: Argv
    check: bool = True  # False: a failure is expected and harmless (cleanup of leftovers)
    timeout: float | None = None
    input: str | None = None  # fed to stdin (file contents for `tee`)


@dataclass(frozen=True)
class Step:
    """One idempotent step: commands to run, or the reason it is skipped."""

    phase: str
    name: str
    description: str
    commands: tuple[Command, ...] = ()
    skip: str | None = None  # reason the step is not needed
    # Polled (each attempt at most 5 s) until it succeeds, after `commands`:
    wait_for: Argv | None = None
    wait_seconds: float = 0.0
    # Run when a command of `commands` fails, instead of failing the step:
    fallback: tuple[Command, ...] = ()
    fallback_note: str = ""
    needs_root: bool = False
    needs_disk: bool = False

    @property
    def argvs(self) -> list[list[str]]:
        return [list(c.argv) for c in self.commands]

    @property
    def fallback_argvs(self) -> list[list[str]]:
        return [list(c.argv) for c in self.fallback]


def _cmd(
    *argv: str, check: bool = True, timeout: float | None = None, input: str | None = None
) -> Command:
    return Command(tuple(argv), check, timeout, input)


# What debian:trixie-slim itself sets up, for the image built locally with debootstrap.
SLIM_DPKG_EXCLUDES = """\
path-exclude /usr/share/doc/*
path-include /usr/share/doc/*/copyright
path-exclude /usr/share/man/*
path-exclude /usr/share/groff/*
path-exclude /usr/share/info/*
path-exclude /usr/share/lintian/*
path-exclude /usr/share/linda/*
path-exclude /usr/share/locale/*
path-include /usr/share/locale/locale.alias
"""
DEBIAN_SOURCES = """\
Types: deb
URIs: http://deb.debian.org/debian
Suites: trixie trixie-updates
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg

Types: deb
URIs: http://deb.debian.org/debian-security
Suites: trixie-security
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
"""


# --- the steps ------------------------------------------------------------------------------


def engine_config(text: str | None) -> dict:
    """DAEMON_JSON's settings as they are (empty when absent); Refused when unreadable."""
    if text is None or not text.strip():
        return {}
    try:
        config = json.loads(text)
    except ValueError as exc:
        config = exc
    if not isinstance(config, dict):
        problem = (
            f"not valid JSON ({config})" if isinstance(config, ValueError) else "not a JSON object"
        )
        raise Refused(
            f"{DAEMON_JSON} is {problem}, so the engine's settings cannot be merged into it. "
            "Fix it (dockerd would refuse it too) or move it away, then rerun; nothing was changed."
        )
    return config


def _engine_config_step(f: HostFacts) -> Step:
    wanted = ", ".join(f'"{k}": {json.dumps(v)}' for k, v in ENGINE_SETTINGS.items())
    desc = f"engine settings in {DAEMON_JSON}: {wanted}"
    current = engine_config(f.daemon_json)
    if all(k in current and current[k] == v for k, v in ENGINE_SETTINGS.items()):
        return Step("engine", "engine.config", desc, skip=f"{DAEMON_JSON} has them")
    if not f.is_root and f.engine_version:
        return Step(
            "engine",
            "engine.config",
            desc,
            skip=f"not root: the engine keeps its own settings (as root, add {wanted} "
            f"to {DAEMON_JSON} and restart it)",
        )
    if f.engine_version:
        desc += (
            " (the running engine reads them at its next start: `invoke engine.stop` then "
            "`invoke provision`, which restarts every container)"
        )
    text = json.dumps({**current, **ENGINE_SETTINGS}, indent=2) + "\n"
    new = f"{DAEMON_JSON}.aiia-new"
    return Step(
        "engine",
        "engine.config",
        desc,
        commands=(
            _cmd("mkdir", "-p", DAEMON_JSON.rsplit("/", 1)[0]),
            _cmd("tee", new, input=text),
            _cmd("mv", "-f", new, DAEMON_JSON),  # whole or not at all
        ),
        needs_root=True,
    )


def _engine_steps(f: HostFacts) -> list[Step]:
    config = _engine_config_step(f)
    if f.engine_version:
        done = f"engine answers: {f.engine_version} (API {f.engine_api})"
        return [
            config,
            Step("engine", "engine.install", "install docker.io, debootstrap, iptables", skip=done),
            Step("engine", "engine.start", "start the Docker engine", skip=done),
        ]
    packages = [
        p
        for p, have in (
            ("docker.io", f.dockerd),
            ("debootstrap", f.debootstrap),
            ("iptables", f.iptables),
        )
        if not have
    ]
    if packages:
        install = Step(
            "engine",
            "engine.install",
            "install " + ", ".join(packages) + " from the OS archive",
            commands=(
                _cmd("apt-get", "update", "-qq"),
                _cmd("apt-get", "install", "-y", "-qq", "--no-install-recommends", *packages),
            ),
            needs_root=True,
            needs_disk=True,
        )
    else:
        install = Step(
            "engine",
            "engine.install",
            "install docker.io, debootstrap, iptables",
            skip=f"installed: dockerd {f.dockerd}, debootstrap, iptables",
        )
    wait = ("docker", "version", "--format", "{{.Server.Version}}")
    if f.systemd:
        start = Step(
            "engine",
            "engine.start",
            "start the Docker engine with systemd",
            commands=(_cmd("systemctl", "enable", "--now", "docker"),),
            wait_for=wait,
            wait_seconds=ENGINE_WAIT_SECONDS,
            needs_root=True,
        )
    else:
        start = Step(
            "engine",
            "engine.start",
            f"start dockerd in the background (no systemd; pidfile {PIDFILE}, log {LOGFILE})",
            commands=(
                _cmd(
                    *("start-stop-daemon", "--start", "--oknodo", "--background", "--make-pidfile"),
                    *("--pidfile", PIDFILE, "--output", LOGFILE, "--exec", DOCKERD),
                ),
            ),
            wait_for=wait,
            wait_seconds=ENGINE_WAIT_SECONDS,
            needs_root=True,
        )
    return [config, install, start]


def _debian_image_step(f: HostFacts) -> Step:
    desc = f"base image {DEBIAN_IMAGE}: pull it, or build it with debootstrap"
    if f.debian_image_id:
        return Step("images", "image.debian", desc, skip=f"{DEBIAN_IMAGE} present")
    root, share = ROOTFS_DIR, f"{ROOTFS_DIR}/usr/share"
    fallback = []
    if not f.debootstrap:
        fallback += [
            _cmd("apt-get", "update", "-qq"),
            _cmd("apt-get", "install", "-y", "-qq", "--no-install-recommends", "debootstrap"),
        ]
    fallback += [
        _cmd("rm", "-rf", root, ROOTFS_TAR),
        _cmd("debootstrap", "--variant=minbase", "trixie", root),
        # Make it what the official slim image is: no docs, man pages or locales (now or
        # later), the same apt sources (with updates and security), no apt caches.
        _cmd("tee", f"{root}/etc/dpkg/dpkg.cfg.d/docker", input=SLIM_DPKG_EXCLUDES),
        _cmd("tee", f"{root}/etc/apt/sources.list.d/debian.sources", input=DEBIAN_SOURCES),
        _cmd("rm", "-f", f"{root}/etc/apt/sources.list"),
        _cmd("find", f"{share}/doc", *("-type", "f", "!", "-name", "copyright", "-delete")),
        _cmd(
            *("find", f"{share}/man", f"{share}/info", f"{share}/locale"),
            *("-type", "f", "!", "-name", "locale.alias", "-delete"),
        ),
        _cmd("find", f"{root}/var/cache/apt", f"{root}/var/lib/apt/lists", "-type", "f", "-delete"),
        _cmd("tar", "-C", root, "--numeric-owner", "-cf", ROOTFS_TAR, "."),
        _cmd(
            *("docker", "import", "--change", 'CMD ["bash"]'),
            *("--change", "LABEL org.aiia.built-by=debootstrap", ROOTFS_TAR, DEBIAN_IMAGE),
        ),
        _cmd("rm", "-rf", root, ROOTFS_TAR),
    ]
    return Step(
        "images",
        "image.debian",
        desc,
        commands=(_cmd("docker", "pull", DEBIAN_IMAGE, timeout=PULL_TIMEOUT_SECONDS),),
        fallback=tuple(fallback),
        fallback_note="no registry answers: build it locally with debootstrap",
        needs_root=True,  # the fallback needs root (debootstrap); the pull alone would not
        needs_disk=True,
    )


def plugin_dir(f: HostFacts) -> str:
    return ROOT_PLUGIN_DIR if f.is_root else f"{f.home}/.docker/cli-plugins"


def _compose_step(f: HostFacts) -> Step:
    desc = "compose v2 as a docker CLI plugin (Debian 13's docker-compose package)"
    if f.compose_v2:
        return Step("images", "compose", desc, skip=f"docker compose {f.compose_version}")
    target = plugin_dir(f)
    fetch = "apt-get update -qq && apt-get install -y -qq --no-install-recommends docker-compose"
    return Step(
        "images",
        "compose",
        desc,
        commands=(
            _cmd("docker", "rm", "-f", FETCH_CONTAINER, check=False),
            _cmd("docker", "run", "--name", FETCH_CONTAINER, DEBIAN_IMAGE, "sh", "-c", fetch),
            _cmd("mkdir", "-p", target),
            _cmd(
                "docker",
                "cp",
                f"{FETCH_CONTAINER}:/usr/libexec/docker/cli-plugins/docker-compose",
                f"{target}/docker-compose",
            ),
            _cmd("docker", "rm", FETCH_CONTAINER),
            _cmd("docker", "compose", "version"),
        ),
        needs_disk=True,
    )


def base_label(context_sha: str, debian_image_id: str | None) -> str:
    """What aiia/base is labelled with: its build context and its parent image."""
    parent = (debian_image_id or "").removeprefix("sha256:")[:12]
    return f"{context_sha}.{parent}"


def _base_image_step(f: HostFacts, context: str, context_sha: str) -> Step:
    desc = f"build {BASE_IMAGE} from {context}"
    sha = base_label(context_sha, f.debian_image_id)
    if f.debian_image_id and f.base_image_sha == sha:
        return Step(
            "base",
            "image.base",
            desc,
            skip=f"{BASE_IMAGE} built from this {context} and {DEBIAN_IMAGE}",
        )
    return Step(
        "base",
        "image.base",
        desc,
        commands=(
            _cmd(
                "docker", "build", "--label", f"{BASE_SHA_LABEL}={sha}", "-t", BASE_IMAGE, context
            ),
        ),
        needs_disk=True,
    )


# --- refusals -------------------------------------------------------------------------------


def _refusal(f: HostFacts, steps: list[Step]) -> str | None:
    todo = [s for s in steps if not s.skip]
    engine_missing = any(s.name.startswith("engine.") for s in todo)
    if engine_missing and not f.debian_like:
        return (
            f"no Docker engine answers and this OS ({f.os_id or 'unknown'}) is not Debian or "
            "Ubuntu, which is all `invoke provision` knows how to install on. Install Docker "
            "Engine 24+ and the compose v2 plugin yourself (https://docs.docker.com/engine/"
            "install/), start the engine, then rerun `invoke provision` for the images."
        )
    if not f.is_root and any(s.needs_root for s in todo):
        names = ", ".join(s.name for s in todo if s.needs_root)
        return (
            f"provisioning needs root for: {names}. Run `invoke provision` as root "
            "(e.g. `sudo invoke provision`), or install Docker Engine 24+ and the compose v2 "
            f"plugin yourself, give your user access to the engine, and make {DEBIAN_IMAGE} "
            "pullable; then rerun."
        )
    if (
        f.free_bytes is not None
        and f.free_bytes < MIN_FREE_BYTES
        and any(s.needs_disk for s in todo)
    ):
        return (
            f"too little free disk: {f.free_bytes / 1024**3:.1f} GB free where the engine "
            f"keeps its data (/var/lib), {MIN_FREE_BYTES // 1024**3} GB needed for the engine, "
            "the base images and the service images. Free some space (e.g. `docker system "
            "prune`, `apt-get clean`) or grow the disk, then rerun."
        )
    return None


def plan(
    facts: HostFacts,
    *,
    phases: tuple[str, ...] = PHASES,
    base_context: str = "services/base",
    base_sha: str = "",
) -> list[Step]:
    """Every step of provisioning, in order; skipped ones carry their reason.

    Later phases are planned from the same facts: when the engine does not answer yet,
    nothing is known about its images, so they are planned as missing. The task re-reads the
    facts before each phase. Raises `Refused` when the work needed cannot be done here.
    """
    steps: list[Step] = []
    if "engine" in phases:
        steps += _engine_steps(facts)
    if "images" in phases:
        steps += [_debian_image_step(facts), _compose_step(facts)]
    if "base" in phases:
        steps.append(_base_image_step(facts, base_context, base_sha))
    reason = _refusal(facts, steps)
    if reason:
        raise Refused(reason)
    return steps


# --- engine-stop ----------------------------------------------------------------------------


@dataclass(frozen=True)
class StopPlan:
    commands: list[list[str]] = field(default_factory=list)
    message: str = ""


def plan_engine_stop(facts: HostFacts) -> StopPlan:
    """Stop the dockerd that `invoke provision` started (found by its pidfile), and only it."""
    if facts.pidfile_pid:
        return StopPlan(
            [
                [
                    *("start-stop-daemon", "--stop", "--pidfile", PIDFILE, "--exec", DOCKERD),
                    *("--retry", "TERM/30/KILL/5", "--remove-pidfile"),
                ]
            ],
            f"stopping dockerd (pid {facts.pidfile_pid}) started by `invoke provision`",
        )
    if not facts.engine_version:
        return StopPlan(
            [], "no Docker engine answers and none was started by provision: nothing to stop"
        )
    if facts.systemd:
        return StopPlan(
            [],
            f"the engine ({facts.engine_version}) was not started by provision "
            f"(no live dockerd in {PIDFILE}); systemd manages it: "
            "`systemctl stop docker docker.socket` stops it",
        )
    return StopPlan(
        [],
        f"the engine ({facts.engine_version}) was not started by provision "
        f"(no live dockerd in {PIDFILE}); someone else started it, so it is "
        "left running",
    )
