"""The engine `invoke provision` leaves behind: it answers, has compose v2, enforces memory
limits, and `aiia/base:trixie` carries the shared non-root user."""

from __future__ import annotations

import subprocess

import pytest

pytestmark = pytest.mark.docker

MIB_64 = 64 * 1024 * 1024


def docker(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["docker", *args], capture_output=True, text=True, timeout=timeout, check=False
    )


@pytest.fixture(scope="module", autouse=True)
def engine() -> str:
    try:
        result = docker("version", "--format", "{{.Server.Version}}", timeout=15)
    except FileNotFoundError:
        pytest.skip("no docker client: run `invoke provision` first")
    if result.returncode != 0:
        pytest.skip(f"no Docker engine answers ({result.stderr.strip()}): run `invoke provision`")
    return result.stdout.strip()


def test_engine_answers(engine):
    info = docker("info", "--format", "{{.ServerVersion}} {{.Driver}}")
    assert info.returncode == 0, info.stderr
    version, driver = info.stdout.split()
    assert version == engine
    assert driver == "overlay2"


def test_compose_is_v2():
    result = docker("compose", "version", "--short")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().lstrip("v").startswith("2.")


def test_memory_limit_is_seen_inside_a_container():
    # cgroup v2 exposes memory.max, cgroup v1 memory/memory.limit_in_bytes.
    read = (
        "cat /sys/fs/cgroup/memory.max 2>/dev/null"
        " || cat /sys/fs/cgroup/memory/memory.limit_in_bytes"
    )
    result = docker("run", "--rm", "-m", "64m", "aiia/base:trixie", "sh", "-c", read)
    assert result.returncode == 0, result.stderr
    assert int(result.stdout.strip()) == MIB_64


def test_base_image_has_user_aiia_with_uid_and_gid_10001():
    result = docker("run", "--rm", "--user", "aiia", "aiia/base:trixie", "sh", "-c", "id -u; id -g")
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["10001", "10001"]


def test_base_image_is_small_and_speaks_utf8():
    env = docker(
        "image", "inspect", "--format", "{{json .Config.Env}} {{.Size}}", "aiia/base:trixie"
    )
    assert env.returncode == 0, env.stderr
    config, size = env.stdout.rsplit(" ", 1)
    assert '"LANG=C.UTF-8"' in config
    assert int(size) < 150 * 1024 * 1024
    result = docker("run", "--rm", "aiia/base:trixie", "sh", "-c", "ls /usr/share/man | wc -l")
    assert result.stdout.strip() == "0"
