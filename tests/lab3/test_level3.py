"""Level 3 (issue 15) on five real lab hosts: `invoke setup --profile 2gb-4cpu` brings the
stack up over SSH (PostgreSQL + PgBouncer on db1, Redis on cache1, prod x4 and staging x2 on
app1/app2, nginx on lb1), prod and staging answer through the load balancer from this
machine, each engine runs what the stack places there with the stack's limits, and each
host's firewall admits the database and cache ports from the app hosts only.

Slow (about 3 min from empty lab hosts: image shipping and first releases; about 1 min when
the hosts already hold the images). Run:
  flock /tmp/aiia-docker-tests.lock env PYTHONPATH=src /work/venv/bin/python -m pytest \
      tests/lab3 -q -p no:cacheprovider --durations=10
"""

from __future__ import annotations

import json
import socket
import subprocess

import pytest
import yaml

from aiia_ops import REPO_ROOT
from aiia_ops.commands.cluster import host_parts, instance_env
from aiia_ops.host.http import health_through_nginx
from aiia_ops.model import load_stack
from tests.conftest import run_invoke

pytestmark = [pytest.mark.docker, pytest.mark.e2e]

PROFILE = "2gb-4cpu"
HOSTS = {"lb1": "lab1", "db1": "lab2", "cache1": "lab3", "app1": "lab4", "app2": "lab5"}


def django_commit() -> str:
    """The release deployed: the commit of services/django (its image is built already)."""
    return subprocess.run(
        ["git", "log", "-1", "--format=%H", "--", "services/django"],
        cwd=REPO_ROOT, capture_output=True, text=True, check=True,
    ).stdout.strip()  # fmt: skip


# Keeps the images (shipping them is the setup's own step, skipped for what a host holds).
RESET = (
    "docker ps -aq | xargs -r docker rm -f; docker volume ls -q | xargs -r docker volume rm; "
    "docker network rm aiia_network 2>/dev/null; true"
)


@pytest.fixture(scope="module")
def level3(make_lab, tmp_path_factory):
    """The level-3 profile on lab1-5, each host with its own state dir (the lab's hosts
    share this machine's filesystem), set up by `invoke setup --profile`."""
    lab = {h.name: h for h in make_lab(5, first=1)}
    for host in lab.values():  # from nothing: no container, volume or network of a run before
        with host.runner() as r:
            r.run(["sh", "-c", RESET], check=False)
    root = tmp_path_factory.mktemp("level3")
    (root / "profiles").mkdir()
    (root / "stack.yml").write_text((REPO_ROOT / "deploy" / "stack.yml").read_text())
    profile = yaml.safe_load((REPO_ROOT / "deploy" / "profiles" / f"{PROFILE}.yml").read_text())
    for name, host in profile["hosts"].items():
        if host:
            assert host["address"] == lab[HOSTS[name]].address  # the profile is the lab's
            host["state_dir"] = str(root / f"state-{name}")
    (root / "profiles" / f"{PROFILE}.yml").write_text(yaml.safe_dump(profile, sort_keys=False))
    env = {
        "AIIA_STATE_DIR": str(root / "local"),
        "AIIA_SSH_KEY": str(lab["lab1"].key_path),
        "AIIA_SSH_KNOWN_HOSTS": str(lab["lab1"].known_hosts_path),
    }
    stack = str(root / "stack.yml")
    proc = run_invoke(
        "setup", "--stack", stack, "--profile", PROFILE, "--ref", django_commit(),
        env=env, timeout=900,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert "the stack is up on 5 hosts" in proc.stdout
    return {"lab": lab, "stack": load_stack(stack, PROFILE), "env": env, "path": stack}


def test_prod_and_staging_answer_through_the_load_balancer(level3):
    lb = level3["lab"]["lab1"]
    tag = django_commit()[:12]
    for name, env in level3["stack"].environments.items():
        for domain in env.domains:
            data = health_through_nginx(domain, lb.address, 443)
            assert data["http_status"] == 200, data
            assert data["environment"] == name and data["version"] == tag, data
            assert data["checks"]["database"]["ok"] and data["checks"]["cache"]["ok"], data


def test_each_engine_runs_its_placement_with_the_stacks_limits(level3):
    stack = level3["stack"]
    for part in host_parts(stack):
        expected = {s.container: s for s in part.services}
        expected |= {i.container: instance_env(i) for _, i in part.instances}
        with level3["lab"][HOSTS[part.name]].runner() as r:
            names = r.query(["docker", "ps", "--format", "{{.Names}}"]).stdout.split()
            assert sorted(names) == sorted(expected), (part.name, names)
            for name, item in expected.items():
                out = r.query(["docker", "inspect", "--format", "{{json .HostConfig}}", name])
                config = json.loads(out.stdout)
                assert config["Memory"] == item.memory.limit.bytes, (part.name, name)
                assert config["NanoCpus"] == round(item.cpu.limit * 1e9), (part.name, name)
                for ports in (config.get("PortBindings") or {}).values():
                    assert {p["HostIp"] for p in ports} == {part.address}, (name, ports)


def _answers(address: str, port: int) -> bool:
    try:
        with socket.create_connection((address, port), timeout=3):
            return True
    except OSError:
        return False


PROBE = (
    "import socket,sys\n"
    "try:\n socket.create_connection((sys.argv[1], int(sys.argv[2])), 3)\n print('open')\n"
    "except OSError:\n print('closed')\n"
)


def _answers_from(runner, address: str, port: int) -> bool:
    out = runner.query(["python3", "-c", PROBE, address, str(port)]).stdout.strip()
    assert out in ("open", "closed"), out
    return out == "open"


def test_firewall_admits_db_and_cache_ports_from_app_hosts_only(level3):
    stack, lab = level3["stack"], level3["lab"]
    db, cache = lab["lab2"].address, lab["lab3"].address
    ports = [
        (db, stack.services.postgresql.port),
        (db, stack.services.pgbouncer.port),
        (cache, stack.services.redis.port),
    ]
    for app in ("lab4", "lab5"):
        with lab[app].runner() as r:
            for address, port in ports:
                assert _answers_from(r, address, port), (app, address, port)
    with lab["lab1"].runner() as r:
        for address, port in ports:
            assert not _answers_from(r, address, port), ("lb1", address, port)
        # The load balancer reaches the app instances; this machine does not.
        assert _answers_from(r, lab["lab4"].address, 8000)
    for address, port in [*ports, (lab["lab4"].address, 8000), (lab["lab5"].address, 8002)]:
        assert not _answers(address, port), ("this machine", address, port)
    assert _answers(lab["lab1"].address, 443)
