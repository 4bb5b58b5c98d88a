"""`invoke test --env=ENV`: the CI test phase in the built app image (commands/apptest.py
builds every command). Each phase runs in a throwaway container of aiia/django:TAG against a
throwaway aiia/postgres:TAG on a private network made for this run, removed at the end."""

from __future__ import annotations

import os
import secrets
import time
import uuid
from pathlib import PurePosixPath

from aiia_ops.commands import apptest
from aiia_ops.commands import docker as cmd
from aiia_ops.commands.argv import quote
from aiia_ops.errors import OpsError
from aiia_ops.flows.output import paint, table
from aiia_ops.host.runners import LocalRunner, Runner
from aiia_ops.model import Stack

DB_WAIT_SECONDS = 90.0
PHASE_TIMEOUT_SECONDS = 900.0


def _say(line: str) -> None:
    print(line, flush=True)


def require_images(runner: Runner, model: Stack, env: str, tag: str) -> None:
    for image in apptest.images(model, env, tag):
        if not runner.query(cmd.image_inspect(image)).ok:
            raise OpsError(
                f"image {image} is not built: run `invoke build` first (it tags the images "
                "with this commit), or pass --tag with a tag that exists (docker images aiia/*)"
            )


def write_files(runner: Runner, root: str) -> tuple[str, str]:
    """The throwaway server's config and the settings overlay, readable by UID 10001."""
    pg_dir, overlay_dir = f"{root}/postgresql", f"{root}/overlay"
    for path, text in apptest.files(PurePosixPath(pg_dir), PurePosixPath(overlay_dir)).items():
        runner.write_file(str(path), text, mode=0o644)
    runner.run(["chmod", "755", root, pg_dir, overlay_dir])
    return pg_dir, overlay_dir


def start_database(runner: Runner, plan: apptest.AppTestPlan, values: dict, out=_say) -> None:
    out(f"-> throwaway PostgreSQL {plan.db_container} on network {plan.network}")
    runner.run(plan.create_network)
    runner.run(plan.start_db, env=values)
    deadline = time.monotonic() + DB_WAIT_SECONDS
    while not runner.query(plan.db_ready, timeout=10).ok:
        state = runner.query(cmd.container_status(plan.db_container)).stdout.strip()
        if state != "running" or time.monotonic() > deadline:
            logs = runner.query(cmd.container_logs(plan.db_container, 30))
            raise OpsError(
                f"the throwaway PostgreSQL did not become ready ({state or 'gone'}); "
                f"its last log lines:\n{runner.scrub(logs.stdout + logs.stderr)}"
            )
        time.sleep(0.5)
    runner.run(plan.ensure_db, input=values[apptest.DB_PASSWORD_VAR] + "\n")


def run_phase(
    runner: Runner, phase: apptest.Phase, values: dict, out=_say
) -> tuple[str, bool, float]:
    out(f"\n-> {phase.name}: {phase.description}")
    if os.environ.get("AIIA_VERBOSE"):
        out(f"   $ {quote(phase.argv)}")
    t0 = time.monotonic()
    result = runner.run(
        phase.argv, check=False, env=values, stream=True, timeout=PHASE_TIMEOUT_SECONDS
    )
    took = time.monotonic() - t0
    if not result.ok:
        out(paint(f"   {phase.name} failed (exit {result.code}) after {took:.1f}s", "error"))
    return phase.name, result.ok, took


def test(
    model: Stack, env: str, tag: str, runner: Runner | None = None, out=_say
) -> list[tuple[str, bool, float]]:
    """Every phase, in order; the database, the network and the files removed at the end.
    Raises OpsError naming the failed phases."""
    model.environment(env)  # unknown environment: a clear error before anything starts
    runner = runner or LocalRunner()
    require_images(runner, model, env, tag)
    values = {
        apptest.PG_PASSWORD_VAR: secrets.token_urlsafe(24),
        apptest.DB_PASSWORD_VAR: secrets.token_urlsafe(24),
        apptest.SECRET_KEY_VAR: secrets.token_urlsafe(50),
    }
    runner.redact(*values.values())
    run_id = uuid.uuid4().hex[:8]
    started = time.monotonic()
    root = runner.run(["mktemp", "-d", "-t", "aiia-apptest-XXXXXXXX"]).stdout.strip()
    try:
        pg_dir, overlay_dir = write_files(runner, root)
        plan = apptest.plan(model, env, tag, run_id, pg_dir, overlay_dir)
        out(f"testing {plan.image} with the {env} settings (run {run_id})")
        try:
            start_database(runner, plan, values, out)
            results = [run_phase(runner, phase, values, out) for phase in plan.phases]
        finally:
            for argv in plan.teardown:
                runner.run(argv, check=False)
    finally:
        runner.run(["rm", "-rf", root], check=False)
    rows = [[name, paint("ok" if ok else "FAIL", "ok" if ok else "FAIL"), f"{s:.1f}s"]
            for name, ok, s in results]  # fmt: skip
    out("")
    out(table(["phase", "result", "time"], rows))
    failed = [name for name, ok, _ in results if not ok]
    if failed:
        raise OpsError(
            f"{len(failed)} of {len(results)} phases failed ({', '.join(failed)}) "
            f"for aiia/django:{tag} with the {env} settings; their output is above"
        )
    out(f"all {len(results)} phases passed in {time.monotonic() - started:.0f}s")
    return results
