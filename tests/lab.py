"""The test lab for tests: N real hosts on this machine (network namespaces on labbr0, each
with its own sshd and dockerd), brought up by the task people run, `invoke lab.up --hosts N`,
and removed at the end of the session by `invoke lab.down` (docs/lab.md).

    def test_two_hosts(make_lab):
        lab1, lab2 = make_lab(2)
        with lab1.runner() as r:                 # an aiia SSHRunner, host key verified
            r.run(["docker", "info"])            # lab1's own engine (DOCKER_HOST of its sshd)
        lab2.spec, lab2.key_path, lab2.known_hosts_path, lab2.docker_host

`make_lab(n, first=1)` may be called by many tests: each call converges hosts
lab<first>..lab<first+n-1> (`lab.up --first K --hosts N` adds missing hosts and restarts dead
daemons, ~2 s when all is up; other hosts are left as they are) and returns them. Each host
is used by one session at a time: the session holds /tmp/aiia-lab-<host>.lock (an flock,
released when the process ends), so test areas on disjoint host ranges run side by side
(level 3: lab1-5, swarm: lab6-8, off-site backups: lab9-10, Patroni: lab15-17). At the
end the session removes the hosts it used (`lab.down --hosts ...`); AIIA_LAB_KEEP=1 keeps
them up.

Register it in a conftest: `from tests.lab import make_lab  # noqa: F401`.
"""

from __future__ import annotations

import fcntl
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.conftest import run_invoke
from tests.sshd import ensure_sshd

LOCK_DIR = Path("/tmp")
LOCK_WAIT = 3600.0  # seconds another session may hold a host before this one gives up
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


def _hosts(data: dict, names: list[str]) -> list[LabHost]:
    by_name = {h["name"]: h for h in data["hosts"]}
    hosts = [
        LabHost(
            h["name"], h["address"], h["ssh_user"], h["ssh_port"], Path(h["key"]),
            Path(h["known_hosts"]), h["docker_host"],
        )
        for h in (by_name[n] for n in names if n in by_name)
    ]  # fmt: skip
    down = [n for n in names if n in by_name and not by_name[n]["up"]]
    if len(hosts) < len(names) or down:
        raise AssertionError(f"lab.up returned, yet hosts are missing or down: {data}")
    return hosts


def _lock(name: str) -> int:
    """Hold lab host `name` for this session (waits while another session holds it)."""
    path = LOCK_DIR / f"aiia-lab-{name}.lock"
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    deadline = time.monotonic() + LOCK_WAIT
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            break
        except BlockingIOError:
            if time.monotonic() > deadline:
                holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "another run"
                os.close(fd)
                pytest.fail(f"lab host {name} is in use by {holder} ({path}); wait for it to end")
            time.sleep(1)
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"pid {os.getpid()}\n".encode(), 0)
    return fd


@pytest.fixture(scope="session")
def make_lab():
    """A factory: `make_lab(n, first=1)` -> n `LabHost`s (lab<first>...) that answer over SSH
    and Docker. The hosts this session used are removed with `invoke lab.down --hosts ...` at
    the end of the session, even after a failure."""
    if os.geteuid() != 0:
        pytest.skip("the lab needs root (namespaces, bridge, iptables, sshd, dockerd)")
    ensure_sshd()
    locks: dict[str, int] = {}

    def make(n: int, first: int = 1) -> list[LabHost]:
        names = [f"lab{k}" for k in range(first, first + n)]
        for name in names:  # ascending order: two sessions never wait on each other in a ring
            if name not in locks:
                locks[name] = _lock(name)
        args = ("lab.up", "--hosts", str(n), "--first", str(first))
        proc = run_invoke(*args, env=LAB_ENV, timeout=600)
        if proc.returncode != 0:
            raise AssertionError(f"invoke {' '.join(args)} failed:\n{proc.stdout}\n{proc.stderr}")
        return _hosts(lab_status(), names)

    try:
        yield make
    finally:
        try:
            if locks and os.environ.get("AIIA_LAB_KEEP") != "1":
                used = ",".join(sorted(locks, key=lambda x: int(x[3:])))
                run_invoke("lab.down", "--hosts", used, env=LAB_ENV, timeout=300)
        finally:
            for fd in locks.values():
                os.close(fd)
