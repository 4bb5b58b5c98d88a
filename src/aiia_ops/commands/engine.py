"""The engine's facts as commands plus pure parsers of their output (host/engine.py runs them).

Every question to the Docker engine is a `docker` CLI command, so it works through any
runner: on this machine or over SSH. Container memory and CPU come from the containers'
cgroup files, read with ONE `grep` for all containers (cheap: the monitor runs every
minute on a 512 MB machine; `docker stats --no-stream` takes ~2 s and reports memory as
rounded text). `docker stats` is only the fallback when no cgroup file is found.

The one memory formula (`memory_used`): usage minus the inactive page cache the kernel can
drop, as `docker stats` computes it. Status, the monitor and the load test all use it.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass

from aiia_ops.commands.argv import Argv

STACK_LABEL = "org.eduaiia.stack"
CGROUP_ROOT = "/sys/fs/cgroup"
# cgroup v1 reports "no limit" as a huge page-aligned number; v2 writes "max".
_NO_LIMIT = 2**62


# --- argv ----------------------------------------------------------------------------------


def info() -> list[str]:
    """Everything about the engine (DockerRootDir, ...). The CLI also asks its plugins
    (compose, buildx) for their metadata here: ~43 MB resident for 0.1 s."""
    return ["docker", "info", "--format", "{{json .}}"]


def version() -> list[str]:
    """Is the engine there? Half the cost of `docker info` (~24 MB, no plugins run)."""
    return ["docker", "version", "--format", "{{json .}}"]


def ps(project: str | None = None) -> list[str]:
    """Every container (running or not), one JSON object a line; the stack's when `project`."""
    label = ["--filter", f"label={STACK_LABEL}={project}"] if project else []
    return ["docker", "ps", "--all", "--no-trunc", *label, "--format", "{{json .}}"]


def inspect(names: Argv) -> list[str]:
    """All of them in one call; a missing one is left out (the command then exits 1)."""
    return ["docker", "inspect", "--type", "container", *names]


def exec_in(container: str, argv: Argv, timeout_s: float | None = None) -> list[str]:
    """`docker exec`, the command bounded inside the container by coreutils' `timeout`."""
    bound = ["timeout", f"{timeout_s:g}"] if timeout_s else []
    return ["docker", "exec", container, *bound, *argv]


def image_inspect(images: Argv) -> list[str]:
    return ["docker", "image", "inspect", *images]


def stats(names: Argv) -> list[str]:
    return ["docker", "stats", "--no-stream", "--no-trunc", "--format", "{{json .}}", *names]


# cgroup layouts, per container id: (version, directory of memory files, of CPU files)
def cgroup_dirs(container_id: str, root: str = CGROUP_ROOT) -> list[tuple[str, str, str]]:
    root = root.rstrip("/")
    scope = f"system.slice/docker-{container_id}.scope"
    return [
        ("v1", f"{root}/memory/docker/{container_id}", f"{root}/cpuacct/docker/{container_id}"),
        ("v1", f"{root}/memory/{scope}", f"{root}/cpuacct/{scope}"),
        ("v2", f"{root}/{scope}", f"{root}/{scope}"),
        ("v2", f"{root}/docker/{container_id}", f"{root}/docker/{container_id}"),
    ]


V1_MEMORY = ("memory.usage_in_bytes", "memory.stat", "memory.limit_in_bytes",
             "memory.max_usage_in_bytes", "memory.oom_control")  # fmt: skip
V1_CPU = ("cpuacct.usage",)
V2_MEMORY = ("memory.current", "memory.stat", "memory.max", "memory.peak", "memory.events")
V2_CPU = ("cpu.stat",)


def cgroup_files(container_ids: Argv, root: str = CGROUP_ROOT) -> list[str]:
    """Every candidate counter file of every container (most do not exist)."""
    paths = []
    for cid in container_ids:
        for version, mem, cpu in cgroup_dirs(cid, root):
            mem_files, cpu_files = (V1_MEMORY, V1_CPU) if version == "v1" else (V2_MEMORY, V2_CPU)
            paths += [f"{mem}/{f}" for f in mem_files]
            paths += [f"{cpu}/{f}" for f in cpu_files if f"{cpu}/{f}" not in paths]
    return paths


def read_cgroups(container_ids: Argv, root: str = CGROUP_ROOT) -> list[str]:
    """ONE command for all containers: `grep -H` prints `path:line` for every line of every
    file that exists; `-s` is silent about the rest (exit 2 then: read with query())."""
    return ["grep", "-sH", "", *cgroup_files(container_ids, root)] if container_ids else []


# --- parsers -------------------------------------------------------------------------------


def parse_json_lines(text: str) -> list[dict]:
    """`--format '{{json .}}'` output: one object a line."""
    return [json.loads(line) for line in text.splitlines() if line.strip().startswith("{")]


def parse_info(text: str) -> dict | None:
    """`docker info` JSON, or None when the server part is missing (engine unreachable)."""
    try:
        data = json.loads(text)
    except ValueError:
        return None
    if not isinstance(data, dict) or data.get("ServerErrors") or not data.get("ServerVersion"):
        return None
    return data


def parse_version(text: str) -> dict | None:
    """`docker version` JSON → the server's part, or None when no engine answered."""
    try:
        data = json.loads(text)
    except ValueError:
        return None
    server = data.get("Server") if isinstance(data, dict) else None
    return server if isinstance(server, dict) and server.get("Version") else None


def parse_inspect(text: str) -> dict[str, dict]:
    """`docker inspect` JSON → {container name: its attributes}."""
    try:
        items = json.loads(text or "[]")
    except ValueError:
        return {}
    return {i["Name"].lstrip("/"): i for i in items if isinstance(i, dict) and "Name" in i}


def parse_ps_labels(text: str) -> dict[str, str]:
    """`docker ps` JSON's Labels field: "k=v,k=v"."""
    pairs = (item.partition("=") for item in (text or "").split(",") if item)
    return {k: v for k, _, v in pairs}


def parse_image_sizes(text: str) -> dict[str, int]:
    """`docker image inspect` JSON → {repo:tag: bytes}; missing images are left out."""
    try:
        items = json.loads(text or "[]")
    except ValueError:
        return {}
    return {tag: i["Size"] for i in items if isinstance(i, dict) for tag in i.get("RepoTags") or []}


@dataclass(frozen=True)
class Container:
    """What status, the monitor and the load test read of one container."""

    name: str
    id: str
    state: str  # running, exited, created, restarting, ...
    health: str  # healthy, unhealthy, starting, or "none" without a health check
    running: bool
    started_at: str
    restart_count: int
    oom_killed: bool
    image: str
    memory_limit: int | None  # bytes, from HostConfig.Memory
    cpu_limit: float | None  # CPUs, from HostConfig.NanoCpus
    addresses: dict[str, str]  # network name → IP address
    labels: dict[str, str]

    @classmethod
    def from_inspect(cls, attrs: dict) -> Container:
        state, host = attrs.get("State") or {}, attrs.get("HostConfig") or {}
        networks = (attrs.get("NetworkSettings") or {}).get("Networks") or {}
        return cls(
            name=attrs["Name"].lstrip("/"),
            id=attrs["Id"],
            state=state.get("Status", "unknown"),
            health=(state.get("Health") or {}).get("Status", "none"),
            running=bool(state.get("Running")),
            started_at=state.get("StartedAt", ""),
            restart_count=int(attrs.get("RestartCount") or 0),
            oom_killed=bool(state.get("OOMKilled")),
            image=(attrs.get("Config") or {}).get("Image", ""),
            memory_limit=host.get("Memory") or None,
            cpu_limit=host["NanoCpus"] / 1e9 if host.get("NanoCpus") else None,
            addresses={n: v.get("IPAddress") or "" for n, v in networks.items()},
            labels=dict((attrs.get("Config") or {}).get("Labels") or {}),
        )


def memory_used(usage: int | None, inactive_file: int | None) -> int | None:
    """THE memory formula, as `docker stats`: page cache the kernel can drop is not used."""
    if usage is None:
        return None
    return max(0, usage - (inactive_file or 0))


@dataclass(frozen=True)
class Usage:
    """One container's counters at one moment."""

    memory_usage: int | None  # raw cgroup usage (page cache included)
    inactive_file: int | None
    memory_limit: int | None  # the cgroup's limit; None = unlimited
    memory_peak: int | None  # highest usage the cgroup has seen (when the kernel says)
    cpu_ns: int | None  # cumulative CPU time
    oom_kills: int | None  # the kernel's OOM kills inside this cgroup
    source: str  # "cgroup v1", "cgroup v2" or "docker stats" (memory rounded, no CPU)

    @property
    def memory_used(self) -> int | None:
        return memory_used(self.memory_usage, self.inactive_file)


def _keyed(text: str) -> dict[str, str]:
    """`key value` lines (memory.stat, cpu.stat, memory.events, memory.oom_control)."""
    out = {}
    for line in text.splitlines():
        key, _, value = line.strip().partition(" ")
        if key:
            out[key] = value.strip()
    return out


def _int(text: str | None) -> int | None:
    try:
        return int(text.strip()) if text is not None else None
    except ValueError:
        return None


def _limit(text: str | None) -> int | None:
    value = _int(text)
    return value if value is not None and value < _NO_LIMIT else None


def split_grep(text: str) -> dict[str, str]:
    """`grep -H` output → {path: file content}."""
    files: dict[str, list[str]] = {}
    for line in text.splitlines():
        path, sep, rest = line.partition(":")
        if sep:
            files.setdefault(path, []).append(rest)
    return {p: "\n".join(lines) + "\n" for p, lines in files.items()}


def parse_cgroups(
    text: str, container_ids: Argv, root: str = CGROUP_ROOT
) -> dict[str, Usage | None]:
    """`read_cgroups` output → {container id: Usage}; None for one whose files were not found."""
    files = split_grep(text)
    out: dict[str, Usage | None] = {}
    for cid in container_ids:
        out[cid] = None
        for version, mem, cpu in cgroup_dirs(cid, root):
            f = lambda d, name: files.get(f"{d}/{name}")  # noqa: E731
            if version == "v1" and f(mem, "memory.usage_in_bytes") and f(cpu, "cpuacct.usage"):
                stat = _keyed(f(mem, "memory.stat") or "")
                oom = _keyed(f(mem, "memory.oom_control") or "")
                out[cid] = Usage(
                    memory_usage=_int(f(mem, "memory.usage_in_bytes")),
                    inactive_file=_int(stat.get("total_inactive_file", "0")),
                    memory_limit=_limit(f(mem, "memory.limit_in_bytes")),
                    memory_peak=_int(f(mem, "memory.max_usage_in_bytes")),
                    cpu_ns=_int(f(cpu, "cpuacct.usage")),
                    oom_kills=_int(oom.get("oom_kill")),
                    source="cgroup v1",
                )
                break
            if version == "v2" and f(mem, "memory.current") and f(cpu, "cpu.stat"):
                stat = _keyed(f(mem, "memory.stat") or "")
                usec = _int(_keyed(f(cpu, "cpu.stat") or "").get("usage_usec"))
                events = _keyed(f(mem, "memory.events") or "")
                out[cid] = Usage(
                    memory_usage=_int(f(mem, "memory.current")),
                    inactive_file=_int(stat.get("inactive_file", "0")),
                    memory_limit=_limit(f(mem, "memory.max")),
                    memory_peak=_int(f(mem, "memory.peak")),
                    cpu_ns=None if usec is None else usec * 1000,
                    oom_kills=_int(events.get("oom_kill")),
                    source="cgroup v2",
                )
                break
    return out


_UNITS = {"b": 1, "kb": 1000, "mb": 1000**2, "gb": 1000**3, "tb": 1000**4,
          "kib": 1024, "mib": 1024**2, "gib": 1024**3, "tib": 1024**4}  # fmt: skip


def parse_size_text(text: str) -> int | None:
    """`docker stats` sizes: "12.5MiB", "1.2GB", "0B"."""
    match = re.fullmatch(r"\s*([\d.]+)\s*([A-Za-z]+)\s*", text or "")
    if not match or match[2].lower() not in _UNITS:
        return None
    return round(float(match[1]) * _UNITS[match[2].lower()])


def parse_stats(text: str) -> dict[str, Usage]:
    """`docker stats --no-stream --format '{{json .}}'` → {name: Usage}: the fallback when no
    cgroup file is readable. MemUsage is "used / limit" already net of the page cache."""
    out = {}
    for row in parse_json_lines(text):
        used, _, limit = (row.get("MemUsage") or "").partition("/")
        out[row.get("Name", "")] = Usage(
            memory_usage=parse_size_text(used),
            inactive_file=0,
            memory_limit=parse_size_text(limit),
            memory_peak=None,
            cpu_ns=None,
            oom_kills=None,
            source="docker stats",
        )
    return out
