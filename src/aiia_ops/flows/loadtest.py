"""The load test procedure (`invoke loadtest`): wrk against the stack on this machine, with
ceilings, the engine's counters, nginx's access log, a report and charts.

The pure part (scenarios, the wrk script and command, parsers, the report, the charts) is
commands/loadtest.py. This module runs things, all through host/: wrk and `docker` commands
through the runner, the engine's counters through host/engine.py (one command a second for
every container), HTTPS requests that seed the data through host/http.py.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import threading
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from aiia_ops import REPO_ROOT
from aiia_ops.commands import accesslog
from aiia_ops.commands import loadtest as lt
from aiia_ops.commands.app import RELEASE_LABEL
from aiia_ops.commands.compose import service_key
from aiia_ops.commands.docker import nginx_reload, one_off_app
from aiia_ops.errors import OpsError
from aiia_ops.flows.output import table
from aiia_ops.host.engine import Engine
from aiia_ops.host.git import head_version
from aiia_ops.host.http import https_request
from aiia_ops.host.runners import LocalRunner, Runner
from aiia_ops.model import Environment, Stack
from aiia_ops.model.state import StateDir

SETTLE_S = 3  # pause between phases: connections close, queues drain
SAMPLE_EVERY_S = 1.0  # the engine's counters, like `docker stats` (one reading a second)


@dataclass(frozen=True)
class Options:
    env: str = "prod"
    users: tuple[int, ...] = (100,)
    duration: int = 60
    scenario: str = "mixed"
    ceilings: bool = True
    ceiling_duration: int = 15
    threads: int = 2
    timeout: int = 5
    out: Path | None = None  # default docs/loadtest
    command: str = "invoke loadtest"

    def check(self) -> None:
        if not 1 <= self.duration <= 600 or not 1 <= self.ceiling_duration <= 600:
            raise OpsError("--duration and --ceiling-duration must be 1 to 600 seconds")


# --- the write token -------------------------------------------------------------------


def write_token(runner: Runner, state: StateDir, env: Environment) -> str | None:
    """API_WRITE_TOKEN as the app container gets it (its 0600 env file), else from the
    environment's secrets file. Never printed."""
    for path in (state.env_files / f"{service_key(env)}.env", state.secrets / f"{env.name}.env"):
        with contextlib.suppress(OSError):
            token = lt.token_from_env_file((runner.read_file(str(path)) or b"").decode())
            if token:
                return token
    return os.environ.get("AIIA_API_WRITE_TOKEN") or None


# --- the engine's counters, once a second -------------------------------------------------


class Sampler:
    """Reads every container's counters once a second (ONE engine command for all of them,
    host/engine.Engine.usage) until stopped: CPU from the difference of two readings."""

    def __init__(self, engine: Engine, containers: dict[str, str]):
        self.engine = engine
        self.containers = dict(containers)  # name -> container id
        self.samples: list[lt.Sample] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def add(self, name: str, container_id: str) -> None:
        with self._lock:
            self.containers[name] = container_id

    def _loop(self) -> None:
        previous: dict[str, tuple[float, int]] = {}
        while not self._stop.is_set():
            began = time.time()
            with self._lock:
                containers = dict(self.containers)
            try:
                counters = self.engine.usage(containers)
            except OpsError as exc:  # the engine gone mid-run: the report shows the gap
                print(f"   engine counters stopped: {exc}", flush=True)
                return
            t = time.time()
            for name, c in counters.items():
                s = lt.sample(name, previous.get(name), c, t)
                if c is not None and c.cpu_ns is not None:
                    previous[name] = (t, c.cpu_ns)
                if s:
                    with self._lock:
                        self.samples.append(s)
            self._stop.wait(max(0.0, SAMPLE_EVERY_S - (time.time() - began)))

    def __enter__(self) -> Sampler:
        self._thread.start()
        time.sleep(SAMPLE_EVERY_S * 1.5)  # the first reading carries no CPU difference
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(timeout=10)


def running_containers(engine: Engine, names: list[str]) -> dict[str, str]:
    """name -> id of those running."""
    return {n: c.id for n, c in engine.inspect(names).items() if c.running}


def integrity_snapshot(engine: Engine, names: list[str]) -> dict:
    containers = engine.inspect(names)
    counters = engine.usage({n: c.id for n, c in containers.items()})
    return lt.integrity_snapshot(names, containers, counters)


# --- HTTPS to 127.0.0.1 with a chosen SNI and Host -----------------------------------------


def wait_for(domain: str, port: int, path: str, seconds: float = 30) -> None:
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


# --- the app: its release, the clean-up, the ceiling's bare app ----------------------------


def live_release(engine: Engine, env: Environment) -> str | None:
    """The release label of the environment's running container, None when not running."""
    c = engine.inspect([env.container]).get(env.container)
    return c.labels.get(RELEASE_LABEL, "") if c and c.running else None


def cleanup(runner: Runner, engine: Engine, stack: Stack, env: Environment, state: StateDir):
    release = live_release(engine, env)
    if not release:
        return
    argv = one_off_app(stack, env, str(state.root), release, lt.cleanup_args())
    result = runner.run(argv, check=False, timeout=300)
    deleted = result.stdout.strip().splitlines()[-1:] if result.ok else []
    if not result.ok:
        print(f"   could not delete the load test's courses: {result.stderr.strip()[-300:]}")
    elif deleted and deleted[0] != "0":
        print(f"-> deleted {deleted[0]} rows the load test's writes had created", flush=True)


@contextlib.contextmanager
def bare_ceiling(
    runner: Runner, engine: Engine, stack: Stack, env: Environment, state: StateDir, port: int
):
    """The bare app running behind nginx for the length of the block; gone afterwards."""
    release = live_release(engine, env)
    if release is None:
        raise OpsError(f"{env.container} is not running; run invoke setup --env={env.name}")
    app_dir = state.sub("loadtest") / "bare"
    runner.run(["install", "-d", "-m", "0755", str(app_dir)])  # gunicorn's user reads it
    runner.write_file(str(app_dir / "bare.py"), lt.BARE_APP, mode=0o644)
    conf = state.config / "nginx" / "conf.d" / lt.BARE_CONF
    name = lt.bare_container_name(stack)
    runner.run(lt.remove_container(name), check=False)
    try:
        image = f"{env.image}:{release}"
        runner.run(lt.bare_run_argv(stack, env, str(state.config), image, str(app_dir)))
        runner.write_file(str(conf), lt.bare_vhost_conf(stack, env, lt.bare_address(stack)))
        for argv in nginx_reload(stack):
            runner.run(argv)
        wait_for(lt.BARE_DOMAIN, port, "/")
        yield name
    finally:
        runner.run(["rm", "-f", str(conf)], check=False)
        for argv in nginx_reload(stack):
            runner.run(argv, check=False)
        runner.run(lt.remove_container(name), check=False)


# --- wrk -----------------------------------------------------------------------------------


def require_wrk(runner: Runner) -> str:
    """wrk from the distribution (its version line); installed here (root + apt) like
    provision installs Docker."""
    found = runner.query(lt.wrk_version_argv())
    if found.code == 127 and os.geteuid() == 0:
        print("-> installing wrk (Debian package)", flush=True)
        env = {"DEBIAN_FRONTEND": "noninteractive"}
        if not runner.run(["apt-get", "install", "-y", "-qq", "wrk"], check=False, env=env).ok:
            runner.run(["apt-get", "update", "-qq"], check=False, env=env)
            runner.run(["apt-get", "install", "-y", "-qq", "wrk"], check=False, env=env)
        found = runner.query(lt.wrk_version_argv())
    if found.code == 127:
        raise OpsError("wrk is not installed; on Debian/Ubuntu: apt-get install wrk")
    return lt.first_line(found.stdout + found.stderr)


def uptime(runner: Runner) -> float:
    """Seconds since boot: the kernel log's clock."""
    return float((runner.read_file("/proc/uptime") or b"0").decode().split()[0])


def kernel_oom_kills(runner: Runner, since_s: float) -> list[lt.KernelOomKill] | None:
    """The kernel's OOM kills since `since_s` (seconds since boot); None when its log cannot
    be read (not root with dmesg restricted)."""
    result = runner.query(lt.KERNEL_LOG)
    return lt.kernel_oom_kills(result.stdout, since_s) if result.ok else None


def loadavg(runner: Runner) -> tuple[float, float, float]:
    return lt.parse_loadavg((runner.read_file("/proc/loadavg") or b"0 0 0").decode())


def run_wrk(runner: Runner, state: StateDir, script_text: str, argv_of, timeout: float):
    """Write the script to a 0600 file (it may hold the write token), run wrk, delete it.
    → (wrk's output, its exit code)."""
    path = state.sub("loadtest") / f"wrk-{os.getpid()}-{secrets.token_hex(3)}.lua"
    runner.write_file(str(path), script_text, mode=0o600)
    try:
        result = runner.run(argv_of(str(path)), check=False, timeout=timeout)
        return result.stdout + result.stderr, result.code
    finally:
        runner.run(["rm", "-f", str(path)], check=False)


def prove_no_lookup(runner: Runner, state: StateDir, port: int) -> None:
    """wrk must never resolve the URL's name: a probe whose name cannot resolve (.invalid)
    must still run (its connection goes to 127.0.0.1; nginx refuses the unknown name)."""
    target = lt.Target(domain=lt.PROBE_DOMAIN, port=port)
    script = lt.lua_script(lt.CEILINGS["nginx-static"], target, "probe")
    out, code = run_wrk(
        runner,
        state,
        script,
        lambda p: lt.wrk_argv(1, 1, p, target.url(), threads=1, timeout=2),
        30,
    )
    if code != 0 or "AIIA_LOADTEST " not in out:
        raise OpsError(
            "wrk did not take the script's name resolution (it would look the domain up); "
            f"refusing to send load. wrk said:\n{out[-1000:]}"
        )


# --- the access log ------------------------------------------------------------------------


def log_size(path: Path) -> int:
    return path.stat().st_size if path.exists() else 0


def read_log(path: Path, offset: int) -> list[accesslog.AccessLine]:
    """The requests nginx logged after `offset` (a load test's worth, not the whole log)."""
    if not path.exists():
        return []
    with path.open("rb") as f:
        f.seek(offset)
        data = f.read()
    return list(accesslog.parse_lines(data.decode(errors="replace").splitlines()))


# --- the procedure ---------------------------------------------------------------------------


def loadtest(stack: Stack, state: StateDir, opts: Options, runner: Runner | None = None):
    """Load the stack on this machine with wrk from 127.0.0.1; print the report, write the
    JSON and the SVG chart. → (report, its JSON path, its chart path)."""
    opts.check()
    runner = runner or LocalRunner()
    engine = Engine(runner)
    target_env = stack.environment(opts.env)
    sc = lt.scenario(opts.scenario)
    steps = list(opts.users)
    wrk_version = require_wrk(runner)
    nginx = stack.services.nginx
    up = running_containers(engine, [nginx.container, target_env.container])
    for name in (nginx.container, target_env.container):
        if name not in up:
            raise OpsError(f"{name} is not running; start the stack: invoke setup --env={opts.env}")
    port = stack.local_host.published(443)
    domain = target_env.domains[0]
    out_dir = opts.out or REPO_ROOT / "docs" / "loadtest"

    print(f"-> {lt.CONDITIONS}", flush=True)
    prove_no_lookup(runner, state, port)
    token = write_token(runner, state, target_env)
    if sc.writes and not token:
        raise OpsError(
            f"the {sc.name} scenario writes, and no API_WRITE_TOKEN reaches "
            f"{target_env.container} (its env file {state.env_files}/"
            f"{service_key(target_env)}.env has none): the app refuses every write. "
            "Use --scenario reads, or pass the token to the app (docs/performance.md)."
        )
    check_static(domain, port)
    cleanup(runner, engine, stack, target_env, state)
    slugs = seed(domain, port, token)
    target = lt.Target(domain=domain, port=port, detail_slugs=slugs, token=token)
    bare_target = lt.Target(domain=lt.BARE_DOMAIN, port=port)

    containers = {c.container: service_key(c) for c in stack.containers()}
    ids = running_containers(engine, list(containers))
    running = {n: k for n, k in containers.items() if n in ids}
    limits = {
        c.container: (c.cpu.limit, c.memory.limit.bytes)
        for c in stack.containers()
        if c.container in running
    }
    log_path = state.root / "logs" / "nginx" / "access.log"
    log_offset = log_size(log_path)
    run_id = secrets.token_hex(3)
    raw_phases: list[dict] = []
    before = integrity_snapshot(engine, list(running))
    started = time.time()
    booted_s = uptime(runner)
    names_by_id = {ids[n]: n for n in running}

    def phase(sc_: lt.Scenario, kind: str, n: int, seconds: int, tgt: lt.Target) -> None:
        url = tgt.url()
        script = lt.lua_script(sc_, tgt, f"{run_id}{n}", seed=n)
        print(f"-> {sc_.name}: {n} users for {seconds}s", flush=True)
        load_before = loadavg(runner)
        t0 = time.time()
        text, code = run_wrk(
            runner,
            state,
            script,
            lambda p: lt.wrk_argv(n, seconds, p, url, threads=opts.threads, timeout=opts.timeout),
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
        raw_phases.append({"scenario": sc_, "kind": kind, "users": n, "duration": seconds,
                           "t0": t0, "t1": t1, "load": (load_before, loadavg(runner)),
                           "wrk": result})  # fmt: skip
        time.sleep(SETTLE_S)

    with Sampler(engine, {n: ids[n] for n in running}) as sampler:
        bare = (
            bare_ceiling(runner, engine, stack, target_env, state, port)
            if opts.ceilings
            else contextlib.nullcontext()
        )
        with bare as bare_name:
            running_all = dict(running)
            if bare_name:
                bare_id = running_containers(engine, [bare_name]).get(bare_name)
                if bare_id:
                    sampler.add(bare_name, bare_id)
                    names_by_id[bare_id] = bare_name
                running_all[bare_name] = "loadtest_bare"
                limits[bare_name] = (target_env.cpu.limit, target_env.memory.limit.bytes)
            time.sleep(2)
            for n in steps:
                if opts.ceilings:
                    phase(lt.CEILINGS["nginx-static"], "ceiling", n, opts.ceiling_duration, target)
                    phase(lt.CEILINGS["bare-gunicorn"], "ceiling", n, opts.ceiling_duration,
                          bare_target)  # fmt: skip
                phase(sc, "scenario", n, opts.duration, target)
        samples = list(sampler.samples)

    after = integrity_snapshot(engine, list(running))
    cleanup(runner, engine, stack, target_env, state)
    apps = {e.container for e in stack.environments.values()}
    trouble = {
        name: t
        for name in running
        if name in apps
        for t in [lt.log_trouble(_output(runner.query(lt.app_logs_since(name, started))))]
        if t
    }
    kills = kernel_oom_kills(runner, booted_s)
    integrity = lt.integrity_report(before, after, trouble, kills, names_by_id)
    # nginx writes its access log in 32 KB chunks, at least every access_log_flush.
    time.sleep(nginx.settings.access_log_flush.seconds + 1)
    lines = read_log(log_path, log_offset)

    phases = [_phase(raw, lines, samples, domain, running, running_all, limits)
              for raw in raw_phases]  # fmt: skip
    machine = {
        "cpus": os.cpu_count(),
        "date_utc": datetime.now(UTC).isoformat(timespec="seconds"),
        "commit": head_version(),
        "stack_file": stack.source,
        "other_containers_running": _others_running(engine, stack.project),
        "loadavg_at_start": list(raw_phases[0]["load"][0]) if raw_phases else [],
        "load_tool": wrk_version,
    }
    report = lt.report_dict(opts.command, opts.env, phases, machine, integrity)
    base = f"{sc.name}-{steps[0]}u" if len(steps) == 1 else f"growth-{sc.name}"
    json_path, svg_path = out_dir / f"{base}.json", out_dir / f"{base}.svg"
    runner.write_file(str(json_path), json.dumps(report, indent=1) + "\n")
    if len(steps) == 1:
        runner.write_file(str(svg_path), lt.render_run_svg(report, sc.name, steps[0]))
    else:
        runner.write_file(str(svg_path), lt.render_growth_svg(report, sc.name))
    print_report(report, sc.name)
    print(f"\nreport: {_rel(json_path)}\nchart:  {_rel(svg_path)}")
    if not integrity["ok"]:
        raise OpsError("during the run: " + "; ".join(integrity["problems"]))
    return report, json_path, svg_path


def _others_running(engine: Engine, project: str) -> int:
    """Running containers that are not the stack's: load the figures do not show."""
    rows = engine.containers()
    return sum(
        1
        for row in rows
        if row.get("State") == "running" and not row.get("Names", "").startswith(f"{project}_")
    )


def _output(result) -> str:
    return result.stdout + result.stderr


def _phase(raw: dict, lines, samples, domain: str, running: dict, running_all: dict, limits):
    """One wrk run with what nginx's log and the engine's counters saw meanwhile."""
    sc_: lt.Scenario = raw["scenario"]
    vhosts = {lt.BARE_DOMAIN} if sc_.vhost == "bare" else {domain}
    services = running_all if sc_.vhost == "bare" else running
    t0, t1 = raw["t0"], raw["t1"]
    return lt.Phase(
        name=sc_.name,
        kind=raw["kind"],
        users=raw["users"],
        duration_s=raw["duration"],
        started=t0,
        ended=t1,
        loadavg_before=raw["load"][0],
        loadavg_after=raw["load"][1],
        wrk=raw["wrk"],
        seconds=lt.timeseries(lines, t0, t1, vhosts),
        statuses=lt.status_counts(lines, t0, t1, vhosts),
        usage=lt.usage(samples, t0, t1, services, limits),
        stack_memory_peak=lt.stack_memory_peak(samples, t0, t1, set(running)),
        memory_series=lt.memory_series(samples, t0, t1, services),
    )


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
    for note in integrity.get("notes", []):
        print(f"  ({note})")


def _rel(path: Path) -> str:
    with contextlib.suppress(ValueError):
        return str(path.resolve().relative_to(REPO_ROOT))
    return str(path)
