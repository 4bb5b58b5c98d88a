"""`invoke provision` and `invoke engine.stop`: read facts -> plan -> run, nothing more."""

from __future__ import annotations

import time
from pathlib import Path

from invoke import Exit

from aiia_ops.commands import facts as _facts
from aiia_ops.commands import provision as _prov
from aiia_ops.commands.argv import quote
from aiia_ops.errors import OpsError
from aiia_ops.host.runners import LocalRunner, Runner
from aiia_ops.tasks.common import task

REPO = Path(__file__).resolve().parents[3]
BASE_CONTEXT = REPO / "services" / "base"


def _plan(runner: Runner, phases: tuple[str, ...]) -> list[_prov.Step]:
    facts = _facts.gather(runner)
    return _prov.plan(
        facts,
        phases=phases,
        base_context=str(BASE_CONTEXT),
        base_sha=_facts.context_sha(BASE_CONTEXT),
    )


def _print_dry(steps: list[_prov.Step]) -> None:
    for n, step in enumerate(steps, 1):
        print(f"[{n}/{len(steps)}] {step.name}: {step.description}")
        if step.skip:
            print(f"    skip: {step.skip}")
            continue
        for c in step.commands:
            print(f"    $ {quote(c.argv)}" + ("   # may fail" if not c.check else ""))
        if step.wait_for:
            print(f"    wait up to {step.wait_seconds:.0f}s until: {quote(step.wait_for)}")
        if step.fallback:
            print(f"    if that fails ({step.fallback_note}):")
            for c in step.fallback:
                print(f"      $ {quote(c.argv)}" + (" <<'EOF'" if c.input else ""))
                if c.input:
                    print(
                        "".join(f"        {line}".rstrip() + "\n" for line in c.input.splitlines())
                        + "        EOF"
                    )


def _run_commands(runner: Runner, commands: tuple[_prov.Command, ...], verbose: bool) -> None:
    for c in commands:
        print(f"    $ {quote(c.argv)}", flush=True)
        t0 = time.monotonic()
        runner.run(c.argv, check=c.check, timeout=c.timeout, input=c.input, stream=verbose)
        took = time.monotonic() - t0
        if took >= 1:
            print(f"      ({took:.1f}s)", flush=True)


def _wait(runner: Runner, step: _prov.Step) -> None:
    deadline = time.monotonic() + step.wait_seconds
    while True:
        if runner.run(step.wait_for, check=False, timeout=5).ok:
            return
        if time.monotonic() > deadline:
            raise OpsError(
                f"{step.name}: still no answer from `{quote(step.wait_for)}` after "
                f"{step.wait_seconds:.0f}s. Look at {_prov.LOGFILE} (or `journalctl -u docker` "
                "with systemd), fix the cause, then rerun `invoke provision`."
            )
        time.sleep(0.5)


def _run_step(runner: Runner, step: _prov.Step, verbose: bool) -> None:
    try:
        _run_commands(runner, step.commands, verbose)
    except OpsError as exc:
        if not step.fallback:
            raise
        first = str(exc).splitlines()[0]
        print(f"    ! {first}\n    -> {step.fallback_note}", flush=True)
        _run_commands(runner, step.fallback, verbose)
    if step.wait_for:
        _wait(runner, step)


@task(
    help={
        "dry_run": "print the plan's exact commands (facts are read, nothing is changed)",
        "verbose": "show the output of each command as it runs",
    }
)
def provision(c, dry_run=False, verbose=False):
    """Make this machine able to run the stack: Docker engine, compose v2, base images."""
    runner = LocalRunner()
    try:
        if dry_run:
            _print_dry(_plan(runner, _prov.PHASES))
            return
        timings: list[tuple[str, str, float]] = []
        started = time.monotonic()
        for phase in _prov.PHASES:  # facts re-read per phase: each one changes the next
            steps = _plan(runner, (phase,))
            for step in steps:
                if step.skip:
                    print(f"- {step.name}: skip ({step.skip})", flush=True)
                    timings.append((step.name, "skipped", 0.0))
                    continue
                print(f"- {step.name}: {step.description}", flush=True)
                t0 = time.monotonic()
                _run_step(runner, step, verbose)
                took = time.monotonic() - t0
                print(f"  done in {took:.1f}s", flush=True)
                timings.append((step.name, "done", took))
        total = time.monotonic() - started
    except OpsError as exc:
        raise Exit(f"provision: {exc}") from None
    print(f"\n{'step':<16}{'result':<10}{'seconds':>8}")
    for name, result, took in timings:
        print(f"{name:<16}{result:<10}{took:>8.1f}")
    print(f"{'total':<26}{total:>8.1f}")


@task(name="stop")
def engine_stop(c):
    """Stop the dockerd that `invoke provision` started (by its pidfile), and only that one."""
    runner = LocalRunner()
    try:
        stop = _prov.plan_engine_stop(_facts.gather(runner))
        print(stop.message)
        for argv in stop.commands:
            print(f"$ {quote(argv)}")
            runner.run(argv)
    except OpsError as exc:
        raise Exit(f"engine.stop: {exc}") from None
