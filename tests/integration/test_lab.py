"""The test lab on real hosts: `invoke lab.up --hosts 3` gives three namespaces, each with
its own sshd and Docker engine, reachable from this machine only through labbr0, with no
route anywhere else; `invoke lab.down` leaves nothing of it behind.

Traffic goes only to the lab's own addresses (10.77.0.x). "No route outside" is shown with
`ip route get 192.0.2.1`, which asks the kernel and sends nothing.
"""

from __future__ import annotations

import json
import re
import subprocess
import time
from pathlib import Path

import pytest

from aiia_ops.host.engine import Engine
from tests.conftest import run_invoke
from tests.lab import LAB_ENV

pytestmark = pytest.mark.docker
IMAGE = "aiia/base:trixie"  # built by `invoke provision`, small, has bash


def sh(*argv: str) -> subprocess.CompletedProcess:
    return subprocess.run(argv, capture_output=True, text=True, timeout=60)


@pytest.fixture(scope="module")
def hosts(make_lab):
    # lab11-13: lab1-10 belong to the level-3, swarm and off-site test areas, which may run
    # beside this module in another session.
    return make_lab(3, first=11)


def test_each_host_answers_over_ssh_with_its_own_engine(hosts):
    seen = {}
    for h in hosts:
        with h.runner() as r:
            info = Engine(r).info()  # `docker info` over SSH: the sshd sets DOCKER_HOST
            addrs = r.run(["ip", "-o", "-4", "addr", "show", "dev", "eth0"]).stdout
            assert f"inet {h.address}/24" in addrs  # the session runs inside that host
        seen[h.name] = (info["ID"], info["DockerRootDir"])
        assert info["DockerRootDir"] == f"/var/lib/aiia-lab/{h.name}/docker"
    ids = {engine_id for engine_id, _ in seen.values()}
    assert len(ids) == 3, seen
    # ... and none of them is this machine's engine
    root = json.loads(sh("docker", "info", "--format", "{{json .}}").stdout)
    assert root["ID"] not in ids


def test_host1_reaches_host2_sshd_but_nothing_outside(hosts):
    lab1, lab2 = hosts[0], hosts[1]
    with lab1.runner() as r:
        banner = r.run(
            ["timeout", "5", "bash", "-c", f"exec 3<>/dev/tcp/{lab2.address}/22; head -c 8 <&3"]
        )
        assert banner.stdout.startswith("SSH-2.0"), banner
        routes = r.run(["ip", "route"]).stdout
        assert routes.strip() and "default" not in routes, routes
        probe = r.query(["ip", "route", "get", "192.0.2.1"])  # asks the kernel only
        assert probe.code != 0 and "Network is unreachable" in probe.stderr, probe
    # the same seen from this machine's side, without SSH
    for h in hosts:
        assert "default" not in sh("ip", "-n", h.name, "route").stdout


def test_an_image_loaded_to_one_engine_runs_there_only(hosts):
    lab1, lab2 = hosts[0], hosts[1]
    assert sh("docker", "image", "inspect", IMAGE).returncode == 0, f"{IMAGE}: invoke provision"
    load = run_invoke("lab.load", "--image", IMAGE, "--hosts", lab2.name, env=LAB_ENV)
    assert load.returncode == 0 and f"{lab2.name}: " in load.stdout, load.stdout + load.stderr
    with lab2.runner() as r:
        out = r.run(["docker", "run", "--rm", "--network", "none", IMAGE, "echo", "hello-lab2"])
        assert out.stdout.strip() == "hello-lab2"
    with lab1.runner() as r:
        assert r.query(["docker", "image", "inspect", IMAGE]).code != 0  # another engine
    again = run_invoke("lab.load", "--image", IMAGE, "--hosts", lab2.name, env=LAB_ENV)
    assert f"{lab2.name}: present" in again.stdout


def test_lab_load_refuses_an_unknown_image_or_host(hosts):
    bad = run_invoke("lab.load", "--image", "aiia/none:nothing", env=LAB_ENV)
    assert bad.returncode == 1 and "is not in this machine's engine" in bad.stderr
    assert "Traceback" not in bad.stderr
    bad = run_invoke("lab.load", "--image", IMAGE, "--hosts", "lab99", env=LAB_ENV)
    assert bad.returncode == 1 and "no lab host lab99" in bad.stderr


def test_up_again_converges_and_restarts_a_dead_engine(hosts, make_lab):
    lab3 = hosts[2]
    known = lab3.known_hosts_path.read_text()
    pid = int(Path(f"/run/aiia-lab/{lab3.name}-dockerd.pid").read_text())
    sh("kill", str(pid))
    deadline = time.monotonic() + 30
    while sh("kill", "-0", str(pid)).returncode == 0 and time.monotonic() < deadline:
        time.sleep(0.2)
    again = make_lab(3, first=11)
    assert [h.name for h in again] == [h.name for h in hosts]
    assert lab3.known_hosts_path.read_text() == known  # same host keys: nothing regenerated
    new_pid = int(Path(f"/run/aiia-lab/{lab3.name}-dockerd.pid").read_text())
    assert new_pid != pid
    with lab3.runner() as r:
        assert Engine(r).info()["DockerRootDir"] == f"/var/lib/aiia-lab/{lab3.name}/docker"


def test_up_of_another_range_leaves_these_hosts_as_they_are(hosts, make_lab):
    """`lab.up --first 14 --hosts 1` adds lab14 and touches no daemon of lab11-13, not even a
    stopped one (a test may have stopped it on purpose)."""
    pids = {h.name: Path(f"/run/aiia-lab/{h.name}-dockerd.pid").read_text() for h in hosts}
    stopped = hosts[1]
    sh("kill", pids[stopped.name].strip())
    deadline = time.monotonic() + 30
    while sh("kill", "-0", pids[stopped.name].strip()).returncode == 0:
        assert time.monotonic() < deadline, "lab12's dockerd did not stop"
        time.sleep(0.2)
    (lab14,) = make_lab(1, first=14)
    assert lab14.address == "10.77.0.24"
    with lab14.runner() as r:
        assert Engine(r).info()["DockerRootDir"] == "/var/lib/aiia-lab/lab14/docker"
    for h in (hosts[0], hosts[2]):
        assert Path(f"/run/aiia-lab/{h.name}-dockerd.pid").read_text() == pids[h.name]
    assert sh("docker", "-H", stopped.docker_host, "version").returncode != 0  # still stopped
    known = hosts[0].known_hosts_path.read_text()
    assert all(h.address + " ssh-ed25519" in known for h in (*hosts, lab14))
    again = make_lab(3, first=11)  # and the range's own lab.up brings lab12 back
    with again[1].runner() as r:
        assert Engine(r).info()["DockerRootDir"] == "/var/lib/aiia-lab/lab12/docker"


def lab_traces(names=("lab11", "lab12", "lab13", "lab14")) -> dict[str, object]:
    """Everything of these lab hosts this machine could still hold."""
    netns = sh("ip", "netns", "list").stdout
    links = sh("ip", "-o", "link", "show").stdout
    mine = "|".join(n.removeprefix("lab") for n in names)
    runs = sh("sh", "-c", "ls -d /run/aiia-lab* /run/aiia-lab/* 2>/dev/null").stdout.split()
    mounts = Path("/proc/mounts").read_text().splitlines()
    return {
        "netns": re.findall(rf"^lab(?:{mine})\b", netns, re.M),
        "links": re.findall(rf"\d+: (vlab(?:{mine}))[@:]", links),
        "processes": [
            line
            for line in sh("ps", "-eo", "pid,args").stdout.splitlines()
            if any(f"aiia-lab/{n}/" in line or f"aiia-lab-{n}." in line for n in names)
        ],
        "sockets": [
            s for s in runs if any(f"{n}-" in s or f"-{n}." in s for n in names)
        ],
        "mounts": [m for m in mounts if any(f"aiia-lab/{n}/" in m for n in names)],
        "dir": [d for d in sh("ls", "-A", "/var/lib/aiia-lab").stdout.split() if d in names],
    }  # fmt: skip


def test_down_leaves_nothing_of_the_hosts(hosts):
    """Last in this module: the factory brings the hosts back if a later test asks for them.
    `lab.down --hosts` removes these hosts only; the bridge, the rule and the keys go with the
    last host (`invoke lab.down` without --hosts; the plan is in tests/unit)."""
    names = "lab11,lab12,lab13,lab14"
    dry = run_invoke("lab.down", "--hosts", names, "--dry-run", env=LAB_ENV, check=True)
    assert "would remove:" in dry.stdout and "[local] ip netns del lab11" in dry.stdout
    assert sh("ip", "netns", "pids", "lab11").returncode == 0  # the dry run changed nothing
    bad = run_invoke("lab.down", "--hosts", "lab99", env=LAB_ENV)
    assert bad.returncode == 1 and "no lab host lab99 is up; nothing was changed" in bad.stderr
    assert sh("ip", "netns", "pids", "lab11").returncode == 0
    down = run_invoke("lab.down", "--hosts", names, env=LAB_ENV, check=True)
    for name in names.split(","):
        assert name in down.stdout
    root_engine = sh("docker", "version", "--format", "{{.Server.Version}}")
    assert root_engine.returncode == 0  # this machine's engine was not touched
    assert lab_traces() == {
        "netns": [], "links": [], "processes": [], "sockets": [], "mounts": [], "dir": [],
    }  # fmt: skip
