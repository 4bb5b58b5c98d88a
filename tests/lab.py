"""The test lab for tests: N real hosts on this machine (network namespaces on labbr0, each
with its own sshd and dockerd), brought up by the task people run, `invoke lab.up --hosts N`,
and removed at the end of the session by `invoke lab.down` (docs/lab.md).

    def test_two_hosts(make_lab):
        lab1, lab2 = make_lab(2)
        with lab1.runner() as r:                 # an aiia SSHRunner, host key verified
            r.run(["docker", "info"])            # lab1's own engine (DOCKER_HOST of its sshd)
        lab2.spec, lab2.key_path, lab2.known_hosts_path, lab2.docker_host

`make_lab(n)` may be called by many tests: each call converges the lab (`lab.up` adds
missing hosts and restarts dead daemons, ~2 s when all is up) and returns its first n hosts.
One session uses the lab at a time: it holds /tmp/aiia-lab-tests.lock (an flock, released
when the process ends). AIIA_LAB_KEEP=1 keeps the lab up after the session.

Register it in a conftest: `from tests.lab import make_lab  # noqa: F401`.
"""

from __future__ import annotations

import fcntl
import json
import os
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.conftest import run_invoke
from tests.sshd import ensure_sshd

LOCK = Path("/tmp/aiia-lab-tests.lock")
# The lab outlives any one test stack: not under a test's AIIA_STATE_DIR (which the e2e
# package removes before session fixtures end), always the machine's lab dir.
LAB_ENV = {"AIIA_LAB_DIR": "/var/lib/aiia-lab"}


@dataclass(frozen=True)
class LabHost:
    """One lab host as a test uses it."""

    name: str
    address: str
    ssh_user: str
    ssh_port: int
    key_path: Path  # the lab's client key, authorized for root on every host
    known_hosts_path: Path  # every host's key (verified, never accepted blindly)
    docker_host: str  # unix:///run/aiia-lab-labK.sock, this host's engine from this machine

    @property
    def spec(self) -> str:
        """`user@address:port`: what a stack's `hosts.<name>.ssh` holds and SSHRunner takes."""
        return f"{self.ssh_user}@{self.address}:{self.ssh_port}"

    @property
    def socket(self) -> str:
        return self.docker_host.removeprefix("unix://")

    def runner(self, **options):
        """An aiia `SSHRunner` to this host (Fabric underneath); close it, or use `with`."""
        from aiia_ops.host.ssh import SSHRunner

        return SSHRunner(
            self.spec,
            key_filename=self.key_path,
            known_hosts=self.known_hosts_path,
            host=self.name,
            **options,
        )


def lab_status() -> dict:
    proc = run_invoke("lab.status", "--json", env=LAB_ENV, check=True, timeout=120)
    return json.loads(proc.stdout)


def _hosts(data: dict, n: int) -> list[LabHost]:
    hosts = [
        LabHost(
            h["name"], h["address"], h["ssh_user"], h["ssh_port"], Path(h["key"]),
            Path(h["known_hosts"]), h["docker_host"],
        )
        for h in data["hosts"][:n]
    ]  # fmt: skip
    down = [h["name"] for h in data["hosts"][:n] if not h["up"]]
    if len(hosts) < n or down:
        raise AssertionError(f"lab.up returned, yet hosts are missing or down: {data}")
    return hosts


def _lock() -> int:
    fd = os.open(LOCK, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "another run"
        os.close(fd)
        pytest.fail(f"the test lab is in use by {holder} ({LOCK}); wait for it to end")
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"pid {os.getpid()}\n".encode(), 0)
    return fd


@pytest.fixture(scope="session")
def make_lab():
    """A factory: `make_lab(n)` -> n `LabHost`s that answer over SSH and Docker. The lab is
    removed with `invoke lab.down` at the end of the session, even after a failure."""
    if os.geteuid() != 0:
        pytest.skip("the lab needs root (namespaces, bridge, iptables, sshd, dockerd)")
    ensure_sshd()
    lock = _lock()
    used = False

    def make(n: int) -> list[LabHost]:
        nonlocal used
        used = True
        proc = run_invoke("lab.up", "--hosts", str(n), env=LAB_ENV, timeout=600)
        if proc.returncode != 0:
            raise AssertionError(f"invoke lab.up --hosts {n} failed:\n{proc.stdout}\n{proc.stderr}")
        return _hosts(lab_status(), n)

    try:
        yield make
    finally:
        try:
            if used and os.environ.get("AIIA_LAB_KEEP") != "1":
                run_invoke("lab.down", env=LAB_ENV, check=True, timeout=300)
        finally:
            os.close(lock)
