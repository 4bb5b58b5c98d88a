"""HTTPS requests to the stack's own nginx (health checks, probes): socket I/O, so in host/."""

from __future__ import annotations

import http.client
import json
import socket
import ssl


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


def https_request(
    domain: str,
    port: int,
    path: str,
    method: str = "GET",
    body: bytes | None = None,
    headers: dict | None = None,
    timeout: float = 10,
    address: str = "127.0.0.1",
) -> tuple[int, bytes]:
    """Any method over HTTPS to `address` with SNI and Host set to `domain` (the load test
    seeds its data with POSTs); certificate not verified, as https_get."""
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE  # the certificate may be the self-signed placeholder
    raw = socket.create_connection((address, port), timeout=timeout)
    conn = http.client.HTTPSConnection(address, port, timeout=timeout, context=context)
    conn.sock = context.wrap_socket(raw, server_hostname=domain)
    try:
        conn.request(method, path, body=body, headers={"Host": domain, **(headers or {})})
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()
