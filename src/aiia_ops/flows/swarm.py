"""The Swarm runtime's procedures (`runtime: swarm`): cluster.init / join / status over SSH
on the stack's hosts, and setup / deploy / rollback through `docker stack deploy` and
`docker service update|rollback`, waiting for convergence and reporting each task.

The stack file and every engine argv are commands/swarm.py (pure). The release log and the
audit lines are the compose runtime's (same files, same lines), kept on the first host
(the leader), where the deploy lock is held too. Rollback is the engine's own: a new
release whose tasks fail their health inside the update's monitor window is rolled back
by Swarm (`failure_action: rollback`), and recorded "bad".
"""

from __future__ import annotations

import json
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from aiia_ops.commands import app as apps
from aiia_ops.commands import docker as cmd
from aiia_ops.commands import swarm as sw
from aiia_ops.commands.compose import service_key
from aiia_ops.errors import OpsError
from aiia_ops.flows.steps import Steps
from aiia_ops.flows.targets import Target, host_target, remote_secrets
from aiia_ops.host import lock as locks
from aiia_ops.host.git import image_tag, resolve_ref, shared_image_tags
from aiia_ops.host.releases import audit_line, release_line
from aiia_ops.host.runners import LocalRunner, Runner
from aiia_ops.host.secrets import load_secrets
from aiia_ops.model import Environment, Stack
from aiia_ops.model.budget import check_budget, has_errors
from aiia_ops.model.placement import APP_ROLE, SERVICE_ROLES, app_instances
from aiia_ops.model.secrets import Secrets

POLL_S = 1.0
SHARED = ("nginx", "postgresql", "pgbouncer", "redis")


class SwarmDeployFailed(OpsError):
    pass


def _say(line: str) -> None:
    print(line, flush=True)


def require_swarm(model: Stack) -> None:
    if model.runtime != "swarm":
        raise OpsError(
            f"the stack's runtime is {model.runtime!r}; cluster tasks need runtime: swarm "
            "(e.g. --profile swarm-lab, or AIIA_PROFILE=swarm-lab)"
        )


@dataclass
class Cluster:
    """The stack's hosts as swarm nodes: a target (runner, state dir) per host."""

    model: Stack
    targets: dict[str, Target]

    @classmethod
    def of(cls, model: Stack, accept_new_host_key: bool = False) -> Cluster:
        require_swarm(model)
        names = sw.swarm_hosts(model)
        return cls(model, {n: host_target(model, n, accept_new_host_key) for n in names})

    @property
    def leader_name(self) -> str:
        return next(iter(self.targets))

    @property
    def leader(self) -> Runner:
        """The first host: where the stack is deployed from, logs and locks are kept."""
        return self.targets[self.leader_name].runner

    @property
    def state_dir(self) -> str:
        return self.targets[self.leader_name].state_dir

    def info(self, host: str) -> dict:
        result = self.targets[host].runner.query(sw.swarm_info())
        if not result.ok:
            raise OpsError(f"{host}: the engine does not answer: {result.stderr.strip()}")
        try:
            return json.loads(result.stdout)
        except json.JSONDecodeError as exc:
            raise OpsError(f"{host}: unreadable `docker info`: {result.stdout[:200]}") from exc

    def node_ids(self) -> dict[str, str]:
        """Node id -> host name (hosts that are in a swarm)."""
        out = {}
        for name in self.targets:
            try:
                info = self.info(name)
            except OpsError:
                continue
            if info.get("NodeID"):
                out[info["NodeID"]] = name
        return out

    def close(self) -> None:
        for t in self.targets.values():
            close = getattr(t.runner, "close", None)
            if close:
                close()


# --- cluster.init / cluster.join / cluster.status -----------------------------------------


def cluster_init(model: Stack, out=_say, accept_new_host_key: bool = False) -> list[dict]:
    """Form the swarm on the stack's hosts (idempotent): the first host inits, the others
    join as managers (three managers keep a quorum when one is lost), every node gets the
    labels of its host's roles."""
    c = Cluster.of(model, accept_new_host_key)
    try:
        steps = Steps(out=out)
        leader = c.leader_name
        with steps.step(f"{leader}: swarm leader at {sw.node_address(model, leader)}"):
            info = c.info(leader)
            if info.get("LocalNodeState") == "active":
                out("   already in a swarm")
            else:
                c.leader.run(sw.swarm_init(sw.node_address(model, leader)))
        for name in list(c.targets)[1:]:
            _join(c, name, steps, out)
        _label(c, steps)
        return cluster_status_of(c)
    finally:
        c.close()


def cluster_join(model: Stack, host: str, out=_say, accept_new_host_key: bool = False):
    c = Cluster.of(model, accept_new_host_key)
    try:
        if host not in c.targets or host == c.leader_name:
            others = ", ".join(list(c.targets)[1:])
            raise OpsError(f"unknown host {host!r} to join; expected one of: {others}")
        steps = Steps(out=out)
        _join(c, host, steps, out)
        _label(c, steps)
        return cluster_status_of(c)
    finally:
        c.close()


def _join(c: Cluster, name: str, steps: Steps, out) -> None:
    address = sw.node_address(c.model, name)
    leader_address = sw.node_address(c.model, c.leader_name)
    with steps.step(f"{name}: joins as a manager ({address})"):
        if c.info(name).get("LocalNodeState") == "active":
            out("   already in a swarm")
            return
        token = c.leader.query(sw.join_token("manager"))
        if not token.ok:
            raise OpsError(
                f"{c.leader_name} is not a swarm manager ({token.stderr.strip()}): run "
                "invoke cluster.init first"
            )
        c.targets[name].runner.redact(token.stdout.strip())
        c.targets[name].runner.run(
            sw.swarm_join(address, leader_address), input=token.stdout.strip() + "\n"
        )


def _label(c: Cluster, steps: Steps) -> None:
    with steps.step("node labels from the hosts' roles"):
        for node, host in c.node_ids().items():
            c.leader.run(sw.node_label_add(node, sw.node_labels(c.model, host)))


def cluster_status(model: Stack) -> list[dict]:
    c = Cluster.of(model)
    try:
        return cluster_status_of(c)
    finally:
        c.close()


def cluster_status_of(c: Cluster) -> list[dict]:
    """Per host: its node, state, manager status, labels (read from the leader)."""
    ids = c.node_ids()
    nodes = {}
    ls = c.leader.query(sw.node_ls())
    for n in sw.json_lines(ls.stdout) if ls.ok else []:
        nodes[n.get("ID")] = n
    rows = []
    for name in c.targets:
        node = next((i for i, h in ids.items() if h == name), "")
        entry = nodes.get(node, {})
        labels = {}
        if node and ls.ok:
            inspect = c.leader.query(sw.node_inspect(node))
            if inspect.ok:
                labels = json.loads(inspect.stdout).get("Spec", {}).get("Labels") or {}
        rows.append(
            {
                "host": name,
                "address": sw.node_address(c.model, name),
                "node": node[:12] if node else "-",
                "state": entry.get("Status", "not in the swarm").lower(),
                "availability": entry.get("Availability", "-").lower(),
                "manager": entry.get("ManagerStatus", "") or "worker",
                "labels": ",".join(sorted(k.removeprefix(sw.LABEL_PREFIX) for k in labels)),
            }
        )
    return rows


# --- the stack on the swarm ---------------------------------------------------------------


def _secrets(c: Cluster) -> Secrets:
    """The stack's secrets, kept on the leader (made there once, from this machine's
    generator, 0600); every value is redacted from output."""
    runner, state = c.leader, c.state_dir
    if runner.read_file(f"{state}/secrets/shared.env") is None:
        tmp = Path(tempfile.mkdtemp(prefix="aiia-secrets-"))
        try:
            load_secrets(tmp, list(c.model.environments), create=True)
            for f in sorted((tmp / "secrets").iterdir()):
                runner.write_file(f"{state}/secrets/{f.name}", f.read_bytes(), mode=0o600)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    secrets = remote_secrets(runner, state, c.model)
    for t in c.targets.values():
        t.runner.redact(*secrets.values())
    return secrets


def _inspect(runner: Runner, name: str) -> dict | None:
    result = runner.query(sw.service_inspect(name))
    if not result.ok:
        return None
    try:
        return json.loads(result.stdout)
    except json.JSONDecodeError:
        return None


def live_tags(c: Cluster) -> dict[str, str]:
    """Environment -> the tag its app service runs now (none: not deployed yet)."""
    out = {}
    for env in c.model.environments.values():
        spec = _inspect(c.leader, sw.full_name(c.model, service_key(env)))
        if spec and sw.service_image(spec):
            out[env.name] = sw.service_image(spec).rpartition(":")[2]
    return out


def _write_stack(c: Cluster, secrets: Secrets, tags: dict[str, str], replicas) -> None:
    for f in sw.stack_files(c.model, secrets, c.state_dir, tags, replicas):
        c.leader.write_file(f.path, f.data, mode=f.mode)


def _deploy_stack(c: Cluster, secrets, tags, replicas, steps: Steps, title: str) -> None:
    with steps.step(title):
        _write_stack(c, secrets, tags, replicas)
        c.leader.run(sw.stack_deploy(c.model, c.state_dir), stream=True)


def _tasks(c: Cluster, name: str) -> list[sw.Task]:
    result = c.leader.query(sw.service_ps(name))
    return sw.parse_tasks(result.stdout) if result.ok else []


def _task_nodes(c: Cluster, tasks: list[sw.Task], ids: dict[str, str]) -> dict[str, tuple]:
    """Task id -> (host name, container id)."""
    if not tasks:
        return {}
    result = c.leader.query(sw.task_inspect([t.id for t in tasks]))
    out = {}
    for line in result.stdout.splitlines():
        parts = line.split()
        if len(parts) >= 2:
            out[parts[0]] = (ids.get(parts[1], parts[1][:12]), parts[2] if len(parts) > 2 else "")
    return out


def wait_converged(
    c: Cluster, key: str, image: str, replicas: int, timeout: float, out=_say
) -> float:
    """Until `replicas` tasks of `image` run and nothing else does; prints each task's state
    as it changes. Seconds it took."""
    name = sw.full_name(c.model, key)
    ids = c.node_ids()
    started = time.monotonic()
    seen: dict[str, str] = {}
    while True:
        tasks = _tasks(c, name)
        _report(c, tasks, ids, seen, out)
        if sw.converged(tasks, image, replicas):
            return time.monotonic() - started
        if time.monotonic() - started > timeout:
            raise OpsError(
                f"{name} did not converge in {timeout:.0f}s: "
                + "; ".join(f"{t.name} {t.current} {t.error}".strip() for t in sw.live_tasks(tasks))
                + f" (docker service ps {name})"
            )
        time.sleep(POLL_S)


def _report(c: Cluster, tasks, ids, seen: dict[str, str], out) -> None:
    fresh = [t for t in tasks if seen.get(t.id) != f"{t.state}/{t.desired}"]
    if not fresh:
        return
    where = _task_nodes(c, fresh, ids)
    for t in fresh:
        seen[t.id] = f"{t.state}/{t.desired}"
        host = where.get(t.id, ("?", ""))[0]
        error = f" ({t.error})" if t.error else ""
        tag = t.image.split("@")[0].rpartition(":")[2]
        out(f"   {t.name} on {host}: {t.state} (wanted {t.desired.lower()}, {tag}){error}")


def _postgres_container(c: Cluster) -> tuple[Runner, str]:
    name = sw.full_name(c.model, "postgresql")
    tasks = [t for t in _tasks(c, name) if t.state == "running"]
    where = _task_nodes(c, tasks, c.node_ids())
    for t in tasks:
        host, container = where.get(t.id, ("", ""))
        if host in c.targets and container:
            return c.targets[host].runner, container
    raise OpsError(f"no running task of {name}: see docker service ps {name}")


def ensure_database(c: Cluster, env: Environment, secrets: Secrets) -> None:
    runner, container = _postgres_container(c)
    argv = cmd.ensure_database(c.model, env)
    argv[argv.index(c.model.services.postgresql.container)] = container
    runner.run(argv, input=secrets.environments[env.name].db_password + "\n")


def run_job(c: Cluster, env: Environment, tag: str, args: list[str], timeout: float) -> None:
    """A one-off task of the release (migrations) on an app node; waits for it to end."""
    app = _inspect(c.leader, sw.full_name(c.model, service_key(env)))
    if not app:
        raise OpsError(f"{env.name} has no app service yet: invoke setup --env={env.name}")
    name = sw.full_name(c.model, f"job_{env.name}")
    c.leader.run(sw.service_rm(name), check=False)
    c.leader.run(sw.one_off_service(c.model, env, tag, name, args, sw.service_secrets(app)))
    started = time.monotonic()
    try:
        while True:
            tasks = _tasks(c, name)
            states = {t.state for t in tasks}
            if "complete" in states:
                return
            failed = [t for t in tasks if t.state in ("failed", "rejected")]
            if len(failed) >= sw.JOB_ATTEMPTS:  # the engine retried it: a real failure
                logs = c.leader.query(sw.service_logs(name, 20))
                why = "; ".join(f"{t.current} {t.error}".strip() for t in failed)
                raise OpsError(
                    f"{' '.join(args)} of {tag} failed on {env.name} ({why}): "
                    f"{(logs.stdout + logs.stderr).strip()[-1500:]}"
                )
            if time.monotonic() - started > timeout:
                raise OpsError(f"{' '.join(args)} of {tag} did not finish in {timeout:.0f}s")
            time.sleep(POLL_S)
    finally:
        c.leader.run(sw.service_rm(name), check=False)


def ship_images(c: Cluster, images: dict[str, str], steps: Steps) -> None:
    """`images`: image -> the role of the nodes that may run it. Each such node gets the
    image from this machine's engine when it lacks it (no registry: docker save | docker
    load over SSH)."""
    local = LocalRunner()
    for name, t in c.targets.items():
        labels = sw.node_labels(c.model, name)
        for image, role in sorted(images.items()):
            if sw.role_label(role) not in labels or t.runner.query(cmd.image_inspect(image)).ok:
                continue
            if not local.query(cmd.image_inspect(image)).ok:
                raise OpsError(
                    f"{image} is on neither {name} nor this machine: build it here "
                    "(invoke build) and run again"
                )
            with steps.step(f"{name}: shipping {image}"):
                t.runner.pipe_from_local(apps.save_image(image), apps.load_image())


def _check(model: Stack) -> None:
    findings = check_budget(model)
    if has_errors(findings):
        errors = [f"  {f.check}: {f.message}" for f in findings if f.severity == "error"]
        raise OpsError(
            "the stack does not fit its hosts (invoke config.check):\n" + "\n".join(errors)
        )


def _require_cluster(c: Cluster) -> None:
    missing = [r["host"] for r in cluster_status_of(c) if r["state"] != "ready"]
    if missing:
        raise OpsError(
            f"hosts not ready in the swarm: {', '.join(missing)}; run invoke cluster.init "
            "(or cluster.join --host H), then cluster.status"
        )


def _images(model: Stack, tags: dict[str, str]) -> dict[str, str]:
    out = {f"{getattr(model.services, k).image}:{tags[k]}": SERVICE_ROLES[k] for k in SHARED}
    for e in model.environments.values():
        out[f"{e.image}:{tags[e.name]}"] = APP_ROLE
    return out


def _timeout(model: Stack, replicas: int) -> float:
    return max(120.0, (model.deploy.health_timeout.seconds + 30) * max(replicas, 1))


def setup(model: Stack, env_name: str, out=_say, tag: str | None = None) -> dict:
    """From a formed swarm to a healthy environment: secrets, configs, the stack, the
    database and role, migrations, the app at its replicas. Other environments keep the
    release they run (or stay at 0 replicas until their own setup)."""
    started = time.monotonic()
    _check(model)
    env = model.environment(env_name)
    steps = Steps(out=out)
    c = Cluster.of(model)
    try:
        _require_cluster(c)
        with steps.step("secrets (kept on the leader)"):
            secrets = _secrets(c)
        live = live_tags(c)
        release = tag or live.get(env.name) or image_tag("django")
        # An environment not set up yet gets this release's image, at 0 replicas.
        unset = {e: release for e in model.environments}
        tags = {**unset, **shared_image_tags(model), **live, env.name: release}
        replicas = {
            e: (len(app_instances(model.environment(e))) if e in live else 0)
            for e in model.environments
        }
        ship_images(c, _images(model, tags), steps)
        _deploy_stack(c, secrets, tags, replicas, steps, "docker stack deploy (shared services)")
        for key in SHARED:
            svc = getattr(model.services, key)
            with steps.step(f"{key}: converging"):
                wait_converged(c, key, f"{svc.image}:{tags[key]}", 1, _timeout(model, 1), out)
        with steps.step(f"database and role for {env.name} ({env.database})"):
            ensure_database(c, env, secrets)
        with steps.step(f"migrations of {release}"):
            run_job(c, env, release, ["migrate", "--noinput"], _timeout(model, 1))
        replicas[env.name] = len(app_instances(env))
        _deploy_stack(
            c,
            secrets,
            tags,
            replicas,
            steps,
            f"docker stack deploy ({env.name} x {replicas[env.name]})",
        )
        with steps.step(f"{env.name}: converging"):
            seconds = wait_converged(
                c,
                service_key(env),
                f"{env.image}:{release}",
                replicas[env.name],
                _timeout(model, replicas[env.name]),
                out,
            )
        _record(c, env, release, "deploy", "good", started, f"setup; converged in {seconds:.1f}s")
        return {"release": release, "seconds": time.monotonic() - started}
    finally:
        c.close()


def _record(
    c: Cluster, env: Environment, tag: str, action: str, result: str, started: float, detail: str
) -> None:
    entry = {
        "commit": tag,
        "image": f"{env.image}:{tag}",
        "action": action,
        "result": result,
        "duration_s": round(time.monotonic() - started, 1),
        "detail": detail,
        "runtime": "swarm",
    }
    _append(c, f"releases/{env.name}.jsonl", release_line(env.name, entry))
    _append(c, "audit.log", audit_line(f"{action} {env.name} {tag}: {result}"))


def _append(c: Cluster, rel: str, line: str) -> None:
    path = f"{c.state_dir.rstrip('/')}/{rel}"
    before = c.leader.read_file(path) or b""
    c.leader.write_file(path, before + line.encode(), mode=0o644)


def _wait_update(c: Cluster, env: Environment, timeout: float, out) -> tuple[str, float]:
    """Until the service's update ends: (final UpdateStatus state, seconds)."""
    name = sw.full_name(c.model, service_key(env))
    ids = c.node_ids()
    started = time.monotonic()
    seen: dict[str, str] = {}
    while True:
        spec = _inspect(c.leader, name) or {}
        state = sw.update_state(spec)
        _report(c, _tasks(c, name), ids, seen, out)
        if state in sw.UPDATE_DONE:
            return state, time.monotonic() - started
        if time.monotonic() - started > timeout:
            return state or "timeout", time.monotonic() - started
        time.sleep(POLL_S)


def deploy(
    model: Stack, env_name: str, ref: str | None = None, out=_say, tag: str | None = None
) -> dict:
    """A release of `env_name` on the swarm: migrations as a job, then `docker service
    update --image` (start-first, health-gated, rolled back by the engine on failure)."""
    started = time.monotonic()
    _check(model)
    env = model.environment(env_name)
    steps = Steps(out=out)
    release = tag or resolve_ref(ref)[1]
    image = f"{env.image}:{release}"
    c = Cluster.of(model)
    try:
        name = sw.full_name(model, service_key(env))
        before = _inspect(c.leader, name)
        if not before:
            raise OpsError(f"{env.name} is not on the swarm yet: invoke setup --env={env.name}")
        previous = sw.service_image(before).rpartition(":")[2]
        with locks.holding(
            c.leader,
            c.state_dir,
            locks.deploy_lock(env.name),
            version=release,
            action="deploy",
            release_hint=f"invoke lock.release --env={env.name}",
        ):
            ship_images(c, {image: APP_ROLE}, steps)
            with steps.step(f"migrations of {release}"):
                run_job(c, env, release, ["migrate", "--noinput"], _timeout(model, 1))
            with steps.step(f"docker service update {name} -> {release} (start-first)"):
                c.leader.run(sw.service_update_image(name, image, force=previous == release))
            replicas = len(app_instances(env))
            with steps.step(f"{env.name}: converging (rolled back by the engine if unhealthy)"):
                state, seconds = _wait_update(c, env, _timeout(model, replicas) * 2, out)
            if state == "completed":
                with steps.step(f"{env.name}: every task runs {release}"):
                    wait_converged(c, service_key(env), image, replicas, 60, out)
                detail = f"converged in {seconds:.1f}s"
                _record(c, env, release, "deploy", "good", started, detail)
                return {
                    "release": release,
                    "seconds": time.monotonic() - started,
                    "converged_s": seconds,
                }
            detail = f"update {state} after {seconds:.1f}s; engine rolled back to {previous}"
            _record(c, env, release, "deploy", "bad", started, detail)
            raise SwarmDeployFailed(
                f"{release} failed on {env.name}: {detail} (docker service ps {name}). "
                f"{env.name} still serves {previous}."
            )
    finally:
        c.close()


def rollback(model: Stack, env_name: str, out=_say) -> dict:
    """The engine's own rollback: the app service back to its previous spec."""
    started = time.monotonic()
    env = model.environment(env_name)
    steps = Steps(out=out)
    c = Cluster.of(model)
    try:
        name = sw.full_name(model, service_key(env))
        spec = _inspect(c.leader, name)
        previous = ((spec or {}).get("PreviousSpec") or {}).get("TaskTemplate", {})
        target = previous.get("ContainerSpec", {}).get("Image", "").split("@")[0]
        if not target:
            raise OpsError(f"{name} has no previous release to roll back to")
        release = target.rpartition(":")[2]
        with locks.holding(
            c.leader, c.state_dir, locks.deploy_lock(env.name), version=release, action="rollback"
        ):
            with steps.step(f"docker service rollback {name} -> {release}"):
                c.leader.run(sw.service_rollback(name))
                state, seconds = _wait_update(c, env, _timeout(model, 2) * 2, out)
            result = "good" if state == "rollback_completed" else "failed"
            _record(c, env, release, "rollback", result, started, f"{state} in {seconds:.1f}s")
            if result != "good":
                raise OpsError(f"rollback of {env.name} ended {state}: docker service ps {name}")
        return {"release": release, "seconds": time.monotonic() - started}
    finally:
        c.close()


def service_table(model: Stack) -> list[dict]:
    """`docker service ls` of the stack, from the leader."""
    c = Cluster.of(model)
    try:
        result = c.leader.query(sw.service_ls(model))
        return sw.json_lines(result.stdout) if result.ok else []
    finally:
        c.close()


def refuse_options(options: dict) -> None:
    """The compose deploy's options that have no meaning on a swarm, refused by name."""
    given = [k for k, v in options.items() if v and k != "accept_new_host_key"]
    if given:
        flags = ", ".join(f"--{k.replace('_', '-')}" for k in given)
        raise OpsError(
            f"{flags}: not on runtime: swarm (the swarm deploys to its own nodes; the engine "
            "rolls back to the previous release only); run without it"
        )
