"""invoke loadtest: wrk against the stack on this machine, with ceilings, stats and charts.

The pure part (scenarios, the wrk script, parsing, the report, the charts) is
aiia_ops.commands.loadtest; this module only runs things: wrk, the engine's stats stream, the bare
app of the ceiling, and HTTPS requests that seed the data.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import secrets
import shutil
import socket
import ssl
import subprocess
import sys
import tempfile
import threading
import time
from datetime import UTC, datetime
from pathlib import Path

from aiia_ops import REPO_ROOT
from aiia_ops.commands import loadtest as lt
from aiia_ops.commands.compose import CONFIG_MOUNT, config_dir_name, service_key
from aiia_ops.commands.docker import nginx_reload, one_off_app
from aiia_ops.errors import OpsError
from aiia_ops.flows.deploy import inspect_release
from aiia_ops.flows.output import table
from aiia_ops.host.git import head_version
from aiia_ops.host.runners import LocalRunner
from aiia_ops.model import Environment, Stack, load_stack
from aiia_ops.model.state import StateDir, local_state_dir
from aiia_ops.tasks.common import task

BARE_CONF = "zz-loadtest-bare.conf"  # in nginx's conf.d while a run measures the ceiling
SETTLE_S = 3  # pause between phases: connections close, queues drain


# --- HTTPS to 127.0.0.1 with a chosen SNI and Host -----------------------------------


def https_request(
    domain: str,
    port: int,
    path: str,
    method: str = "GET",
    body: bytes | None = None,
    headers: dict | None = None,
    timeout: float = 10,
) -> tuple[int, bytes]:
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE  # the certificate may be the self-signed placeholder
    raw = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    conn = http.client.HTTPSConnection("127.0.0.1", port, timeout=timeout, context=context)
    conn.sock = context.wrap_socket(raw, server_hostname=domain)
    try:
        conn.request(method, path, body=body, headers={"Host": domain, **(headers or {})})
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


# --- the write token -------------------------------------------------------------------


def write_token(state: StateDir, env: Environment) -> str | None:
    """API_WRITE_TOKEN as the app container gets it (its 0600 env file), else from the
    environment's secrets file. Never printed."""
    candidates = [
        state.env_files / f"{service_key(env)}.env",
        state.secrets / f"{env.name}.env",
    ]
    for path in candidates:
        with contextlib.suppress(OSError):
            for line in path.read_text().splitlines():
                key, _, value = line.partition("=")
                if key.strip() == "API_WRITE_TOKEN" and value.strip():
                    return value.strip()
    return os.environ.get("AIIA_API_WRITE_TOKEN") or None


# --- the engine's stats stream, one thread per container --------------------------------


class StatsSampler:
    """Reads each container's stats stream (one entry a second) until stopped."""

    def __init__(self, containers: list[str]):
        import docker

        self.client = docker.from_env(version="auto", timeout=30, max_pool_size=len(containers) + 4)
        self.containers = containers
        self.samples: list[lt.Sample] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []

    def _read(self, name: str) -> None:
        try:
            container = self.client.containers.get(name)
            for raw in container.stats(stream=True, decode=True):
                if self._stop.is_set():
                    break
                sample = lt.parse_stats(name, raw, time.time())
                if sample:
                    with self._lock:
                        self.samples.append(sample)
        except Exception as exc:  # a container that stops mid-run: the report shows the gap
            print(f"   stats of {name} stopped: {exc.__class__.__name__}", flush=True)

    def add(self, name: str) -> None:
        t = threading.Thread(target=self._read, args=(name,), daemon=True)
        t.start()
        self._threads.append(t)

    def __enter__(self) -> StatsSampler:
        for name in self.containers:
            self.add(name)
        time.sleep(2.5)  # the first entry of each stream carries no CPU delta
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(timeout=5)


# --- integrity: nothing restarted, nothing OOM-killed -----------------------------------


def _inspect(name: str) -> dict | None:
    proc = subprocess.run(
        ["docker", "inspect", "--type", "container", name], capture_output=True, text=True
    )
    if proc.returncode != 0:
        return None
    return json.loads(proc.stdout)[0]


def _oom_kills(container_id: str) -> int | None:
    """The kernel's count of OOM kills inside the container's memory cgroup (v1)."""
    for base in ("/sys/fs/cgroup/memory/docker", "/sys/fs/cgroup/memory/system.slice"):
        for name in (container_id, f"docker-{container_id}.scope"):
            path = Path(base) / name / "memory.oom_control"
            with contextlib.suppress(OSError):
                for line in path.read_text().splitlines():
                    if line.startswith("oom_kill "):
                        return int(line.split()[1])
    return None


def integrity_snapshot(containers: list[str]) -> dict:
    out = {}
    for name in containers:
        data = _inspect(name)
        if data is None:
            out[name] = {"present": False}
            continue
        state = data["State"]
        out[name] = {
            "present": True,
            "running": state.get("Running", False),
            "started_at": state.get("StartedAt"),
            "restart_count": data.get("RestartCount", 0),
            "oom_killed": state.get("OOMKilled", False),
            "oom_kills": _oom_kills(data["Id"]),
        }
    return out


WORKER_TROUBLE = ("WORKER TIMEOUT", "was sent SIGKILL", "out of memory", "Worker failed to boot")


def app_log_trouble(container: str, since: float) -> dict[str, int]:
    proc = subprocess.run(
        ["docker", "logs", "--since", str(int(since)), container], capture_output=True, text=True
    )
    text = proc.stdout + proc.stderr
    return {p: text.count(p) for p in WORKER_TROUBLE if p in text}


def integrity_report(before: dict, after: dict, app_trouble: dict) -> dict:
    problems = []
    for name, b in before.items():
        a = after.get(name, {"present": False})
        if not b.get("present"):
            continue
        if not a.get("present") or not a.get("running"):
            problems.append(f"{name} is no longer running")
        elif a["started_at"] != b["started_at"] or a["restart_count"] != b["restart_count"]:
            problems.append(f"{name} restarted")
        if a.get("oom_killed") and not b.get("oom_killed"):
            problems.append(f"{name}: the engine reports OOMKilled")
        if (a.get("oom_kills") or 0) > (b.get("oom_kills") or 0):
            problems.append(f"{name}: {a['oom_kills'] - b['oom_kills']} process(es) OOM-killed")
    for name, trouble in app_trouble.items():
        for what, n in trouble.items():
            problems.append(f"{name} log: {what!r} x{n}")
    return {"ok": not problems, "problems": problems, "before": before, "after": after}


# --- the ceiling's bare app ---------------------------------------------------------------


def bare_address(stack: Stack) -> str:
    """A fixed free address in the stack's subnet for the bare app (x.y.0.30)."""
    return str(stack.network.subnet.network_address + 30)


def bare_container_name(stack: Stack) -> str:
    return f"{stack.project}_loadtest_bare"


def bare_run_argv(stack: Stack, env: Environment, state: StateDir, image: str, app_dir: Path):
    """The bare app with the environment's gunicorn config, limits and network."""
    return [
        "docker", "run", "--detach", "--rm", "--name", bare_container_name(stack),
        "--network", stack.network.name, "--ip", bare_address(stack),
        "--memory", str(env.memory.limit.bytes),
        "--memory-swap", str(env.memory.limit.bytes),
        "--cpus", f"{env.cpu.limit:g}",
        "--cpu-shares", str(max(2, round(1024 * env.cpu.reservation))),
        "--no-healthcheck",
        "--label", f"org.eduaiia.stack={stack.project}",
        "--label", "org.eduaiia.service=loadtest_bare",
        "--mount", f"type=bind,source={app_dir},target=/loadtest,readonly",
        "--mount", f"type=bind,source={state.config / config_dir_name(env)},"
        f"target={CONFIG_MOUNT},readonly",
        image,
        "gunicorn", "-c", f"{CONFIG_MOUNT}/gunicorn.conf.py", "--pythonpath", "/loadtest",
        "bare:application",
    ]  # fmt: skip


@contextlib.contextmanager
def bare_ceiling(stack: Stack, env: Environment, state: StateDir, runner: LocalRunner, port: int):
    live = inspect_release(runner, stack, env.container)
    if live is None or not live.running:
        raise OpsError(f"{env.container} is not running; run invoke setup --env={env.name}")
    image = f"{env.image}:{live.release}"
    app_dir = Path(tempfile.mkdtemp(prefix="aiia-loadtest-bare-"))
    os.chmod(app_dir, 0o755)
    (app_dir / "bare.py").write_text(lt.BARE_APP)
    os.chmod(app_dir / "bare.py", 0o644)
    conf = state.config / "nginx" / "conf.d" / BARE_CONF
    name = bare_container_name(stack)
    runner.run(["docker", "rm", "--force", name], check=False)
    try:
        runner.run(bare_run_argv(stack, env, state, image, app_dir))
        conf.write_text(lt.bare_vhost_conf(stack, env, bare_address(stack)))
        for argv in nginx_reload(stack):
            runner.run(argv)
        _wait_for(lt.BARE_DOMAIN, port, "/")
        yield name
    finally:
        conf.unlink(missing_ok=True)
        for argv in nginx_reload(stack):
            runner.run(argv, check=False)
        runner.run(["docker", "rm", "--force", name], check=False)
        shutil.rmtree(app_dir, ignore_errors=True)


def _wait_for(domain: str, port: int, path: str, seconds: float = 30) -> None:
    deadline = time.monotonic() + seconds
    last = ""
    while time.monotonic() < deadline:
        try:
            status, _ = https_request(domain, port, path, timeout=5)
            if status == 200:
                return
            last = f"HTTP {status}"
        except OSError as exc:
            last = exc.__class__.__name__
        time.sleep(0.5)
    raise OpsError(f"https://{domain}{path} on 127.0.0.1:{port} did not answer 200 ({last})")


# --- data the scenarios need ----------------------------------------------------------------


def seed(domain: str, port: int, token: str | None) -> tuple[str, ...]:
    """The courses detail reads pick from: created once (same slugs every run)."""
    slugs = lt.seed_slugs()
    for slug in slugs:
        status, _ = https_request(domain, port, f"/api/courses/{slug}/")
        if status == 200:
            continue
        if not token:
            raise OpsError(
                f"course {slug} does not exist and no API_WRITE_TOKEN is available to create "
                "it (the app refuses writes without one; see docs/performance.md)"
            )
        status, body = https_request(
            domain,
            port,
            "/api/courses/",
            "POST",
            json.dumps(lt.seed_course(slug)).encode(),
            {"Content-Type": "application/json", "Authorization": f"Bearer {token}"},
        )
        if status not in (201, 400):  # 400: created meanwhile (duplicate slug)
            raise OpsError(f"seeding {slug}: HTTP {status} {body[:200]!r}")
    return slugs


def check_static(domain: str, port: int) -> None:
    for path in lt.STATIC_FILES:
        status, _ = https_request(domain, port, path)
        if status != 200:
            raise OpsError(
                f"{path} answers HTTP {status}; the load test needs the collected static "
                "files (invoke setup runs collectstatic)"
            )


def cleanup(runner: LocalRunner, stack: Stack, env: Environment, state: StateDir) -> None:
    live = inspect_release(runner, stack, env.container)
    if live is None or not live.release:
        return
    argv = one_off_app(stack, env, str(state.root), live.release, lt.cleanup_args())
    result = runner.run(argv, check=False, timeout=300)
    deleted = result.stdout.strip().splitlines()[-1:] if result.ok else []
    if not result.ok:
        print(f"   could not delete the load test's courses: {result.stderr.strip()[-300:]}")
    elif deleted and deleted[0] != "0":
        print(f"-> deleted {deleted[0]} rows the load test's writes had created", flush=True)


# --- wrk --------------------------------------------------------------------------------------


def require_wrk(runner: LocalRunner) -> str:
    """wrk from the distribution; installed here (root + apt) like provision installs Docker."""
    path = shutil.which("wrk")
    if path:
        return path
    if os.geteuid() == 0 and shutil.which("apt-get"):
        print("-> installing wrk (Debian package)", flush=True)
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        if not runner.run(["apt-get", "install", "-y", "-qq", "wrk"], check=False, env=env).ok:
            runner.run(["apt-get", "update", "-qq"], env=env)
            runner.run(["apt-get", "install", "-y", "-qq", "wrk"], env=env)
        path = shutil.which("wrk")
    if not path:
        raise OpsError("wrk is not installed; on Debian/Ubuntu: apt-get install wrk")
    return path


def _loadavg() -> tuple[float, float, float]:
    a, b, c = os.getloadavg()
    return (round(a, 2), round(b, 2), round(c, 2))


def run_wrk(script_text: str, argv_of, timeout: float) -> tuple[str, int]:
    """Write the script to a 0600 file (it may hold the write token), run wrk, delete it."""
    fd, path = tempfile.mkstemp(prefix="aiia-loadtest-", suffix=".lua")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(script_text)
        proc = subprocess.run(argv_of(path), capture_output=True, text=True, timeout=timeout)
        return proc.stdout + proc.stderr, proc.returncode
    finally:
        os.unlink(path)


def prove_no_lookup(port: int) -> None:
    """wrk must never resolve the URL's name: a probe whose name cannot resolve (.invalid)
    must still run (its connection goes to 127.0.0.1; nginx refuses the unknown name)."""
    target = lt.Target(domain=lt.PROBE_DOMAIN, port=port)
    script = lt.lua_script(lt.CEILINGS["nginx-static"], target, "probe")
    out, code = run_wrk(
        script, lambda p: lt.wrk_argv(1, 1, p, target.url(), threads=1, timeout=2), 30
    )
    if code != 0 or "AIIA_LOADTEST " not in out:
        raise OpsError(
            "wrk did not take the script's name resolution (it would look the domain up); "
            f"refusing to send load. wrk said:\n{out[-1000:]}"
        )


@task(
    help={
        "env": "environment to load: prod or staging",
        "users": "concurrent users (keep-alive connections without think time); "
        "a list like 10,50,100,200,400 runs a growth series",
        "duration": "seconds per scenario run",
        "scenario": f"one of: {', '.join(lt.SCENARIOS)}",
        "ceilings": "also measure the ceilings (nginx static file, bare gunicorn) at each "
        "number of users (default on)",
        "ceiling_duration": "seconds per ceiling run",
        "threads": "wrk threads",
        "timeout": "seconds after which wrk counts a request as timed out",
        "out": "folder for the JSON report and the SVG chart (default docs/loadtest)",
    }
)
def loadtest(
    c,
    env="prod",
    users="100",
    duration=60,
    scenario="mixed",
    ceilings=True,
    ceiling_duration=15,
    threads=2,
    timeout=5,
    out=None,
    stack=None,
):
    """Load the stack on this machine with wrk from 127.0.0.1; report, JSON and SVG chart."""
    command = " ".join(["invoke", *sys.argv[1:]]) if sys.argv[1:] else "invoke loadtest"
    model = load_stack(stack)
    state = local_state_dir(model)
    target_env = model.environment(env)
    sc = lt.scenario(scenario)
    steps = lt.parse_users(users)
    duration, ceiling_duration = int(duration), int(ceiling_duration)
    threads, timeout = int(threads), int(timeout)
    if not 1 <= duration <= 600 or not 1 <= ceiling_duration <= 600:
        raise OpsError("--duration and --ceiling-duration must be 1 to 600 seconds")
    runner = LocalRunner()
    require_wrk(runner)
    nginx = model.services.nginx
    for name in (nginx.container, target_env.container):
        info = _inspect(name)
        if not info or not info["State"].get("Running"):
            raise OpsError(f"{name} is not running; start the stack: invoke setup --env={env}")
    port = model.local_host.published(443)
    domain = target_env.domains[0]
    out_dir = Path(out) if out else REPO_ROOT / "docs" / "loadtest"

    print(f"-> {lt.CONDITIONS}", flush=True)
    prove_no_lookup(port)
    token = write_token(state, target_env)
    if sc.writes and not token:
        raise OpsError(
            f"the {sc.name} scenario writes, and no API_WRITE_TOKEN reaches "
            f"{target_env.container} (its env file {state.env_files}/"
            f"{service_key(target_env)}.env has none): the app refuses every write. "
            "Use --scenario reads, or pass the token to the app (docs/performance.md)."
        )
    check_static(domain, port)
    cleanup(runner, model, target_env, state)
    slugs = seed(domain, port, token)
    target = lt.Target(domain=domain, port=port, detail_slugs=slugs, token=token)
    bare_target = lt.Target(domain=lt.BARE_DOMAIN, port=port)

    containers = {c.container: service_key(c) for c in model.containers()}
    running = {
        n: k
        for n, k in containers.items()
        if ((_inspect(n) or {}).get("State") or {}).get("Running")
    }
    limits = {
        c.container: (c.cpu.limit, c.memory.limit.bytes)
        for c in model.containers()
        if c.container in running
    }
    log_path = state.root / "logs" / "nginx" / "access.log"
    log_offset = log_path.stat().st_size if log_path.exists() else 0
    run_id = secrets.token_hex(3)
    raw_phases: list[dict] = []
    before = integrity_snapshot(list(running))
    started = time.time()

    def phase(sc_: lt.Scenario, kind: str, n: int, seconds: int, tgt: lt.Target) -> None:
        url = tgt.url()
        script = lt.lua_script(sc_, tgt, f"{run_id}{n}", seed=n)
        print(f"-> {sc_.name}: {n} users for {seconds}s", flush=True)
        load_before = _loadavg()
        t0 = time.time()
        text, code = run_wrk(
            script,
            lambda p: lt.wrk_argv(n, seconds, p, url, threads=threads, timeout=timeout),
            seconds + 60,
        )
        t1 = time.time()
        if code != 0:
            raise OpsError(f"wrk failed ({code}):\n{text[-2000:]}")
        result = lt.parse_wrk(text)
        print(
            f"   {result.rps:,.0f} req/s, p95 {result.latency_ms['p95']:.1f} ms, "
            f"errors {result.error_count}; load average {load_before[0]:.1f}",
            flush=True,
        )
        raw_phases.append(
            {
                "scenario": sc_,
                "kind": kind,
                "users": n,
                "duration": seconds,
                "t0": t0,
                "t1": t1,
                "load": (load_before, _loadavg()),
                "wrk": result,
            }
        )
        time.sleep(SETTLE_S)

    with StatsSampler(list(running)) as sampler:
        bare = (
            bare_ceiling(model, target_env, state, runner, port)
            if ceilings
            else contextlib.nullcontext()
        )
        with bare as bare_name:
            if bare_name:
                sampler.add(bare_name)
                running_all = {**running, bare_name: "loadtest_bare"}
                limits[bare_name] = (target_env.cpu.limit, target_env.memory.limit.bytes)
            else:
                running_all = dict(running)
            time.sleep(2)
            for n in steps:
                if ceilings:
                    phase(lt.CEILINGS["nginx-static"], "ceiling", n, ceiling_duration, target)
                    phase(lt.CEILINGS["bare-gunicorn"], "ceiling", n, ceiling_duration, bare_target)
                phase(sc, "scenario", n, duration, target)
        samples = list(sampler.samples)

    after = integrity_snapshot(list(running))
    cleanup(runner, model, target_env, state)
    trouble = {
        name: t
        for name in running
        if name in {e.container for e in model.environments.values()}
        for t in [app_log_trouble(name, started)]
        if t
    }
    integrity = integrity_report(before, after, trouble)
    # nginx writes its access log in 32 KB chunks, at least every access_log_flush.
    time.sleep(nginx.settings.access_log_flush.seconds + 1)
    lines = _read_log(log_path, log_offset)

    phases = []
    stack_containers = set(running)
    for raw in raw_phases:
        sc_: lt.Scenario = raw["scenario"]
        vhosts = {lt.BARE_DOMAIN} if sc_.vhost == "bare" else {domain}
        services = running_all if sc_.vhost == "bare" else running
        phases.append(
            lt.Phase(
                name=sc_.name,
                kind=raw["kind"],
                users=raw["users"],
                duration_s=raw["duration"],
                started=raw["t0"],
                ended=raw["t1"],
                loadavg_before=raw["load"][0],
                loadavg_after=raw["load"][1],
                wrk=raw["wrk"],
                seconds=lt.timeseries(lines, raw["t0"], raw["t1"], vhosts),
                statuses=lt.status_counts(lines, raw["t0"], raw["t1"], vhosts),
                usage=lt.usage(samples, raw["t0"], raw["t1"], services, limits),
                stack_memory_peak=lt.stack_memory_peak(
                    samples, raw["t0"], raw["t1"], stack_containers
                ),
                memory_series=lt.memory_series(samples, raw["t0"], raw["t1"], services),
            )
        )
    machine = {
        "cpus": os.cpu_count(),
        "date_utc": datetime.now(UTC).isoformat(timespec="seconds"),
        "commit": head_version(),
        "stack_file": model.source,
        "other_containers_running": _other_containers(model.project),
        "loadavg_at_start": list(raw_phases[0]["load"][0]) if raw_phases else [],
        "load_tool": _wrk_version(),
    }
    report = lt.report_dict(command, env, phases, machine, integrity)
    out_dir.mkdir(parents=True, exist_ok=True)
    base = f"{sc.name}-{steps[0]}u" if len(steps) == 1 else f"growth-{sc.name}"
    json_path = out_dir / f"{base}.json"
    svg_path = out_dir / f"{base}.svg"
    json_path.write_text(json.dumps(report, indent=1) + "\n")
    if len(steps) == 1:
        svg_path.write_text(lt.render_run_svg(report, sc.name, steps[0]))
    else:
        svg_path.write_text(lt.render_growth_svg(report, sc.name))
    print_report(report, sc.name)
    print(f"\nreport: {_rel(json_path)}\nchart:  {_rel(svg_path)}")
    if not integrity["ok"]:
        raise OpsError("during the run: " + "; ".join(integrity["problems"]))


def print_report(report: dict, scenario_name: str) -> None:
    print(f"\n{report['conditions']}")
    headers, rows = lt.summary_rows(report)
    print(table(headers, rows))
    for p in report["phases"]:
        if p["name"] == scenario_name:
            print(
                f"\n{p['name']}, {p['users']} users: containers during the run "
                f"(first to give: {lt.first_to_give(p)})"
            )
            h, r = lt.container_rows(p)
            print(table(h, r))
            st = p["statuses"]
            total = sum(st["by_status"].values())
            print(
                f"answers by status {st['by_status']}; {st['answered_by_app']} of {total} "
                f"reached the app, {st['shed']} shed with a fast 503/429 (nginx log)"
            )
    for step in report["steps"]:
        if "goals" in step:
            print()
            h, r = lt.goal_rows(step["goals"])
            print(table(h, r))
    integrity = report["integrity"]
    print("\nintegrity: " + ("nothing restarted, nothing OOM-killed" if integrity["ok"]
                             else "; ".join(integrity["problems"])))  # fmt: skip


def _read_log(path: Path, offset: int) -> list[lt.LogLine]:
    if not path.exists():
        return []
    with path.open("rb") as f:
        f.seek(offset)
        data = f.read()
    out = []
    for raw in data.decode(errors="replace").splitlines():
        line = lt.parse_access_line(raw)
        if line:
            out.append(line)
    return out


def _other_containers(project: str) -> int:
    proc = subprocess.run(
        ["docker", "ps", "--format", "{{.Names}}"], capture_output=True, text=True
    )
    return sum(1 for n in proc.stdout.split() if not n.startswith(f"{project}_"))


def _wrk_version() -> str:
    proc = subprocess.run(["wrk", "--version"], capture_output=True, text=True)
    return (proc.stdout + proc.stderr).strip().splitlines()[0] if proc.stdout or proc.stderr else ""


def _rel(path: Path) -> str:
    with contextlib.suppress(ValueError):
        return str(path.resolve().relative_to(REPO_ROOT))
    return str(path)
