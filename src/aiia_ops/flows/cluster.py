"""A stack on several hosts (level 3) over SSH: setup (one plan per host, database first,
load balancer last), image shipping without a registry, the firewall, and the per-host
release of each app instance (ClusterDeploy: invoke deploy's procedure, with the load
balancer on another host). The rolling deploy across app hosts is flows/rolling.py.

Pure decisions (order, files, compose projects, upstreams, rules) are commands/cluster.py.
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from aiia_ops.commands import app as apps
from aiia_ops.commands import cluster as plan
from aiia_ops.commands import docker as cmd
from aiia_ops.errors import OpsError
from aiia_ops.flows import switch as sw
from aiia_ops.flows.deploy import Deploy, build_release_image, inspect_release
from aiia_ops.flows.stack import check_fits, prepare_state
from aiia_ops.flows.steps import Steps
from aiia_ops.flows.targets import Target, host_target
from aiia_ops.host.files import sync_files
from aiia_ops.host.git import resolve_ref, shared_image_tags
from aiia_ops.host.http import health_through_nginx
from aiia_ops.host.runners import LocalRunner, Runner
from aiia_ops.host.secrets import load_secrets
from aiia_ops.model import Stack
from aiia_ops.model.placement import AppInstance
from aiia_ops.model.secrets import Secrets
from aiia_ops.model.state import StateDir

SECRET_FILES = "secrets"


def _say(line: str) -> None:
    print(line, flush=True)


@dataclass
class Cluster:
    """The hosts of one stack, connected: a target per host, the secrets every host shares
    (generated once on this machine), and where the load balancer sends each instance."""

    stack: Stack
    state: StateDir  # this machine's: the secrets are generated and kept here
    secrets: Secrets
    targets: dict[str, Target]
    steps: Steps = field(default_factory=Steps)
    live: dict[tuple[str, int], str] = field(default_factory=dict)  # (env, i) -> host:port
    lb_up: bool = False

    @property
    def parts(self) -> list[plan.HostPart]:
        return plan.host_parts(self.stack)

    @property
    def lb(self) -> plan.HostPart:
        return plan.part_of(self.parts, "nginx")

    def runner(self, host: str) -> Runner:
        return self.targets[host].runner

    def state_dir(self, host: str) -> str:
        return self.targets[host].state_dir

    def instances(self, env: str | None = None) -> list[tuple[plan.HostPart, int, AppInstance]]:
        return [
            (part, i, inst)
            for part in self.parts
            for i, inst in part.instances
            if env is None or inst.env.name == env
        ]

    # -- facts -------------------------------------------------------------------------

    def read_live(self) -> None:
        """Where each instance's live release is published (from each app host's engine)."""
        view = plan.remote_view(self.stack)
        for part, i, inst in self.instances():
            running = inspect_release(self.runner(part.name), view, inst.container)
            if running and running.running and running.address:
                port = plan.host_port(inst, running.address)
                self.live[(inst.env.name, i)] = f"{part.address}:{port}"
        nginx = self.stack.services.nginx.container
        result = self.runner(self.lb.name).query(cmd.container_running(nginx))
        self.lb_up = result.ok and result.stdout.strip() == "true"

    # -- the load balancer ---------------------------------------------------------------

    def write_host(self, part: plan.HostPart) -> list[str]:
        files = plan.files_for(
            self.stack,
            part,
            self.parts,
            self.secrets,
            self.state_dir(part.name),
            shared_image_tags(self.stack),
            plan.lb_upstreams(self.stack, self.live),
        )
        return sync_files(self.runner(part.name), files)

    def point_lb(self) -> None:
        """Render nginx's upstreams from `live` on the load balancer; reload it gracefully
        (a bad config never replaces the running one: nginx -t first)."""
        changed = self.write_host(self.lb)
        if self.lb_up and changed:
            for argv in cmd.nginx_reload(self.stack):
                self.runner(self.lb.name).run(argv)

    def sync_static(self, part: plan.HostPart, env, tag: str) -> None:
        """The release's collected static files from its app host into lb1's storage
        volume (commands/cluster.py: why), before lb1 serves the release."""
        src, lb = self.runner(part.name), self.runner(self.lb.name)
        src_dir, lb_dir = self.state_dir(part.name), self.state_dir(self.lb.name)
        src.run(["mkdir", "-p", f"{src_dir}/{plan.STATIC_SYNC_DIR}"])
        src.run(plan.static_pack(self.stack, env, f"{env.image}:{tag}", src_dir))
        data = src.read_file(plan.static_bundle(src_dir, env.name))
        if data is None:
            raise OpsError(f"{part.name}: collectstatic left no static files for {env.name}")
        lb.write_file(plan.static_bundle(lb_dir, env.name), data, mode=0o644)
        lb.run(plan.static_unpack(self.stack, env, self.lb_nginx_image(), lb_dir))

    def lb_nginx_image(self) -> str:
        """The nginx image lb1 holds for sure: the one its nginx runs. The checkout's own tag
        may name an image lb1 never received (a change under services/nginx since setup)."""
        name = self.stack.services.nginx.container
        got = self.runner(self.lb.name).query(plan.running_image(name))
        running = got.stdout.strip() if got.ok else ""
        return (
            running or f"{self.stack.services.nginx.image}:{shared_image_tags(self.stack)['nginx']}"
        )

    def nginx_workers(self) -> set[str]:
        out = self.runner(self.lb.name).query(apps.nginx_processes(self.stack)).stdout
        return apps.parse_workers(out)

    def health(self, domain: str) -> dict:
        port = self.lb.host.published(443)
        return health_through_nginx(domain, self.lb.address, port)


@dataclass
class ClusterDeploy(Deploy):
    """invoke deploy's procedure for one app instance on its app host: the release starts
    beside the live one (standby slot, its own published port), is health-checked there,
    the load balancer (another host) is pointed at it, then the old one drains and stops."""

    cluster: Cluster | None = None
    part: plan.HostPart | None = None
    position: int = 0
    instance: AppInstance | None = None
    migrate: bool = True  # the environment's first instance migrates; the others do not

    def preflight(self) -> apps.Running | None:
        if not self.runner.query(apps.engine_version()).ok:
            raise OpsError(
                f"the Docker engine of {self.part.name} does not answer; run invoke provision"
            )
        df = self.runner.query(apps.free_disk(self.state_dir))
        problem = apps.disk_problem(apps.parse_free_disk(df.stdout) if df.ok else None,
                                    self.state_dir)  # fmt: skip
        if problem:
            raise OpsError(problem)
        return self.live()

    def check_migrations(self, tag: str) -> None:
        if self.migrate:
            super().check_migrations(tag)

    def one_off(self, tag: str, args: list[str]) -> None:
        if args[:1] == ["migrate"] and not self.migrate:
            self.steps.out(f"   (migrated by {self.env.name}'s first instance)")
            return
        super().one_off(tag, args)

    def start_new(self, tag: str, address: str, name: str) -> None:
        argv = apps.run_release(
            self.stack, self.env, self.state_dir, tag, address, name, config=self.config
        )
        port = plan.host_port(self.instance, address)
        argv[-1:-1] = plan.publish_flag(self.part.address, port, self.env.port)
        self.runner.run(argv)

    def _slot(self, container_address: str) -> str:
        """host:port where the load balancer reaches this instance's container."""
        return f"{self.part.address}:{plan.host_port(self.instance, container_address)}"

    def _served(self) -> str | None:
        """The container address the load balancer sends this instance's traffic to
        (the cluster's live map; the app host's switch file is per environment, and an
        app host may run several instances of one environment)."""
        hostport = self.cluster.live.get((self.env.name, self.position))
        if hostport is None:
            live = self.live()
            return live.address if live and live.running else None
        port = int(hostport.rsplit(":", 1)[1])
        if port == self.instance.port:
            return str(self.instance.address)
        return str(self.instance.standby_address)

    def _repoint(self, container_address: str) -> set[str]:
        self.cluster.live[(self.env.name, self.position)] = self._slot(container_address)
        old = self.cluster.nginx_workers() if self.cluster.lb_up else set()
        self.cluster.point_lb()
        return old

    def point_nginx(self, address: str, tag: str, name: str) -> None:
        if self.cluster.lb_up:  # at setup, lb1 starts later and gets them then
            self.cluster.sync_static(self.part, self.env, tag)
        self._mark("switch", switched=True)
        self._old_workers = self._repoint(address)
        self.steps.out(f"   {self.cluster.lb.name}: {self.env.name} -> {self._slot(address)}")
        self._mark("reload")

    def _switch(self, upstream: str, release: str, container: str, **kw) -> set[str] | None:
        return self._repoint(upstream.rsplit(":", 1)[0])

    def resync_nginx(self) -> set[str] | None:
        old = self.cluster.nginx_workers() if self.cluster.lb_up else set()
        self.cluster.point_lb()
        return old

    def wait_drained(self, old: set[str] | None) -> None:
        """nginx's old workers on the load balancer (not this host) are gone."""
        if not self.cluster.lb_up:
            return
        timeout = self.stack.deploy.drain_timeout
        lb = self.cluster.runner(self.cluster.lb.name)
        if not sw.wait_drained(lb, self.stack, old, timeout.seconds):
            self.steps.out("   nginx workers still draining; stopping anyway")

    def check_through_nginx(self, tag: str) -> None:
        if not self.cluster.lb_up:
            self.steps.out("   (the load balancer starts after the app hosts)")
            return
        domain = self.env.domains[0]
        deadline = time.monotonic() + 15
        data: dict = {}
        while time.monotonic() < deadline:
            try:
                data = self.cluster.health(domain)
                if data.get("http_status") == 200:
                    return
            except OSError as exc:
                data = {"error": str(exc)}
            time.sleep(0.5)
        raise OpsError(f"https://{domain}/health/ through the load balancer failed: {data}")


def connect(model: Stack, state: StateDir, create_secrets: bool = True, out=_say) -> Cluster:
    """A target per host (SSH, host keys verified), every secret registered with each runner."""
    secrets = load_secrets(state.root, list(model.environments), create_secrets)
    targets = {p.name: host_target(model, p.name) for p in plan.host_parts(model)}
    for t in targets.values():
        t.runner.redact(*secrets.values())
    return Cluster(model, state, secrets, targets, Steps(out=out))


def instance_deploy(c: Cluster, part: plan.HostPart, i: int, inst: AppInstance, first: bool):
    return ClusterDeploy(
        plan.remote_view(c.stack),
        plan.instance_env(inst),
        c.state_dir(part.name),
        c.runner(part.name),
        c.secrets,
        steps=c.steps,
        host=part.host,
        remote_engine=not c.targets[part.name].is_local,
        cluster=c,
        part=part,
        position=i,
        instance=inst,
        migrate=first,
    )


# -- images --------------------------------------------------------------------------------


def ship_images(c: Cluster, release: str | None, parallel: int = 5) -> dict[str, float]:
    """Each host gets the images it runs and lacks: `docker save` here piped into
    `docker load` over its SSH connection (no registry). Hosts in parallel (`parallel`
    at once: each save holds about one image in this machine's page cache, not in RAM).
    Returns seconds per host."""
    tags = shared_image_tags(c.stack)
    local = LocalRunner()
    if release:  # the release's app image, built here from exactly its commit if missing
        commit, _ = resolve_ref(release)
        for env in c.stack.environments.values():
            build_release_image(c.stack, env, commit, release, local)

    def one(part: plan.HostPart) -> tuple[str, float]:
        started = time.monotonic()
        runner = c.runner(part.name)
        images = part.images(tags)
        if part.instances and release:
            images.append(f"{c.stack.environments[part.envs[0]].image}:{release}")
        for image in images:
            if runner.query(apps.image_inspect(image)).ok:
                continue
            if not local.query(apps.image_inspect(image)).ok:
                raise OpsError(f"image {image} is not built here: run invoke build")
            runner.pipe_from_local(apps.save_image(image), apps.load_image())
        return part.name, time.monotonic() - started

    with ThreadPoolExecutor(max_workers=max(1, parallel)) as pool:
        return dict(pool.map(one, c.parts))


# -- setup ---------------------------------------------------------------------------------


def copy_secrets(c: Cluster, part: plan.HostPart) -> None:
    """The host keeps the stack's secrets too (a deploy run from elsewhere reads them)."""
    runner = c.runner(part.name)
    for name in ["shared", *c.stack.environments]:
        data = (c.state.root / SECRET_FILES / f"{name}.env").read_bytes()
        runner.write_file(f"{c.state_dir(part.name)}/{SECRET_FILES}/{name}.env", data, mode=0o600)


def setup(
    model: Stack, state: StateDir, ref: str | None = None, firewall: bool = True, out=_say
) -> dict:
    """From nothing to every environment served through the load balancer, host by host:
    database and pooler, cache, app instances (invoke deploy's procedure each), the load
    balancer last, then each host's firewall. Idempotent: a second run changes nothing
    that is right already."""
    started = time.monotonic()
    check_fits(model)  # the budget, per host against that host's machine
    c = connect(model, state, out=out)
    steps = c.steps
    _, release = resolve_ref(ref)
    timings: dict[str, float] = {}
    for part in c.parts:
        steps.run(
            f"{part.name}: engine answers",
            lambda p=part: _engine(c, p),
        )
    c.read_live()
    t0 = time.monotonic()
    shipped = steps.run("images to each host (docker save | ssh docker load, in parallel)",
                        lambda: ship_images(c, release))  # fmt: skip
    timings["ship"] = time.monotonic() - t0
    for name, seconds in shipped.items():
        out(f"   {name}: {seconds:.1f}s")
    for part in c.parts:
        keys = [s.name for s in part.services if s.name != "nginx"]
        if not keys and not part.instances:
            continue  # the load balancer alone: last, below
        t0 = time.monotonic()
        steps.run(f"{part.name}: state, secrets, configs", lambda p=part: _files(c, p))
        if keys:
            steps.run(
                f"{part.name}: start {', '.join(keys)}",
                lambda p=part, k=keys: c.runner(p.name).run(
                    plan.compose_up(c.stack, c.state_dir(p.name), k), stream=True
                ),
            )
        if "postgresql" in part.keys:
            for env in model.environments.values():
                steps.run(
                    f"{part.name}: database and role for {env.name}",
                    lambda e=env, p=part: c.runner(p.name).run(
                        cmd.ensure_database(model, e),
                        input=c.secrets.environments[e.name].db_password + "\n",
                    ),
                )
        if part.instances:
            steps.run(f"{part.name}: network {model.network.name}", lambda p=part: _network(c, p))
        timings[part.name] = time.monotonic() - t0
    migrated: set[str] = set()
    for part, i, inst in c.instances():
        t0 = time.monotonic()
        first = inst.env.name not in migrated
        migrated.add(inst.env.name)
        d = instance_deploy(c, part, i, inst, first)
        live = d.live()
        if live and live.running and live.release == release:
            out(f"-> {part.name} {inst.container} already runs {release}")
        else:
            out(f"\n== {part.name}: {inst.env.name} instance {inst.container} ==")
            d.deploy(ref)
        timings[f"{part.name}/{inst.container}"] = time.monotonic() - t0
    lb = c.lb
    t0 = time.monotonic()
    steps.run(f"{lb.name}: state, configs (upstreams: the app instances)", lambda: _files(c, lb))
    steps.run(
        f"{lb.name}: start nginx",
        lambda: c.runner(lb.name).run(
            plan.compose_up(c.stack, c.state_dir(lb.name), ["nginx"]), stream=True
        ),
    )
    if c.lb_up:
        for argv in cmd.nginx_reload(model):
            c.runner(lb.name).run(argv)
    c.lb_up = True
    synced: set[str] = set()
    for part, _, inst in c.instances():  # one copy per environment: every instance has it
        if inst.env.name not in synced:
            synced.add(inst.env.name)
            steps.run(
                f"{lb.name}: {inst.env.name}'s static files from {part.name}",
                lambda p=part, i=inst: c.sync_static(p, plan.instance_env(i), release),
            )
    timings[lb.name] = timings.get(lb.name, 0.0) + time.monotonic() - t0
    if firewall:
        for part in c.parts:
            steps.run(f"{part.name}: firewall", lambda p=part: apply_firewall(c, p))
    for env in model.environments.values():
        steps.run(f"{env.name} through the load balancer", lambda e=env: _served(c, e.domains[0]))
    timings["total"] = time.monotonic() - started
    out(f"\nthe stack is up on {len(c.parts)} hosts in {timings['total']:.0f}s:")
    for env in model.environments.values():
        out(f"  https://{env.domains[0]}/  -> {lb.name} {lb.address}:443")
    return {"release": release, "timings": timings, "live": dict(c.live)}


def _engine(c: Cluster, part: plan.HostPart) -> None:
    if not c.runner(part.name).query(apps.engine_version()).ok:
        raise OpsError(f"the Docker engine of {part.name} does not answer; run invoke provision")


def _files(c: Cluster, part: plan.HostPart) -> None:
    runner = c.runner(part.name)
    root = c.state_dir(part.name)
    prepare_state(runner, StateDir(Path(root)))
    copy_secrets(c, part)
    c.write_host(part)


def _network(c: Cluster, part: plan.HostPart) -> None:
    runner = c.runner(part.name)
    if not runner.query(plan.network_inspect(c.stack)).ok:
        runner.run(plan.network_create(c.stack))


def _served(c: Cluster, domain: str) -> None:
    deadline = time.monotonic() + 30
    data: dict = {}
    while time.monotonic() < deadline:
        try:
            data = c.health(domain)
            if data.get("http_status") == 200:
                return
        except OSError as exc:
            data = {"error": str(exc)}
        time.sleep(1)
    raise OpsError(f"https://{domain}/health/ through the load balancer: {data}")


# -- the firewall --------------------------------------------------------------------------


def apply_firewall(c: Cluster, part: plan.HostPart) -> list[str]:
    """Rebuild the host's AIIA-FW chain and make DOCKER-USER jump to it first."""
    runner = c.runner(part.name)
    runner.run(plan.firewall_chain_create(), check=False)
    for argv in plan.firewall_rules(c.stack, part, c.parts):
        runner.run(argv)
    if not runner.query(plan.firewall_jump_check()).ok:
        runner.run(plan.firewall_jump_insert())
    return runner.query(plan.firewall_list()).stdout.splitlines()


def firewall(model: Stack, state: StateDir, out=_say) -> dict[str, list[str]]:
    """invoke firewall: every host's rules, applied over SSH."""
    c = connect(model, state, create_secrets=False, out=out)
    return {
        p.name: c.steps.run(f"{p.name}: firewall", lambda p=p: apply_firewall(c, p))
        for p in c.parts
    }
