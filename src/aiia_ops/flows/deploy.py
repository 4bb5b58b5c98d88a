"""The deploy: one procedure, any runner (local engine, SSH, or a dry-run printer).

preflight -> lock -> pre-deploy backup -> image (built where memory is plentiful, shipped
over SSH when the host is remote) -> migrations (straight to PostgreSQL) -> collectstatic
-> the new release beside the old one, healthy on its own address -> nginx pointed at it
with a graceful reload -> health through nginx -> the old release drains and stops ->
release recorded, audit line, notification -> lock released.

A failure before the switch leaves the old release serving, untouched. A failure after
the switch switches back. The database is never rolled back automatically.
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from aiia_ops import REPO_ROOT, SERVICES_DIR
from aiia_ops.commands import app as apps
from aiia_ops.commands import docker as cmd
from aiia_ops.commands.render import host_files, sync_files
from aiia_ops.errors import CommandFailed, OpsError
from aiia_ops.flows.output import paint
from aiia_ops.flows.status import health_through_nginx
from aiia_ops.flows.steps import Steps
from aiia_ops.host import lock as locks
from aiia_ops.host.notify import notify
from aiia_ops.host.releases import audit_line, parse_releases, release_line
from aiia_ops.host.runners import LocalRunner, PrintingRunner, Runner
from aiia_ops.model import Environment, Host, Stack
from aiia_ops.model.budget import check_budget, has_errors
from aiia_ops.model.secrets import Secrets

MIN_FREE_DISK = 2 * 1024**3  # an image, a backup and logs on a 20 GB disk


class DeployFailed(OpsError):
    pass


def resolve_ref(ref: str | None) -> tuple[str, str]:
    """(full commit, 12-char tag) of a git ref in this repository (default HEAD)."""
    proc = subprocess.run(
        [
            "git",
            "-C",
            str(REPO_ROOT),
            "rev-parse",
            "--verify",
            "--quiet",
            f"{ref or 'HEAD'}^{{commit}}",
        ],
        capture_output=True,
        text=True,
    )
    if proc.returncode != 0:
        raise OpsError(
            f"unknown git ref {ref!r}: no such commit, branch or tag in "
            f"{REPO_ROOT} (fetch it first?)"
        )
    commit = proc.stdout.strip()
    return commit, commit[:12]


def build_release_image(
    stack: Stack, env: Environment, commit: str, tag: str, runner: Runner
) -> None:
    """Build the app image of exactly `commit` (uncommitted changes are not deployed)."""
    if runner.run(["docker", "image", "inspect", f"{env.image}:{tag}"], check=False).ok:
        return
    tmp = Path(tempfile.mkdtemp(prefix="aiia-release-"))
    try:
        subprocess.run(
            ["git", "-C", str(REPO_ROOT), "worktree", "add", "--detach", str(tmp / "src"), commit],
            check=True,
            capture_output=True,
        )
        django = tmp / "src" / "services" / "django"
        wheels = SERVICES_DIR / "django" / "wheelhouse"
        runner.run(cmd.prepare_wheelhouse(), stream=True)  # this checkout's, usually cached
        if wheels.exists():
            shutil.copytree(wheels, django / "wheelhouse", dirs_exist_ok=True)
        runner.run([str(django / "build-wheelhouse")], stream=True)
        runner.run(
            cmd.build_image(stack, "django", tag, tag, services_dir=django.parent), stream=True
        )
    finally:
        subprocess.run(
            ["git", "-C", str(REPO_ROOT), "worktree", "remove", "--force", str(tmp / "src")],
            capture_output=True,
        )
        shutil.rmtree(tmp, ignore_errors=True)


@dataclass
class Deploy:
    stack: Stack
    env: Environment
    state_dir: str  # on the target host
    runner: Runner  # acts on the target host (real or printing)
    secrets: Secrets
    local: Runner = field(default_factory=LocalRunner)  # builds images here
    steps: Steps = field(default_factory=Steps)
    take_backup: Callable[[], object] | None = None
    dry_run: bool = False
    host: Host | None = None  # the target's entry in the stack (published ports); None: local

    # -- facts ---------------------------------------------------------------------------

    def live(self) -> apps.Running | None:
        return apps.inspect_release(self._reader(), self.stack, self.env.container)

    def _reader(self) -> Runner:
        if isinstance(self.runner, PrintingRunner) and self.runner.reader:
            return self.runner.reader
        return self.runner

    # -- the procedure -------------------------------------------------------------------

    def deploy(self, ref: str | None = None) -> dict:
        commit, tag = resolve_ref(ref)
        return self._release(tag, action="deploy", commit=commit)

    def rollback(self, to: str | None = None) -> dict:
        tag = self.rollback_target(to)
        return self._release(tag, action="rollback", commit=tag)

    def rollback_target(self, to: str | None) -> str:
        live = self.live()
        current = live.release if live else None
        history = self._history(self.env.name)
        bad = {r["commit"][:12] for r in history if r.get("result") == "bad"}
        good = [r["commit"][:12] for r in reversed(history) if r.get("result") == "good"]
        candidates = [c for c in dict.fromkeys(good) if c != current and c not in bad]
        if to:
            matches = [c for c in candidates if c.startswith(to[:12])]
            if not matches:
                known = ", ".join(candidates) or "none"
                raise OpsError(
                    f"{to} is not a good earlier release of {self.env.name}; "
                    f"rollback targets: {known}"
                )
            candidates = matches
        for tag in candidates:
            if (
                self._reader()
                .run(["docker", "image", "inspect", f"{self.env.image}:{tag}"], check=False)
                .ok
            ):
                return tag
        raise OpsError(
            f"no earlier good release of {self.env.name} whose image is still on "
            f"the host (releases kept: {self.stack.deploy.keep_releases}); deploy a "
            f"commit instead: invoke deploy --env={self.env.name} --ref COMMIT"
        )

    def _release(self, tag: str, action: str, commit: str) -> dict:
        env, run = self.env, self.steps.run
        started = time.monotonic()
        live = run("preflight: stack, budget, engine, disk, current release", self.preflight)
        run(
            f"lock {env.name}",
            lambda: locks.acquire(
                self.runner,
                self.state_dir,
                locks.deploy_lock(env.name),
                version=tag,
                action=action,
                release_hint=f"invoke lock.release --env={env.name}",
            ),
        )
        new_name = apps.next_name(env)
        switched = False
        try:
            self.clear_leftover()
            if action == "deploy":
                if self.take_backup:
                    run(f"pre-deploy backup of {env.database}", self.take_backup)
                run(f"image {env.image}:{tag}", lambda: self.ensure_image(commit, tag))
                run(
                    "migrations (straight to PostgreSQL)",
                    lambda: self.one_off(tag, ["migrate", "--noinput"]),
                )
            run("collectstatic", lambda: self.one_off(tag, ["collectstatic", "--noinput"]))
            address = apps.free_slot(env, live)
            run(
                f"start {tag} beside the live release on {address}",
                lambda: self.start_new(tag, address, new_name),
            )
            run(f"health of {tag} on its own address", lambda: self.wait_healthy(new_name))
            run(
                "switch nginx to the new release (graceful reload)",
                lambda: self.point_nginx(f"{address}:{env.port}"),
            )
            switched = True
            run("health through nginx", lambda: self.check_through_nginx(tag))
            run("drain and stop the previous release", lambda: self.retire(live, new_name))
        except BaseException as exc:
            detail = str(exc).splitlines()[0] if str(exc) else exc.__class__.__name__
            self.recover(live, new_name, switched)
            result = "bad" if switched or isinstance(exc, DeployFailed) else "failed"
            self.finish(tag, action, result, started, detail)
            raise
        self.finish(tag, action, "good", started, "")
        return {"release": tag, "address": address, "seconds": time.monotonic() - started}

    # -- steps ---------------------------------------------------------------------------

    def preflight(self) -> apps.Running | None:
        findings = check_budget(self.stack)
        if has_errors(findings):
            errors = "; ".join(f.message for f in findings if f.severity == "error")
            raise OpsError(f"the stack does not fit the machine: {errors} (invoke config.check)")
        reader = self._reader()
        if not reader.run(["docker", "info", "--format", "{{.ServerVersion}}"], check=False).ok:
            raise OpsError("the Docker engine does not answer on the host; run invoke provision")
        df = reader.run(["df", "--output=avail", "-B1", self.state_dir], check=False)
        if df.ok:
            avail = int(df.stdout.split()[-1])
            if avail < MIN_FREE_DISK:
                raise OpsError(
                    f"only {avail // 1024**2} MB free under {self.state_dir}; a "
                    f"deploy needs {MIN_FREE_DISK // 1024**2} MB (prune old backups "
                    "or images: invoke backup.prune, docker image prune)"
                )
        for svc in ("pgbouncer", "postgresql", "redis"):
            name = getattr(self.stack.services, svc).container
            state = reader.run(
                ["docker", "inspect", "--format", "{{.State.Running}}", name], check=False
            )
            if state.stdout.strip() != "true":
                raise OpsError(f"{name} is not running; start the stack first: invoke up")
        return self.live()

    def clear_leftover(self) -> None:
        """A <name>-next container left by a deploy that died (we hold the lock now, so no
        running deploy owns it). Never the live release."""
        leftover = apps.inspect_release(self._reader(), self.stack, apps.next_name(self.env))
        if leftover:
            self.runner.run(["docker", "rm", "--force", leftover.name])

    def ensure_image(self, commit: str, tag: str) -> None:
        build_release_image(self.stack, self.env, commit, tag, self.local)
        if self.runner is self.local or isinstance(self.runner, PrintingRunner):
            return
        image = f"{self.env.image}:{tag}"
        if not self.runner.run(["docker", "image", "inspect", image], check=False).ok:
            # No registry: the image travels over the SSH connection.
            self.runner.pipe_from_local(["docker", "save", image], ["docker", "load"])

    def one_off(self, tag: str, args: list[str]) -> None:
        self.runner.run(
            cmd.one_off_app(self.stack, self.env, self.state_dir, tag, args),
            stream=not isinstance(self.runner, PrintingRunner),
        )

    def start_new(self, tag: str, address: str, name: str) -> None:
        self.runner.run(apps.run_release(self.stack, self.env, self.state_dir, tag, address, name))

    def wait_healthy(self, name: str) -> None:
        deadline = time.monotonic() + self.stack.deploy.health_timeout.seconds
        last = None
        while True:
            last = self.runner.run(apps.health_probe(name), check=False)
            if last.ok:
                return
            if time.monotonic() > deadline:
                break
            state = self.runner.run(
                ["docker", "inspect", "--format", "{{.State.Status}}", name], check=False
            ).stdout.strip()
            if state in ("exited", "dead"):
                break
            time.sleep(1)
        logs = self.runner.run(["docker", "logs", "--tail", "40", name], check=False)
        raise DeployFailed(
            f"the new release did not become healthy within "
            f"{self.stack.deploy.health_timeout}: the live release keeps serving.\n"
            f"--- health check output ---\n{(last.stdout + last.stderr).strip()}\n"
            f"--- last log lines of {name} ---\n{(logs.stdout + logs.stderr).strip()}"
        )

    def point_nginx(self, upstream: str) -> None:
        upstreams = apps.live_upstreams(self._reader(), self.stack)
        upstreams[self.env.name] = upstream
        changed = write_host_files(self.runner, self.stack, self.secrets, self.state_dir, upstreams)
        self._old_workers = self.nginx_workers()
        for argv in cmd.nginx_reload(self.stack):
            self.runner.run(argv)
        if any("/config/pgbouncer/" in path for path in changed):
            self.runner.run(cmd.pgbouncer_reload(self.stack))

    def check_through_nginx(self, tag: str) -> None:
        if self.dry_run:
            return
        port = (self.host or self.stack.local_host).published(443)
        domain = self.env.domains[0]
        deadline = time.monotonic() + 15
        data: dict = {}
        while time.monotonic() < deadline:
            try:
                data = health_through_nginx(domain, self._public_address(), port)
                if data.get("http_status") == 200 and data.get("version") == tag:
                    return
            except OSError as exc:
                data = {"error": str(exc)}
            time.sleep(0.5)
        raise DeployFailed(f"https://{domain}/health/ through nginx did not report {tag}: {data}")

    def _public_address(self) -> str:
        spec = getattr(self.runner, "spec", None)  # an SSH target: its own address
        return spec.address if spec else "127.0.0.1"

    def nginx_workers(self) -> set[str]:
        top = self.runner.run(
            ["docker", "top", self.stack.services.nginx.container, "-eo", "pid,args"], check=False
        )
        return {line.split()[0] for line in top.stdout.splitlines()[1:] if "worker process" in line}

    def wait_nginx_drained(self) -> None:
        """After a reload, nginx's old workers finish their requests (some still bound for
        the previous release) before exiting: stop that release only once they are gone."""
        old = getattr(self, "_old_workers", set())
        deadline = time.monotonic() + self.stack.deploy.drain_timeout.seconds
        while old and time.monotonic() < deadline:
            if not old & self.nginx_workers():
                return
            time.sleep(0.2)
        if old and old & self.nginx_workers():
            self.steps.out(paint("   nginx workers still draining; stopping anyway", "warning"))

    def retire(self, live: apps.Running | None, new_name: str) -> None:
        self.wait_nginx_drained()
        if live:
            # nginx's old workers finish their requests; gunicorn gets SIGTERM and drains.
            self.runner.run(
                [
                    "docker",
                    "stop",
                    "--time",
                    str(self.stack.deploy.drain_timeout.whole_seconds),
                    live.name,
                ]
            )
            self.runner.run(["docker", "rm", live.name])
        self.runner.run(["docker", "rename", new_name, self.env.container])

    def recover(self, live: apps.Running | None, new_name: str, switched: bool) -> None:
        """Put the previous release back in front; remove the new one. Never raises."""
        try:
            if switched and live and live.running:
                self.point_nginx(f"{live.address}:{self.env.port}")
        except (OpsError, OSError) as exc:
            self.steps.out(paint(f"   could not switch nginx back: {exc}", "error"))
        self.runner.run(["docker", "rm", "--force", new_name], check=False)

    def finish(self, tag: str, action: str, result: str, started: float, detail: str) -> None:
        env = self.env.name
        try:
            if not self.dry_run:
                entry = {
                    "commit": tag,
                    "image": f"{self.env.image}:{tag}",
                    "action": action,
                    "result": result,
                    "duration_s": round(time.monotonic() - started, 1),
                    "detail": detail,
                }
                self._append(f"releases/{env}.jsonl", release_line(env, entry))
                self._append("audit.log", audit_line(f"{action} {env} {tag}: {result}"))
                if result == "good":
                    self.prune_images(tag)
                msg = f"{action} of {env} to {tag}: {result}" + (f" ({detail})" if detail else "")
                self.steps.out(f"-> notify: {notify(msg, Path(self.state_dir))}")
        finally:
            locks.release(self.runner, self.state_dir, locks.deploy_lock(env))

    def _append(self, rel: str, line: str) -> None:
        """Append to a log on the host (the environment's lock is held: no other writer)."""
        path = f"{self.state_dir.rstrip('/')}/{rel}"
        before = self._reader().read_file(path) or b""
        self.runner.write_file(path, before + line.encode(), mode=0o644)

    def _history(self, env: str) -> list[dict]:
        data = self._reader().read_file(f"{self.state_dir.rstrip('/')}/releases/{env}.jsonl")
        return parse_releases(data or b"")

    def prune_images(self, current: str) -> None:
        """Keep the images of each environment's last N releases (deploy.keep_releases) and
        the live ones; remove older release images this host deployed. Images it never
        deployed (someone else's builds on a shared engine) are not ours to remove."""
        keep_n = self.stack.deploy.keep_releases
        keep, seen = {current}, set()
        for other in self.stack.environments.values():
            live = apps.inspect_release(self._reader(), self.stack, other.container)
            keep |= {live.release} if live else set()
            tags = [r["commit"][:12] for r in self._history(other.name)]
            recent = list(dict.fromkeys(reversed(tags)))[:keep_n]
            keep |= set(recent)
            seen |= set(tags)
        for tag in sorted(seen - keep):
            self.runner.run(["docker", "image", "rm", f"{self.env.image}:{tag}"], check=False)


def write_host_files(
    runner: Runner, stack: Stack, secrets: Secrets, state_dir: str, upstreams: dict[str, str]
) -> list[str]:
    from aiia_ops.host.git import shared_image_tags

    files = host_files(stack, secrets, state_dir, shared_image_tags(stack), upstreams)
    return sync_files(runner, files)


__all__ = ["CommandFailed", "Deploy", "DeployFailed", "resolve_ref"]
