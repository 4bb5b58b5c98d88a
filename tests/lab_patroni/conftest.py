"""The replicated-database tests: Patroni + etcd + HAProxy on lab15-17 (tests/lab.py), made
by the tasks people run (`invoke db.build`, `db.up` with AIIA_PROFILE=patroni-lab), with a
state dir of their own (the cluster's secrets). Clients run in throwaway containers of the
same image on this machine's engine, in this machine's network: the app's place."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

from aiia_ops.commands import patroni as p
from aiia_ops.host.secrets import load_named, load_secrets
from aiia_ops.model import load_stack
from tests.conftest import run_invoke
from tests.lab import make_lab  # noqa: F401  (real hosts: namespaces with sshd and dockerd)

FIRST, HOSTS = 15, 3
LAB_DIR = "/var/lib/aiia-lab"
TASK_ENV = ("AIIA_PROFILE", "AIIA_STATE_DIR", "AIIA_SSH_KEY", "AIIA_SSH_KNOWN_HOSTS",
            "AIIA_LAB_DIR")  # fmt: skip


def load_average() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def streaming_all(cluster, timeout: float = 180) -> dict:
    """db.status once one leader runs and every other member streams from it."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        st = cluster.status()
        members = st["members"]
        leaders = [m for m in members if m["role"] == "Leader" and m["state"] == "running"]
        streaming = [m for m in members if m["role"] != "Leader" and m["state"] == "streaming"]
        if len(leaders) == 1 and len(streaming) == len(cluster.hosts) - 1:
            return st
        time.sleep(1)
    raise AssertionError(f"not every replica streaming within {timeout}s: {cluster.status()}")


def rejoin_as_replica(cluster, old: str, same: str) -> tuple[float, dict]:
    """`invoke db.up` brings the old primary `old` back: it must stream from the leader on
    the leader's timeline, and `same` (a query) must give the same answer on both within
    30 s (what the old primary had alone was rewound away). (seconds taken, its row)."""
    started = time.monotonic()
    invoke("db.up", timeout=600)
    st = streaming_all(cluster)
    took = time.monotonic() - started
    row = next(m for m in st["members"] if m["name"] == old)
    lead = next(m for m in st["members"] if m["role"] == "Leader")
    assert row["role"] == "Replica" and row["state"] == "streaming", st
    assert row["timeline"] == lead["timeline"], st
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        mine, theirs = cluster.local_sql(old, same), cluster.local_sql(lead["name"], same)
        if mine == theirs:
            break
        time.sleep(1)
    assert mine == theirs, (mine, theirs)
    return took, row


def invoke(*args: str, timeout: float = 900) -> subprocess.CompletedProcess:
    return run_invoke(*args, check=True, timeout=timeout)


class Cluster:
    """The cluster as a test uses it: members, image, clients, Patroni's view."""

    def __init__(self, hosts, state: Path):
        self.hosts = {h.name: h for h in hosts}
        self.state = state
        self.stack = load_stack()
        self.image = invoke("db.tag").stdout.strip()
        envs = load_secrets(state, list(self.stack.environments), create=False)
        self.db_password = envs.environments["prod"].db_password
        self.secrets = load_named(state, "patroni", p.SECRET_KEYS, create=False)
        self.r = self.stack.replication

    @property
    def addresses(self) -> list[str]:
        return [h.address for h in self.hosts.values()]

    def status(self) -> dict:
        return json.loads(invoke("db.status", "--json", timeout=120).stdout)

    def leader(self) -> str:
        return next(m["name"] for m in self.status()["members"] if m["role"] == "Leader")

    def docker(self, name: str, *args: str, input: str | None = None, timeout: float = 60):
        """`docker` on lab host `name`'s own engine."""
        return subprocess.run(
            ["docker", "-H", self.hosts[name].docker_host, *args], input=input,
            capture_output=True, text=True, timeout=timeout,
        )  # fmt: skip

    def local_sql(self, name: str, sql: str, database: str = "aiia_prod") -> str:
        """psql as the superuser inside member `name`'s container (its own server)."""
        out = self.docker(name, *p.psql_argv(database, sql)[1:])
        assert out.returncode == 0, f"{name}: {out.stderr}"
        return out.stdout.strip()

    def client_env(self, port: int, hosts: list[str] | None = None) -> dict:
        return {**os.environ, "PGHOST": ",".join(hosts or self.addresses), "PGPORT": str(port),
                "PGUSER": "aiia_prod", "PGDATABASE": "aiia_prod", "PGPASSWORD": self.db_password,
                "PGCONNECT_TIMEOUT": "2"}  # fmt: skip

    def client(self, port: int, *args: str, hosts=None, timeout: float = 120):
        """A command of the image (psql, db-probe) as the app's role, through HAProxy."""
        argv = p.client_argv(self.image, *args)
        out = subprocess.run(argv, env=self.client_env(port, hosts), capture_output=True,
                             text=True, timeout=timeout)  # fmt: skip
        assert out.returncode == 0, out.stderr
        return out.stdout.strip()

    def sql(self, port: int, sql: str, hosts=None) -> str:
        return self.client(port, "psql", "-X", "-q", "-At", "-v", "ON_ERROR_STOP=1", "-c", sql,
                           hosts=hosts)  # fmt: skip


@pytest.fixture(scope="package")
def cluster(make_lab):  # noqa: F811
    hosts = make_lab(HOSTS, first=FIRST)
    saved = {k: os.environ.get(k) for k in TASK_ENV}
    root = Path(tempfile.mkdtemp(prefix="aiia-patroni-"))
    os.environ.update(AIIA_PROFILE="patroni-lab", AIIA_STATE_DIR=str(root / "state"),
                      AIIA_SSH_KEY=str(hosts[0].key_path),
                      AIIA_SSH_KNOWN_HOSTS=str(hosts[0].known_hosts_path),
                      AIIA_LAB_DIR=LAB_DIR)  # fmt: skip
    try:
        invoke("db.down", "--wipe", "--yes")  # a cluster a killed run left
        invoke("db.build", timeout=1800)
        invoke("db.up", timeout=900)
        yield Cluster(hosts, root / "state")
    finally:
        if os.environ.get("AIIA_E2E_KEEP") != "1":
            run_invoke("db.down", "--wipe", "--yes", timeout=300)
            shutil.rmtree(root, ignore_errors=True)
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
