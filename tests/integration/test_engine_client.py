"""The one engine client (host/engine.py) against the real engine, on this machine and over
SSH (a real OpenSSH server on 127.0.0.1, tests/sshd.py): both read the same facts, and
`invoke status --host user@address:port` prints the stack over SSH."""

from __future__ import annotations

import json
import subprocess
import uuid

import pytest

from aiia_ops.host.engine import Engine
from aiia_ops.host.runners import LocalRunner
from aiia_ops.host.ssh import SSHRunner
from tests.conftest import run_invoke

pytestmark = pytest.mark.docker

BASE = "aiia/base:trixie"
MIB_64 = 64 * 2**20


def docker(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["docker", *args], capture_output=True, text=True, timeout=timeout, check=False
    )


@pytest.fixture
def container():
    if docker("image", "inspect", BASE).returncode != 0:
        pytest.skip(f"{BASE} is not built: run `invoke provision`")
    name = f"aiia-engine-test-{uuid.uuid4().hex[:8]}"
    started = docker(
        "run", "-d", "--name", name, "--memory", "64m", "--cpus", "0.5", BASE,
        "sh", "-c", "head -c 20000000 /dev/zero | tail -c 1 >/dev/null; sleep 120",
    )  # fmt: skip
    assert started.returncode == 0, started.stderr
    yield name
    docker("rm", "--force", name)


@pytest.fixture
def ssh(sshd_host):
    with SSHRunner(
        sshd_host.spec,
        host="test",
        key_filename=sshd_host.key_path,
        known_hosts=sshd_host.known_hosts_path,
    ) as runner:
        yield runner


def test_local_and_ssh_engines_read_the_same_container(container, ssh):
    local, remote = Engine(LocalRunner()), Engine(ssh)
    assert local.info()["ID"] == remote.info()["ID"]
    here, there = local.inspect([container])[container], remote.inspect([container])[container]
    assert here == there
    assert (here.running, here.memory_limit, here.cpu_limit) == (True, MIB_64, 0.5)
    for engine in (local, remote):
        usage = engine.usage({container: here.id})[container]
        assert usage.source.startswith("cgroup")  # read from the files, not docker stats
        assert 0 < usage.memory_used < MIB_64
        assert usage.memory_limit == MIB_64
        assert usage.cpu_ns > 0
        assert engine.exec(container, ["echo", "hi"], 5).stdout == "hi\n"
    assert local.inspect(["aiia-no-such-container"]) == {}


def test_invoke_status_over_ssh(sshd_host):
    env = {"AIIA_SSH_KEY": str(sshd_host.key_path),
           "AIIA_SSH_KNOWN_HOSTS": str(sshd_host.known_hosts_path)}  # fmt: skip
    local = run_invoke("status", "--json", timeout=120)
    remote = run_invoke("status", "--json", "--host", sshd_host.spec, env=env, timeout=120)
    assert local.returncode == 0, local.stderr
    assert remote.returncode == 0, remote.stderr
    facts = lambda out: [(r["service"], r["state"], r["image"]) for r in json.loads(out)]  # noqa: E731
    assert facts(remote.stdout) == facts(local.stdout)
