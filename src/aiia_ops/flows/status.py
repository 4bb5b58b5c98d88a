"""What is running: containers of the stack as the engine reports them (Python SDK)."""

from __future__ import annotations

import concurrent.futures
import http.client
import json
import socket
import ssl
from dataclasses import dataclass

from aiia_ops.commands.compose import service_key
from aiia_ops.errors import OpsError
from aiia_ops.model import Stack
from aiia_ops.model.units import Size


@dataclass
class ContainerStatus:
    service: str
    container: str
    state: str
    health: str
    memory_used: Size | None
    memory_limit: Size | None
    cpu_limit: float | None
    address: str
    image: str


def docker_client():
    import docker

    try:
        client = docker.from_env(version="auto", timeout=30)
        client.ping()
    except Exception as exc:
        raise OpsError(
            f"the Docker engine does not answer ({exc.__class__.__name__}); "
            "run `invoke provision` to install and start it"
        ) from None
    return client


def _memory_used(container) -> Size | None:
    try:
        stats = container.stats(stream=False, one_shot=True)
    except Exception:
        return None
    mem = stats.get("memory_stats") or {}
    usage = mem.get("usage")
    if usage is None:
        return None
    # Like `docker stats`: page cache the kernel can drop is not "used".
    extra = mem.get("stats") or {}
    cache = extra.get("total_inactive_file", extra.get("inactive_file", 0))
    return Size(max(0, usage - cache))


def stack_status(stack: Stack, client=None) -> list[ContainerStatus]:
    client = client or docker_client()
    expected = {c.container: service_key(c) for c in stack.containers()}
    # Every container of the stack carries its label; one removed meanwhile is skipped.
    listed = client.containers.list(
        all=True, ignore_removed=True, filters={"label": f"org.eduaiia.stack={stack.project}"}
    )
    found = {c.name: c for c in listed if c.name in expected}
    with concurrent.futures.ThreadPoolExecutor(max_workers=8) as pool:
        used = dict(
            zip(
                found,
                pool.map(
                    lambda c: _memory_used(c) if c.status == "running" else None, found.values()
                ),
                strict=True,
            )
        )
    rows = []
    for name, key in expected.items():
        c = found.get(name)
        if c is None:
            rows.append(ContainerStatus(key, name, "absent", "-", None, None, None, "-", "-"))
            continue
        attrs = c.attrs
        host = attrs["HostConfig"]
        networks = attrs["NetworkSettings"]["Networks"]
        address = networks.get(stack.network.name, {}).get("IPAddress") or "-"
        health = (attrs["State"].get("Health") or {}).get("Status", "none")
        rows.append(
            ContainerStatus(
                key,
                name,
                c.status,
                health,
                used.get(name),
                Size(host["Memory"]) if host.get("Memory") else None,
                host["NanoCpus"] / 1e9 if host.get("NanoCpus") else None,
                address,
                attrs["Config"]["Image"],
            )
        )
    return rows


def status_table_rows(rows: list[ContainerStatus]) -> list[list[str]]:
    def mb(s: Size | None) -> str:
        return "-" if s is None else f"{s.mb:.1f}MB" if isinstance(s.mb, float) else f"{s.mb}MB"

    return [
        [
            r.service,
            r.state,
            r.health,
            f"{mb(r.memory_used)} / {mb(r.memory_limit)}",
            "-" if r.cpu_limit is None else f"{r.cpu_limit:g}",
            r.address,
            r.image,
        ]
        for r in rows
    ]


STATUS_HEADERS = [
    "service",
    "state",
    "health",
    "memory used / limit",
    "cpu limit",
    "address",
    "image",
]


def https_get(
    host_header: str,
    path: str,
    address: str = "127.0.0.1",
    port: int = 443,
    timeout: float = 10,
    extra_headers: dict | None = None,
) -> tuple[int, dict, bytes]:
    """GET over HTTPS to `address` with SNI and Host set to `host_header` (like curl
    --resolve). The certificate is not verified: it may still be the self-signed one."""
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    raw = socket.create_connection((address, port), timeout=timeout)
    conn = http.client.HTTPSConnection(address, port, timeout=timeout, context=context)
    conn.sock = context.wrap_socket(raw, server_hostname=host_header)  # SNI = the domain
    try:
        conn.request("GET", path, headers={"Host": host_header, **(extra_headers or {})})
        resp = conn.getresponse()
        headers: dict[str, str] = {}
        for name, value in resp.getheaders():  # repeated headers combine, as RFC 9110 says
            headers[name] = f"{headers[name]}, {value}" if name in headers else value
        return resp.status, headers, resp.read()
    finally:
        conn.close()


def health_through_nginx(domain: str, address: str = "127.0.0.1", port: int = 443) -> dict:
    status, _, body = https_get(domain, "/health/", address, port)
    try:
        data = json.loads(body)
    except ValueError:
        data = {"raw": body[:200].decode(errors="replace")}
    data["http_status"] = status
    return data
