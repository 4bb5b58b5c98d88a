"""A real OpenSSH server on 127.0.0.1 for tests: the SSH target a deploy runs against.

`start_sshd(directory)` generates a host key and a client key in `directory`, authorizes the
client key for root, writes a known_hosts line for the server, and starts `sshd -D -e` on a
free port of 127.0.0.1 with its own config (nothing from /etc/ssh). Commands run over it as
root on this machine, so `docker` over SSH reaches the local engine.

Needs root (sshd runs as root; logins are by key only). `ensure_sshd()` installs Debian's
openssh-server with apt when /usr/sbin/sshd is missing: CI machines start with nothing.

The `sshd_host` fixture is defined here so any conftest can offer it:
`from tests.sshd import sshd_host  # noqa: F401` (tests/integration/conftest.py does).
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

SSHD = "/usr/sbin/sshd"
SFTP_SERVER = "/usr/lib/openssh/sftp-server"


class SSHDUnavailable(RuntimeError):
    """sshd cannot run here (not root, or it would not install)."""


def ensure_sshd(timeout: float = 600) -> str:
    """/usr/sbin/sshd, installed with `apt-get update && apt-get install openssh-server` if
    missing. The package's own service is not started (policy-rc.d) and not needed."""
    if os.path.exists(SSHD) and shutil.which("ssh-keygen"):
        return SSHD
    if os.geteuid() != 0:
        raise SSHDUnavailable(f"{SSHD} is missing and installing it needs root")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    policy = Path("/usr/sbin/policy-rc.d")
    added_policy = not policy.exists()
    if added_policy:  # keep apt from starting a system sshd on port 22
        policy.write_text("#!/bin/sh\nexit 101\n")
        policy.chmod(0o755)
    try:
        for argv in (
            ["apt-get", "update", "-q"],
            ["apt-get", "install", "-y", "-q", "--no-install-recommends", "openssh-server"],
        ):
            proc = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=timeout)
            if proc.returncode != 0:
                raise SSHDUnavailable(f"{' '.join(argv)} failed:\n{proc.stdout}\n{proc.stderr}")
    finally:
        if added_policy:
            policy.unlink()
    return SSHD


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def keygen(path: Path, comment: str) -> Path:
    subprocess.run(
        ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", comment, "-f", str(path)],
        check=True,
        capture_output=True,
    )
    return path


@dataclass
class SSHServer:
    """A running sshd. `spec` is what a stack's `hosts.<name>.ssh` would hold."""

    port: int
    user: str
    key_path: Path  # the client's private key, authorized for `user`
    known_hosts_path: Path  # one line: this server's host key
    host_key_path: Path
    log_path: Path
    process: subprocess.Popen
    address: str = "127.0.0.1"

    @property
    def spec(self) -> str:
        return f"{self.user}@{self.address}:{self.port}"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def start_sshd(directory: Path, user: str = "root", wait: float = 15) -> SSHServer:
    """Keys and config in `directory`; sshd on a free 127.0.0.1 port, up when this returns."""
    sshd = ensure_sshd()
    if os.geteuid() != 0:
        raise SSHDUnavailable("sshd must run as root to log users in")
    directory.mkdir(parents=True, exist_ok=True)
    directory.chmod(0o700)
    host_key = keygen(directory / "ssh_host_ed25519_key", "aiia-test-host")
    client_key = keygen(directory / "id_ed25519", "aiia-test-client")
    authorized = directory / "authorized_keys"
    authorized.write_text((directory / "id_ed25519.pub").read_text())
    authorized.chmod(0o600)
    port = free_port()
    known_hosts = directory / "known_hosts"
    host_pub = (directory / "ssh_host_ed25519_key.pub").read_text().split()
    known_hosts.write_text(f"[127.0.0.1]:{port} {host_pub[0]} {host_pub[1]}\n")
    sftp = SFTP_SERVER if os.path.exists(SFTP_SERVER) else "internal-sftp"
    config = directory / "sshd_config"
    config.write_text(
        "\n".join(
            [
                f"HostKey {host_key}",
                f"AuthorizedKeysFile {authorized}",
                f"PidFile {directory / 'sshd.pid'}",
                "ListenAddress 127.0.0.1",
                "PermitRootLogin prohibit-password",
                "PubkeyAuthentication yes",
                "PasswordAuthentication no",
                "KbdInteractiveAuthentication no",
                "UsePAM no",
                # The test keys live under /tmp, which is world-writable: StrictModes would
                # refuse them. The files themselves are 0600 in a 0700 directory.
                "StrictModes no",
                f"Subsystem sftp {sftp}",
                "LogLevel VERBOSE",
                "",
            ]
        )
    )
    Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)  # privilege separation directory
    log_path = directory / "sshd.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            [sshd, "-D", "-e", "-f", str(config), "-p", str(port)],
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
    server = SSHServer(port, user, client_key, known_hosts, host_key, log_path, process)
    deadline = time.monotonic() + wait
    while True:
        if process.poll() is not None:
            raise SSHDUnavailable(f"sshd exited with {process.returncode}:\n{server.log()}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1) as s:
                if s.recv(64).startswith(b"SSH-2.0-"):
                    return server
        except OSError:
            pass
        if time.monotonic() > deadline:
            server.stop()
            raise SSHDUnavailable(f"sshd did not answer on 127.0.0.1:{port}:\n{server.log()}")
        time.sleep(0.1)


@pytest.fixture(scope="session")
def sshd_host(tmp_path_factory):
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
