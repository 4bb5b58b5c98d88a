"""invoke test --env=ENV: the CI test phase in the built app image (commands/apptest.py)."""

from __future__ import annotations

import os
import secrets
import tempfile
import time
import uuid
from pathlib import Path, PurePosixPath

from invoke import Exit

from aiia_ops.commands import apptest
from aiia_ops.commands.argv import quote
from aiia_ops.errors import OpsError
from aiia_ops.flows.output import paint, table
from aiia_ops.host.runners import LocalRunner
from aiia_ops.model import load_stack
from aiia_ops.tasks.common import current_version, task

DB_WAIT_SECONDS = 90.0
PHASE_TIMEOUT_SECONDS = 900.0


def _write_files(root: Path) -> tuple[Path, Path]:
    """The throwaway server's config and the settings overlay, readable by UID 10001."""
    pg_dir, overlay_dir = root / "postgresql", root / "overlay"
    for path, text in apptest.files(PurePosixPath(pg_dir), PurePosixPath(overlay_dir)).items():
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(text)
        os.chmod(path, 0o644)
    for d in (root, pg_dir, overlay_dir):
        os.chmod(d, 0o755)
    return pg_dir, overlay_dir


@task(
    help={
        "env": "the environment whose production settings are checked: prod or staging",
        "tag": "image tag to test (default: this commit, as `invoke build` tags it)",
    }
)
def test(c, env="prod", tag=None, stack=None):
    """The CI test phase in the built app image: checks, migrations, test suite, static files.

    Each phase runs in a throwaway container of aiia/django:TAG; the database is a throwaway
    aiia/postgres:TAG container on a private network made for this run, removed at the end.
    """
    model = load_stack(stack)
    model.environment(env)  # unknown environment: a clear error before anything starts
    tag = tag or current_version()
    runner = LocalRunner()
    for image in apptest.images(model, env, tag):
        if not runner.run(["docker", "image", "inspect", image], check=False).ok:
            raise OpsError(
                f"image {image} is not built: run `invoke build` first (it tags the images "
                "with this commit), or pass --tag with a tag that exists (docker images aiia/*)"
            )
    values = {
        apptest.PG_PASSWORD_VAR: secrets.token_urlsafe(24),
        apptest.DB_PASSWORD_VAR: secrets.token_urlsafe(24),
        apptest.SECRET_KEY_VAR: secrets.token_urlsafe(50),
    }
    runner.redact(*values.values())
    run_id = uuid.uuid4().hex[:8]
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="aiia-apptest-") as tmp:
        pg_dir, overlay_dir = _write_files(Path(tmp))
        plan = apptest.plan(model, env, tag, run_id, str(pg_dir), str(overlay_dir))
        print(f"testing {plan.image} with the {env} settings (run {run_id})", flush=True)
        try:
            _start_database(runner, plan, values)
            results = [_run_phase(runner, phase, values) for phase in plan.phases]
        finally:
            for argv in plan.teardown:
                runner.run(argv, check=False)
    rows = [[name, paint("ok" if ok else "FAIL", "ok" if ok else "FAIL"), f"{s:.1f}s"]
            for name, ok, s in results]  # fmt: skip
    print()
    print(table(["phase", "result", "time"], rows))
    failed = [name for name, ok, _ in results if not ok]
    if failed:
        raise Exit(
            f"error: {len(failed)} of {len(results)} phases failed ({', '.join(failed)}) "
            f"for aiia/django:{tag} with the {env} settings; their output is above",
            code=1,
        )
    print(f"all {len(results)} phases passed in {time.monotonic() - started:.0f}s")


def _start_database(runner: LocalRunner, plan: apptest.AppTestPlan, values: dict) -> None:
    print(f"-> throwaway PostgreSQL {plan.db_container} on network {plan.network}", flush=True)
    runner.run(plan.create_network)
    runner.run(plan.start_db, env=values)
    deadline = time.monotonic() + DB_WAIT_SECONDS
    while not runner.run(plan.db_ready, check=False, timeout=10).ok:
        state = runner.run(
            ["docker", "inspect", "--format", "{{.State.Status}}", plan.db_container], check=False
        ).stdout.strip()
        if state != "running" or time.monotonic() > deadline:
            logs = runner.run(["docker", "logs", "--tail", "30", plan.db_container], check=False)
            raise OpsError(
                f"the throwaway PostgreSQL did not become ready ({state or 'gone'}); "
                f"its last log lines:\n{runner.scrub(logs.stdout + logs.stderr)}"
            )
        time.sleep(0.5)
    runner.run(plan.ensure_db, input=values[apptest.DB_PASSWORD_VAR] + "\n")


def _run_phase(runner: LocalRunner, phase: apptest.Phase, values: dict) -> tuple[str, bool, float]:
    print(f"\n-> {phase.name}: {phase.description}", flush=True)
    if os.environ.get("AIIA_VERBOSE"):
        print(f"   $ {quote(phase.argv)}", flush=True)
    t0 = time.monotonic()
    result = runner.run(
        phase.argv, check=False, env=values, stream=True, timeout=PHASE_TIMEOUT_SECONDS
    )
    took = time.monotonic() - t0
    if not result.ok:
        print(paint(f"   {phase.name} failed (exit {result.code}) after {took:.1f}s", "error"))
    return phase.name, result.ok, took
