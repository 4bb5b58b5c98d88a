"""Fixtures for tests against real daemons on this machine."""

from __future__ import annotations

import os

import pytest

from tests.sshd import SSHDUnavailable, SSHServer, start_sshd


@pytest.fixture(scope="session")
def sshd_host(tmp_path_factory) -> SSHServer:
    """A real OpenSSH server on 127.0.0.1 (a free port) that accepts root by key.

    Installs openssh-server with apt (`apt-get update` first) when /usr/sbin/sshd is missing,
    as on a fresh CI machine; needs root, else the tests using it are skipped. Yields an
    `SSHServer`: `.spec` (root@127.0.0.1:PORT), `.key_path`, `.known_hosts_path`; the server
    is stopped at the end of the session."""
    if os.geteuid() != 0:
        pytest.skip("sshd_host needs root (sshd logs users in as themselves)")
    try:
        server = start_sshd(tmp_path_factory.mktemp("sshd"))
    except SSHDUnavailable as exc:
        pytest.fail(f"cannot start the test sshd: {exc}")
    try:
        yield server
    finally:
        server.stop()
