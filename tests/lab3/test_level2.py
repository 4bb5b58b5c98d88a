"""Level 2 (issue 15) on one real lab host (lab5): the 1 GB profile, everything on one
server reached over SSH, set up by `invoke setup --profile` (flows/cluster.py with one
host). The engine holds each container to the profile's limits; the running programs use
the document's figures: 4 gunicorn workers for prod, PostgreSQL's shared_buffers 256 MB,
Redis grown (maxmemory 64 MB in a 144 MB container); prod answers on the host's 443.

Runs before test_level3.py (which starts by clearing lab1-5). About 3 min. Run:
  env PYTHONPATH=src /work/venv/bin/python -m pytest tests/lab3/test_level2.py -q \\
      -p no:cacheprovider
"""

from __future__ import annotations

import json

import pytest
import yaml

from aiia_ops import REPO_ROOT
from aiia_ops.commands.cluster import host_parts, instance_env
from aiia_ops.host.http import health_through_nginx
from aiia_ops.model import load_stack
from tests.conftest import run_invoke
from tests.lab3.test_level3 import RESET, django_commit

pytestmark = [pytest.mark.docker, pytest.mark.e2e]

PROFILE = "1gb-lab"


@pytest.fixture(scope="module")
def level2(make_lab, tmp_path_factory):
    (host,) = make_lab(1, first=5)
    with host.runner() as r:
        r.run(["sh", "-c", RESET], check=False)
    root = tmp_path_factory.mktemp("level2")
    (root / "profiles").mkdir()
    (root / "stack.yml").write_text((REPO_ROOT / "deploy" / "stack.yml").read_text())
    profile = yaml.safe_load((REPO_ROOT / "deploy" / "profiles" / "1gb.yml").read_text())
    # The shipped level-2 profile as is, on a server of its own: the lab host.
    profile["hosts"] = {
        "local": {"ssh": host.spec, "address": host.address, "state_dir": str(root / "box")}
    }
    (root / "profiles" / f"{PROFILE}.yml").write_text(yaml.safe_dump(profile, sort_keys=False))
    env = {
        "AIIA_STATE_DIR": str(root / "local"),
        "AIIA_SSH_KEY": str(host.key_path),
        "AIIA_SSH_KNOWN_HOSTS": str(host.known_hosts_path),
    }
    stack = str(root / "stack.yml")
    proc = run_invoke(
        "setup", "--stack", stack, "--profile", PROFILE, "--ref", django_commit(),
        env=env, timeout=900,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert "the stack is up on 1 hosts" in proc.stdout
    return {"host": host, "stack": load_stack(stack, PROFILE), "env": env, "path": stack}


def test_level_2_serves_prod_and_staging_on_its_one_host(level2):
    for name, env in level2["stack"].environments.items():
        data = health_through_nginx(env.domains[0], level2["host"].address, 443)
        assert data["http_status"] == 200 and data["environment"] == name, data


def test_the_engine_holds_each_container_to_the_profiles_limits(level2):
    stack = level2["stack"]
    (part,) = host_parts(stack)
    expected = {s.container: s for s in part.services}
    expected |= {i.container: instance_env(i) for _, i in part.instances}
    assert stack.services.redis.memory.limit.bytes == 144 * 2**20  # grown from level 1
    with level2["host"].runner() as r:
        for name, item in expected.items():
            out = r.query(["docker", "inspect", "--format", "{{json .HostConfig}}", name])
            config = json.loads(out.stdout)
            assert config["Memory"] == item.memory.limit.bytes, name
            assert config["NanoCpus"] == round(item.cpu.limit * 1e9), name
            state = r.query(["docker", "inspect", "--format", "{{.State.OOMKilled}}", name])
            assert state.stdout.strip() == "false", name


def test_the_running_programs_use_the_documents_level_2_figures(level2):
    stack = level2["stack"]
    with level2["host"].runner() as r:
        pg = stack.services.postgresql.container
        # As the container's user (aiia: peer authentication), the way ensure-database does.
        shown = r.query(
            ["docker", "exec", pg, "psql", "-X", "-At", "-d", "postgres", "-c",
             "SHOW shared_buffers"]
        )  # fmt: skip
        assert shown.stdout.strip() == "256MB", shown.stdout + shown.stderr
        for env, workers in (("prod", 4), ("staging", 1)):
            container = stack.environments[env].container
            top = r.query(["docker", "top", container, "-o", "pid,args"]).stdout
            gunicorn = [line for line in top.splitlines() if "gunicorn" in line]
            assert len(gunicorn) == 1 + workers, (env, top)  # the master and its workers
        redis = stack.services.redis.container
        conf = r.query(["docker", "exec", redis, "cat", "/etc/aiia/redis.conf"]).stdout
        assert f"maxmemory {64 * 2**20}" in conf.splitlines(), conf[-2000:]
