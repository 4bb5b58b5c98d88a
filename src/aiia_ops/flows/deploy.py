"""The deploy: one procedure, any runner (local engine, SSH, or a dry-run printer).

preflight -> lock -> pre-deploy backup -> image (built where memory is plentiful, shipped
over SSH when the host is remote) -> migration safety (the new migrations must not break
the live release) -> migrations (straight to PostgreSQL) -> collectstatic
-> the new release beside the old one, healthy on its own address -> nginx pointed at it
with a graceful reload -> health through nginx -> the old release drains and stops ->
release recorded, audit line, notification -> lock released.

Facts (what runs, which images exist, free disk) are read with `runner.query()`, changes
made with `runner.run()`: a dry run is the same procedure through a `PrintingRunner` whose
reader is the real host, so it prints exactly the commands a deploy would run. Only what
cannot happen without the change (waiting for the new release's health) is skipped.

A failure before the switch leaves the old release serving, untouched. A failure after
the switch switches back. The database is never rolled back automatically.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from aiia_ops.commands import app as apps
from aiia_ops.commands import docker as cmd
from aiia_ops.commands import journal as jn
from aiia_ops.commands import release_config as rcfg
from aiia_ops.commands.argv import quote
from aiia_ops.errors import CommandFailed, OpsError
from aiia_ops.flows import switch as sw
from aiia_ops.flows.output import paint
from aiia_ops.flows.restore import resume_if_paused
from aiia_ops.flows.status import health_through_nginx
from aiia_ops.flows.steps import Steps
from aiia_ops.flows.switch import (
    inspect_release,
    live_upstreams,
    write_host_files,
)
from aiia_ops.flows.targets import target, target_secrets
from aiia_ops.host import git
from aiia_ops.host import lock as locks
from aiia_ops.host.files import sync_files
from aiia_ops.host.git import resolve_ref
from aiia_ops.host.notify import notify
from aiia_ops.host.releases import audit_line, now_iso, parse_releases, release_line
from aiia_ops.host.runners import LocalRunner, PrintingRunner, Runner
from aiia_ops.host.signals import Interrupted, interruptible, shielded
from aiia_ops.model import Environment, Host, Stack
from aiia_ops.model.budget import check_budget, has_errors
from aiia_ops.model.secrets import Secrets
from aiia_ops.model.state import local_state_dir


class DeployFailed(OpsError):
    pass


class DeployInterrupted(OpsError):
    """SIGINT/SIGTERM/SIGHUP during a release: the recovery ran, then the task stops."""


class CannotStart(OpsError):
    """A stopped release that a recovery started again did not start or become healthy."""

    def __init__(self, name: str, release: str, reason: str) -> None:
        super().__init__(f"{name} ({release}) does not start: {reason}")
        self.name, self.release, self.reason = name, release, reason


class MigrationRefused(OpsError):
    """The release's new migrations would break the live release: refused before anything
    changed (recorded "failed": the release never ran, so it is not "bad")."""


# -- facts ---------------------------------------------------------------------------------


def has_image(runner: Runner, image: str) -> bool:
    return runner.query(apps.image_inspect(image)).ok


# -- the image -----------------------------------------------------------------------------


def build_release_image(
    stack: Stack, env: Environment, commit: str, tag: str, runner: Runner
) -> None:
    """Build the app image of exactly `commit` (uncommitted changes are not deployed), in a
    checkout of that commit beside this one; every command goes through `runner`."""
    if has_image(runner, f"{env.image}:{tag}"):
        return
    checkout = f"{tempfile.gettempdir()}/aiia-release-{tag}-{os.getpid()}"
    runner.run(git.worktree_add(checkout, commit))
    try:
        for argv in apps.release_build(stack, checkout, tag):
            runner.run(argv, stream=True)
    finally:
        runner.run(git.worktree_remove(checkout), check=False)


# -- the procedure -------------------------------------------------------------------------


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
    host: Host | None = None  # the target's entry in the stack (published ports); None: local
    # Does the target run another engine than this machine's (images are then shipped)?
    # None: yes unless its runner is local.
    remote_engine: bool | None = None
    # The config copy the new release mounts (set by write_config, recorded by finish).
    config: rcfg.ReleaseConfig | None = field(default=None, init=False)
    # What serves after a failure, as the recovery found it (empty: it did not run).
    after_failure: str = field(default="", init=False)

    @property
    def dry_run(self) -> bool:
        return isinstance(self.runner, PrintingRunner)

    @property
    def ships_images(self) -> bool:
        if self.remote_engine is not None:
            return self.remote_engine
        real = self.runner.reader if isinstance(self.runner, PrintingRunner) else self.runner
        return not isinstance(real, LocalRunner)

    def live(self) -> apps.Running | None:
        return inspect_release(self.runner, self.stack, self.env.container)

    def deploy(self, ref: str | None = None) -> dict:
        commit, tag = resolve_ref(ref)
        return self._release(tag, action="deploy", commit=commit)

    def rollback(self, to: str | None = None) -> dict:
        tag = self.rollback_target(to)
        return self._release(tag, action="rollback", commit=tag)

    def rollback_target(self, to: str | None) -> str:
        """The newest good earlier release (or the one `to` names) whose image is still
        on the host: never a bad release, never the live one."""
        live = self.live()
        history = self._history(self.env.name)
        for tag in apps.rollback_candidates(
            self.env.name, history, live.release if live else None, to
        ):
            if has_image(self.runner, f"{self.env.image}:{tag}"):
                return tag
        raise apps.no_rollback_target(self.env.name, self.stack.deploy.keep_releases)

    def _release(self, tag: str, action: str, commit: str) -> dict:
        """The whole release inside `interruptible()`: SIGTERM/SIGHUP (and Ctrl-C) run the
        recovery, itself `shielded()` so a second signal cannot cut it short."""
        with interruptible():
            return self._run_release(tag, action, commit)

    def _run_release(self, tag: str, action: str, commit: str) -> dict:
        env, run = self.env, self.steps.run
        if self.dry_run:
            self.steps.out(f"# dry run: {action} {tag} to {env.name}; nothing is changed\n")
        started = time.monotonic()
        run("preflight: stack, budget, engine, disk, current release", self.preflight)
        run(
            f"lock {env.name}",
            lambda: locks.acquire(
                self.runner,
                self.state_dir,
                locks.deploy_lock(env.name),
                version=tag,
                action=action,
                release_hint=f"invoke lock.release --env={env.name}",
                max_age=self.stack.deploy.lock_max_age.seconds,
                out=self.steps.out,
            ),
        )
        new_name = apps.next_name(env)
        self.journal: jn.Journal | None = None
        address = ""
        try:
            # A restore killed inside its PgBouncer PAUSE (we hold the deploy lock, which a
            # live restore holds too): its pool resumed before anything else.
            resume_if_paused(self.stack, self.runner, env)
            left = self.adopt_leftover()
            live = self.live()  # re-read: the preflight's snapshot may be stale now
            self.journal = jn.Journal(
                env.name, action, tag, "lock", new_name,
                old_name=live.name if live else "",
                old_address=live.address if live else "",
                old_release=live.release if live else "",
                pid=os.getpid(), started=now_iso(),
            )  # fmt: skip
            self._mark("lock")
            if (
                left
                and left.tag == tag
                and left.action == action
                and live
                and (live.release == tag and left.switched and self._served() == live.address)
            ):
                # A killed run of this same release had switched: finish it, no redeploy.
                self.steps.out(f"   {tag} already serves (left by pid {left.pid}): finishing")
                if live.config:
                    path = rcfg.config_dir(self.state_dir, env, live.config)
                    self.config = rcfg.ReleaseConfig(live.config, path, [])
                run("health through nginx", lambda: self.check_through_nginx(tag))
                address = live.address
            else:
                address = self._steps(tag, action, commit, live, new_name)
        except BaseException as exc:
            detail = str(exc).splitlines()[0] if str(exc) else exc.__class__.__name__
            interrupted = isinstance(exc, (Interrupted, KeyboardInterrupt))
            switched = bool(self.journal and self.journal.switched)
            try:
                with shielded():
                    clean = self.recover()
                    result = (
                        "interrupted" if interrupted
                        else "bad" if switched or isinstance(exc, DeployFailed) else "failed"
                    )  # fmt: skip
                    self.finish(tag, action, result, started, detail, clean=clean)
            except (Interrupted, KeyboardInterrupt):
                pass  # a second signal during the recovery: it was held until the end
            if interrupted:
                raise DeployInterrupted(
                    f"{action} of {env.name} to {tag} {detail}; the recovery ran (see above); "
                    f"run the same command again to finish it"
                ) from None
            raise
        try:
            with shielded():
                self.finish(tag, action, "good", started, "")
        except (Interrupted, KeyboardInterrupt) as exc:
            # The signal came while the release was being recorded: held until the record,
            # the journal and the lock were done. Nothing is left to recover.
            why = str(exc) if isinstance(exc, Interrupted) else "interrupted by SIGINT"
            raise DeployInterrupted(
                f"{action} of {env.name} to {tag} {why} after it was recorded good: "
                f"{tag} serves, nothing to recover"
            ) from None
        return {"release": tag, "address": address, "seconds": time.monotonic() - started}

    def _steps(
        self, tag: str, action: str, commit: str, live: apps.Running | None, new_name: str
    ) -> str:
        env, run = self.env, self.steps.run
        if action == "deploy":
            if self.take_backup:
                run(f"pre-deploy backup of {env.database}", self.take_backup)
                self._mark("backup")
            run(f"image {env.image}:{tag}", lambda: self.ensure_image(commit, tag))
            self._mark("image")
            run(
                "migration safety (new migrations vs the live release)",
                lambda: self.check_migrations(tag),
            )
            run(
                "migrations (straight to PostgreSQL)",
                lambda: self.one_off(tag, ["migrate", "--noinput"]),
            )
            self._mark("migrate")
        run("collectstatic", lambda: self.one_off(tag, ["collectstatic", "--noinput"]))
        address = apps.free_slot(env, live)
        self._mark("collectstatic", new_address=address)
        run(
            f"config of {tag} (gunicorn; env file from the stack)",
            lambda: self.write_config(tag, action),
        )
        run(
            f"start {tag} beside the live release on {address}",
            lambda: self.start_new(tag, address, new_name),
        )
        self._mark("start")
        run(f"health of {tag} on its own address", lambda: self.wait_healthy(new_name))
        self._mark("health")
        run(
            "switch nginx to the new release (graceful reload)",
            lambda: self.point_nginx(address, tag, new_name),
        )
        run("health through nginx", lambda: self.check_through_nginx(tag))
        run("drain and stop the previous release", lambda: self.retire(live, new_name))
        return address

    # -- the journal and what a killed run left ------------------------------------------

    def _mark(self, step: str, **changes) -> None:
        """The journal at a step boundary, written atomically on the target."""
        if self.journal is None:
            return
        self.journal = self.journal.at(step, **changes)
        if not self.dry_run:
            path = jn.journal_path(self.state_dir, self.env.name)
            self.runner.write_file(path, self.journal.to_json(), mode=0o644)

    def read_journal(self) -> jn.Journal | None:
        return jn.parse_journal(
            self.runner.read_file(jn.journal_path(self.state_dir, self.env.name))
        )

    def _served(self) -> str | None:
        """The address nginx is told to serve for this environment: its recorded switch
        state, else (never switched this way) the final-name container's, if it runs."""
        state = sw.recorded(self.runner, self.state_dir, self.env.name)
        if state is not None:
            return state.address
        live = self.live()
        return live.address if live and live.running else None

    def adopt_leftover(self) -> jn.Journal | None:
        """What a killed run left (we hold the lock now, so no running deploy owns it),
        resolved from what the engine shows and what nginx is told to serve: a `-next`
        that serves is adopted, never removed. Returns the killed run's journal."""
        left = self.read_journal()
        if left is not None and left.finished:
            left = None
        nxt = inspect_release(self.runner, self.stack, apps.next_name(self.env))
        final = self.live()
        if left is None and nxt is None and (final is None or final.running):
            return None
        if left is not None:
            self.steps.out(
                f"   a {left.action} of {left.tag} (pid {left.pid}, started {left.started}) "
                f"stopped after step {left.step!r}: resolving what it left"
            )
        plan = jn.reconcile(
            self.env.container, final, nxt, self._served(),
            drain_seconds=self.stack.deploy.drain_timeout.whole_seconds,
        )  # fmt: skip
        try:
            self.apply_plan(plan)
        except CannotStart as exc:
            # Nothing serves and the stopped release cannot come back (its config copy or
            # image gone with a lost state dir, a crash at boot): the deploy replaces it.
            # nginx was not pointed at it; a -next is never needed once nothing runs.
            self.steps.out(
                paint(
                    f"   {exc}; nothing serves {self.env.name}: the deploy goes on and replaces it",
                    "warning",
                )
            )
            if exc.name != self.env.container:
                self.runner.run(apps.remove_container(exc.name), check=False)
            self.runner.run(apps.remove_container(apps.next_name(self.env)), check=False)
        return left

    def apply_plan(self, plan: jn.Plan) -> None:
        """Carry out a reconcile plan (journal.py), step by step, printed."""
        if plan.changes:
            self.steps.out(f"   {plan.why}")
        for note in plan.notes:
            self.steps.out(f"   {note}")
        old: set[str] | None = None  # nginx workers from before our switch (None: unknown)
        kinds = {a.kind for a in plan.actions}
        if "stop" in kinds and "switch" not in kinds:
            # The switch state may be ahead of nginx (a run killed between recording it and
            # the reload): make nginx serve what is recorded before anything is stopped.
            self.steps.out("   nginx made to serve the recorded switch state")
            old = self.resync_nginx()
        for a in plan.actions:
            self.steps.out(f"   {a}")
            if a.kind == "start":
                try:
                    self.runner.run(apps.start_container(a.name))
                    self.wait_healthy(a.name)
                except (CommandFailed, DeployFailed) as exc:
                    said = exc.stderr if isinstance(exc, CommandFailed) else str(exc)
                    reason = next(
                        (ln.strip() for ln in said.splitlines() if ln.strip()), "no reason"
                    )
                    release = plan.serves.release if plan.serves else "?"
                    raise CannotStart(a.name, release, reason) from None
            elif a.kind == "switch":
                old = self._switch(f"{a.to}:{self.env.port}", a.release, a.name)
            elif a.kind == "stop":
                self.wait_drained(old)
                self.runner.run(apps.stop_container(a.name, int(a.to)))
            elif a.kind == "remove":
                self.runner.run(apps.remove_container(a.name))
            elif a.kind == "rename":
                self.runner.run(apps.rename_container(a.name, a.to))

    # -- steps ---------------------------------------------------------------------------

    def preflight(self) -> apps.Running | None:
        findings = check_budget(self.stack)
        if has_errors(findings):
            errors = "; ".join(f.message for f in findings if f.severity == "error")
            raise OpsError(f"the stack does not fit the machine: {errors} (invoke config.check)")
        if not self.runner.query(apps.engine_version()).ok:
            raise OpsError("the Docker engine does not answer on the host; run invoke provision")
        df = self.runner.query(apps.free_disk(self.state_dir))
        avail = apps.parse_free_disk(df.stdout) if df.ok else None
        problem = apps.disk_problem(avail, self.state_dir)
        if problem:
            raise OpsError(problem)
        for svc in ("pgbouncer", "postgresql", "redis"):
            name = getattr(self.stack.services, svc).container
            if self.runner.query(apps.is_running(name)).stdout.strip() != "true":
                raise OpsError(f"{name} is not running; start the stack first: invoke up")
        return self.live()

    def ensure_image(self, commit: str, tag: str) -> None:
        image = f"{self.env.image}:{tag}"
        if has_image(self.runner, image):
            return  # built or shipped before (a redeploy, or a rollback's image)
        build_release_image(self.stack, self.env, commit, tag, self.local)
        if self.ships_images:
            # No registry: the image travels over the SSH connection.
            self.runner.pipe_from_local(apps.save_image(image), apps.load_image())

    def check_migrations(self, tag: str) -> None:
        """The new image's `migration_safety` against the live database: its migrations not
        applied there yet must not drop, rename or tighten what the live release uses."""
        result = self.runner.run(
            apps.migration_safety(self.stack, self.env, self.state_dir, tag), check=False
        )
        verdict, detail = apps.migration_safety_verdict(
            result.code, self.runner.scrub(result.stdout), self.runner.scrub(result.stderr)
        )
        if verdict == "ok":
            for line in detail.splitlines():
                self.steps.out(f"   {line}")
        elif verdict == "absent":
            self.steps.out(
                paint(f"   {tag} has no migration safety check (an older release): not checked",
                      "warning")
            )  # fmt: skip
        elif verdict == "refused":
            first = detail.splitlines()[0].removeprefix("migration safety: refused: ")
            raise MigrationRefused(
                f"migration safety refused {tag}: {first}\n{detail}\n"
                "The live release keeps serving; nothing was migrated."
            )
        else:
            raise OpsError(f"the migration safety check of {tag} could not run:\n{detail}")

    def one_off(self, tag: str, args: list[str]) -> None:
        self.runner.run(
            cmd.one_off_app(self.stack, self.env, self.state_dir, tag, args), stream=True
        )

    def write_config(self, tag: str, action: str) -> None:
        """The environment's files from the stack (its env file holds the current secrets),
        and the config dir the new release mounts: on a rollback the copy its release was
        recorded good with, if still whole here; else the stack's, copied by content."""
        files = sw.app_files(self.stack, self.secrets, self.state_dir, self.env.name)
        sync_files(self.runner, files)
        if action == "rollback":
            kept, why = self.kept_config(tag)
            if kept is not None:
                self.config = kept
                self.steps.out(f"   its own config, kept since its deploy: {kept.path}")
                return
            self.steps.out(f"   {why}: its config is rendered from the current stack")
        self.config = rcfg.release_config(files, self.state_dir, self.env)
        sync_files(self.runner, self.config.files)
        self.steps.out(f"   config {self.config.digest}: {self.config.path}")

    def kept_config(self, tag: str) -> tuple[rcfg.ReleaseConfig | None, str]:
        """`tag`'s recorded config copy if every file its manifest lists is intact, else
        (None, why not)."""
        digest = rcfg.recorded_config(self._history(self.env.name), tag)
        if digest is None:
            return None, f"no config recorded for {tag} (deployed before releases kept one)"
        path = rcfg.config_dir(self.state_dir, self.env, digest)
        listed = rcfg.manifest_files(self.runner.read_file(f"{path}/{rcfg.MANIFEST}"), digest)
        if listed is None:
            return None, f"{tag}'s config copy {path} is gone or was never finished"
        contents = {name: self.runner.read_file(f"{path}/{name}") for name in listed}
        problem = rcfg.copy_problem(listed, contents)
        if problem:
            return None, f"{tag}'s config copy {path}: {problem}"
        return rcfg.ReleaseConfig(digest, path, []), ""

    def start_new(self, tag: str, address: str, name: str) -> None:
        self.runner.run(
            apps.run_release(
                self.stack, self.env, self.state_dir, tag, address, name, config=self.config
            )
        )

    def wait_healthy(self, name: str) -> None:
        timeout = self.stack.deploy.health_timeout
        probe = apps.health_probe(name)
        if self.dry_run:  # the container was not started: nothing to wait for
            self.steps.out(f"   (dry run: would wait up to {timeout} for: {quote(probe)})")
            return
        deadline = time.monotonic() + timeout.seconds
        while True:
            last = self.runner.query(probe)
            if last.ok:
                return
            if time.monotonic() > deadline:
                break
            state = self.runner.query(apps.container_status(name)).stdout.strip()
            if state in ("exited", "dead"):
                break
            time.sleep(1)
        logs = self.runner.query(apps.container_logs(name))
        raise DeployFailed(
            f"the new release did not become healthy within {timeout}: the live release "
            f"keeps serving.\n"
            f"--- health check output ---\n{(last.stdout + last.stderr).strip()}\n"
            f"--- last log lines of {name} ---\n{(logs.stdout + logs.stderr).strip()}"
        )

    def resync_nginx(self) -> set[str] | None:
        """nginx rendered from the recorded switch state and reloaded; its old workers."""
        return sw.switch(self.runner, self.stack, self.secrets, self.state_dir, out=self.steps.out)

    def _switch(self, upstream: str, release: str, container: str, **kw) -> set[str] | None:
        return sw.switch(
            self.runner, self.stack, self.secrets, self.state_dir,
            env=self.env.name, upstream=upstream, release=release, container=container,
            out=self.steps.out, **kw,
        )  # fmt: skip

    def point_nginx(self, address: str, tag: str, name: str) -> None:
        """Record the switch (journal first, then the switch state) and reload, under the
        host-wide switch lock."""
        self._old_workers = self._switch(
            f"{address}:{self.env.port}",
            tag,
            name,
            before_record=lambda: self._mark("switch", switched=True),
        )
        self._mark("reload")

    def check_through_nginx(self, tag: str) -> None:
        domain = self.env.domains[0]
        if self.dry_run:  # nginx was not reloaded: it still serves the live release
            self.steps.out(f"   (dry run: would check that https://{domain}/health/ reports {tag})")
            return
        port = (self.host or self.stack.local_host).published(443)
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

    def wait_drained(self, old: set[str] | None) -> None:
        """After a reload, nginx's old workers finish their requests (some still bound for
        the previous release) before exiting: stop that release only once they are gone.
        `old` None (the reload was a killed run's): every worker shutting down."""
        timeout = self.stack.deploy.drain_timeout
        if self.dry_run:  # no reload happened: today's workers would never leave
            self.steps.out(f"   (dry run: would wait up to {timeout} for nginx's old workers)")
            return
        if not sw.wait_drained(self.runner, self.stack, old, timeout.seconds):
            self.steps.out(paint("   nginx workers still draining; stopping anyway", "warning"))

    def retire(self, live: apps.Running | None, new_name: str) -> None:
        self.wait_drained(getattr(self, "_old_workers", None) or set())
        self.steps.out("   nginx drained")
        self._mark("drain")
        if live:
            # nginx's old workers finish their requests; gunicorn gets SIGTERM and drains.
            drain = self.stack.deploy.drain_timeout.whole_seconds
            self.runner.run(apps.stop_container(live.name, drain))
            self.runner.run(apps.remove_stopped(live.name))
            self.steps.out(f"   previous release stopped: {live.name} ({live.release})")
        self._mark("retire")
        self.runner.run(apps.rename_container(new_name, self.env.container))

    def recover(self) -> bool:
        """After a failure or a signal: re-read the engine and the recorded switch state,
        then go back to the previous release if it still runs, else keep what serves
        (never nginx at a stopped container, never the served one removed). Never raises;
        True if everything it planned was done."""
        try:
            final = self.live()
            nxt = inspect_release(self.runner, self.stack, apps.next_name(self.env))
            plan = jn.reconcile(
                self.env.container, final, nxt, self._served(), prefer_old=True,
                drain_seconds=self.stack.deploy.drain_timeout.whole_seconds,
            )  # fmt: skip
            self.apply_plan(plan)
            if nxt is None:  # the engine did not report one (an inspect that failed?): swept
                self.runner.run(apps.remove_container(apps.next_name(self.env)), check=False)
            if plan.serves:
                self.steps.out(f"   {self.env.name} serves {plan.serves.release}")
                self.after_failure = f"{self.env.name} serves {plan.serves.release}."
            else:
                self.after_failure = f"no release of {self.env.name} exists: nothing serves it."
            return True
        except (Exception, Interrupted, KeyboardInterrupt) as exc:
            msg = str(exc).splitlines()[0] if str(exc) else exc.__class__.__name__
            self.after_failure = (
                f"what {self.env.name} serves is unknown: the recovery stopped (above); "
                f"run the same command again."
            )
            self.steps.out(
                paint(f"   recovery stopped: {msg}; the next deploy resolves what is left", "error")
            )
            return False

    def finish(
        self, tag: str, action: str, result: str, started: float, detail: str, clean=True
    ) -> None:
        """Record the release, audit, prune, notify; the journal closed (if the state is
        clean) and the lock released. A failure of one part does not skip the next."""
        env = self.env.name
        try:
            entry = {
                "commit": tag,
                "image": f"{self.env.image}:{tag}",
                "action": action,
                "result": result,
                "duration_s": round(time.monotonic() - started, 1),
                "detail": detail,
                **({"config": self.config.digest} if self.config else {}),
            }
            self._append(f"releases/{env}.jsonl", release_line(env, entry))
            self._append("audit.log", audit_line(f"{action} {env} {tag}: {result}"))
            self.steps.out(f"   recorded: {action} of {env} to {tag}: {result}")
            self._mark("record")
            if result == "good":
                self.prune_images(tag)
                self.prune_configs()
            msg = f"{action} of {env} to {tag}: {result}" + (f" ({detail})" if detail else "")
            if self.dry_run:  # a notification is no command a runner could print
                self.steps.out(f"-> (dry run: would notify: {msg})")
            else:
                self.steps.out(f"-> notify: {notify(msg, Path(self.state_dir))}")
        finally:
            try:
                if clean:
                    self._mark("done")
            finally:
                locks.release(self.runner, self.state_dir, locks.deploy_lock(env))

    def _append(self, rel: str, line: str) -> None:
        """Append to a log on the host (the environment's lock is held: no other writer)."""
        path = f"{self.state_dir.rstrip('/')}/{rel}"
        before = self.runner.read_file(path) or b""
        self.runner.write_file(path, before + line.encode(), mode=0o644)

    def _history(self, env: str) -> list[dict]:
        data = self.runner.read_file(f"{self.state_dir.rstrip('/')}/releases/{env}.jsonl")
        return parse_releases(data or b"")

    def prune_images(self, current: str) -> None:
        """Keep the images of each environment's last N releases (deploy.keep_releases) and
        the live ones; remove older release images this host deployed."""
        histories, lives = {}, set()
        for other in self.stack.environments.values():
            live = inspect_release(self.runner, self.stack, other.container)
            lives |= {live.release} if live else set()
            histories[other.name] = self._history(other.name)
        keep = self.stack.deploy.keep_releases
        for tag in apps.images_to_prune(current, histories, lives, keep):
            self.runner.run(apps.remove_image(f"{self.env.image}:{tag}"), check=False)

    def prune_configs(self) -> None:
        """Remove the environment's config copies that none of its last N good releases
        recorded and no container of it mounts."""
        root = rcfg.releases_root(self.state_dir, self.env)
        listing = self.runner.query(["ls", "-1", root])
        if not listing.ok:
            return  # no copies yet
        in_use = {self.config.digest} if self.config else set()
        for name in (self.env.container, apps.next_name(self.env)):
            running = inspect_release(self.runner, self.stack, name)
            in_use |= {running.config} if running and running.config else set()
        history, keep = self._history(self.env.name), self.stack.deploy.keep_releases
        for digest in rcfg.configs_to_prune(listing.stdout.split(), history, keep, in_use):
            self.runner.run(["rm", "-rf", f"{root}/{digest}"], check=False)


# -- what the tasks call -------------------------------------------------------------------


def prepare(
    model: Stack,
    env_name: str,
    host: str | None = None,
    dry_run: bool = False,
    backup: bool = True,
    accept_new_host_key: bool = False,
) -> Deploy:
    """A Deploy of `env_name` to --host (default: the environment's first host). A dry run
    acts through printing runners that read from the real host and this machine."""
    env = model.environment(env_name)
    where = target(model, env_name, host, accept_new_host_key)
    secrets = target_secrets(model, where, create=not dry_run)  # a dry run writes nothing
    runner: Runner = where.runner
    local: Runner = LocalRunner()
    if dry_run:
        redacted = set(runner.secrets)
        runner = PrintingRunner(reader=runner, host=where.label, secrets=redacted)
        local = PrintingRunner(reader=local, host="build", secrets=redacted)
    deploy = Deploy(
        model,
        env,
        where.state_dir,
        runner,
        secrets,
        local=local,
        steps=Steps(),
        host=where.entry,
        remote_engine=not where.is_local,
    )
    if backup:
        deploy.take_backup = pre_deploy_backup(deploy)
    return deploy


def pre_deploy_backup(deploy: Deploy) -> Callable[[], object]:
    """The environment's database backed up where it lives: here, or on the SSH host by the
    host's own checkout (recorded in <state>/host.json by `invoke setup` there)."""
    if not deploy.ships_images:  # this machine's engine: back up from here
        from aiia_ops.flows.backup import take_backup

        return lambda: take_backup(
            deploy.stack,
            local_state_dir(deploy.stack),
            deploy.env.name,
            "pre-deploy",
            deploy.runner,
        )

    def remote() -> None:
        raw = deploy.runner.read_file(f"{deploy.state_dir}/host.json")
        if raw is None:
            raise OpsError(
                f"{deploy.state_dir}/host.json is missing on the host: run invoke "
                "setup there first (it records the checkout that takes backups)"
            )
        host = json.loads(raw)
        deploy.runner.run(
            [host["python"], "-m", "invoke", "--search-root", host["repo"],
             "backup", "--env", deploy.env.name, "--kind", "pre-deploy"],
            env={"AIIA_STATE_DIR": deploy.state_dir, "AIIA_STACK": host["stack"]},
            stream=True,
        )  # fmt: skip

    return remote


def explained(d: Deploy, fn: Callable[[], dict]) -> dict:
    """Run a release; on a failure, say what still serves before the error is shown."""
    try:
        return fn()
    except DeployInterrupted:
        raise  # what serves was said by the recovery (or the release was recorded good)
    except OpsError:
        serves = d.after_failure or f"{d.env.name} still serves the previous release."
        print(
            f"\n{serves} The database is never rolled back automatically "
            "(see invoke backup.restore).",
            file=sys.stderr,
        )
        raise


def deploy(model: Stack, env_name: str, ref: str | None = None, **options) -> dict:
    """invoke deploy: `options` are prepare()'s (host, dry_run, accept_new_host_key)."""
    if model.runtime == "swarm":  # issue 16: the engine updates and rolls back
        from aiia_ops.flows import swarm

        # The pre-deploy backup is the compose path's step (on by default, so the flag
        # cannot say whether it was asked for): on a swarm it is skipped, and said so.
        if options.pop("backup", False):
            print(
                "-> pre-deploy backup: skipped on runtime: swarm (invoke backup does not "
                "reach the swarm's database node yet; the engine rolls back the release)"
            )
        swarm.refuse_options(options)
        return {**swarm.deploy(model, env_name, ref), "dry_run": False}
    d = prepare(model, env_name, **options)
    return {**explained(d, lambda: d.deploy(ref)), "dry_run": d.dry_run}


def rollback(model: Stack, env_name: str, to: str | None = None, **options) -> dict:
    if model.runtime == "swarm":  # issue 16: the engine's own rollback (previous spec)
        from aiia_ops.flows import swarm

        swarm.refuse_options({**options, "to": to})
        return {**swarm.rollback(model, env_name), "dry_run": False}
    d = prepare(model, env_name, backup=False, **options)
    return {**explained(d, lambda: d.rollback(to)), "dry_run": d.dry_run}


def migrate(model: Stack, env_name: str) -> str:
    """The live release's migrations in a one-off container, under the deploy lock."""
    d = prepare(model, env_name, backup=False)
    live = d.live()
    if not live:
        raise OpsError(f"{env_name} has no release yet: invoke deploy --env={env_name}")
    with locks.holding(
        d.runner,
        d.state_dir,
        locks.deploy_lock(d.env.name),
        version=live.release,
        action="migrate",
        release_hint=f"invoke lock.release --env={d.env.name}",
    ):
        d.one_off(live.release, ["migrate", "--noinput"])
    return live.release


__all__ = [
    "CommandFailed",
    "Deploy",
    "DeployFailed",
    "DeployInterrupted",
    "MigrationRefused",
    "inspect_release",
    "live_upstreams",
    "resolve_ref",
    "write_host_files",
]
