"""`invoke provision` and `invoke engine.stop`: read the host's facts -> plan -> run.

Facts are asked with `runner.query()` (commands/facts.py: a command plus a parser each), so a
dry run over `PrintingRunner(reader=LocalRunner())` plans against the real machine. The plan
is re-made per phase when it runs: each phase changes the facts the next one reads.
"""

from __future__ import annotations

import time
from typing import Any

from aiia_ops import SERVICES_DIR
from aiia_ops.commands import facts as F
from aiia_ops.commands import provision as P
from aiia_ops.commands.argv import quote
from aiia_ops.errors import OpsError
from aiia_ops.flows.steps import Steps
from aiia_ops.host.files import context_sha
from aiia_ops.host.runners import Runner

BASE_CONTEXT = SERVICES_DIR / "base"
FACT_TIMEOUT = 10


def _say(line: str) -> None:
    print(line, flush=True)


def gather(runner: Runner) -> P.HostFacts:
    """Read every fact (read-only commands). Image facts only when the engine answers."""
    values: dict[str, Any] = {}

    def ask(fact: F.Fact) -> None:
        F.apply(values, fact, runner.query(fact.argv, timeout=FACT_TIMEOUT))

    for fact in F.FACTS:
        ask(fact)
    ask(F.ENGINE_FACT)
    ask(F.ENGINE_FACTS[0])  # `docker compose` is a client plugin: readable without an engine
    if values["engine_version"]:
        for fact in F.ENGINE_FACTS[1:]:
            ask(fact)
    pid = values.get("pidfile_pid")
    if pid:
        comm = F.parse_comm(runner.query(F.comm_argv(pid), timeout=FACT_TIMEOUT))
        values["pidfile_pid"] = pid if comm == "dockerd" else None
    return P.HostFacts(**values)


def plan(runner: Runner, phases: tuple[str, ...] = P.PHASES) -> list[P.Step]:
    return P.plan(
        gather(runner),
        phases=phases,
        base_context=str(BASE_CONTEXT),
        base_sha=context_sha(BASE_CONTEXT),
    )


def print_plan(steps: list[P.Step], out=_say) -> None:
    """The dry run's output: every step, its skip reason or its exact commands."""
    for n, step in enumerate(steps, 1):
        out(f"[{n}/{len(steps)}] {step.name}: {step.description}")
        if step.skip:
            out(f"    skip: {step.skip}")
            continue
        for c in step.commands:
            out(f"    $ {quote(c.argv)}" + ("   # may fail" if not c.check else ""))
        if step.wait_for:
            out(f"    wait up to {step.wait_seconds:.0f}s until: {quote(step.wait_for)}")
        if step.fallback:
            out(f"    if that fails ({step.fallback_note}):")
            for c in step.fallback:
                out(f"      $ {quote(c.argv)}" + (" <<'EOF'" if c.input else ""))
                if c.input:
                    out(
                        "".join(f"        {line}".rstrip() + "\n" for line in c.input.splitlines())
                        + "        EOF"
                    )


def _run_commands(runner: Runner, commands: tuple[P.Command, ...], verbose: bool, out) -> None:
    for c in commands:
        out(f"    $ {quote(c.argv)}")
        t0 = time.monotonic()
        runner.run(c.argv, check=c.check, timeout=c.timeout, input=c.input, stream=verbose)
        took = time.monotonic() - t0
        if took >= 1:
            out(f"      ({took:.1f}s)")


def _wait(runner: Runner, step: P.Step) -> None:
    deadline = time.monotonic() + step.wait_seconds
    while True:
        if runner.query(step.wait_for, timeout=5).ok:
            return
        if time.monotonic() > deadline:
            raise OpsError(
                f"{step.name}: still no answer from `{quote(step.wait_for)}` after "
                f"{step.wait_seconds:.0f}s. Look at {P.LOGFILE} (or `journalctl -u docker` "
                "with systemd), fix the cause, then rerun `invoke provision`."
            )
        time.sleep(0.5)


def run_step(runner: Runner, step: P.Step, verbose: bool = False, out=_say) -> None:
    try:
        _run_commands(runner, step.commands, verbose, out)
    except OpsError as exc:
        if not step.fallback:
            raise
        first = str(exc).splitlines()[0]
        out(f"    ! {first}\n    -> {step.fallback_note}")
        _run_commands(runner, step.fallback, verbose, out)
    if step.wait_for:
        _wait(runner, step)


def provision(runner: Runner, verbose: bool = False, out=_say) -> list[tuple[str, str, float]]:
    """Run the plan phase by phase (facts re-read per phase: each one changes the next).
    Returns (step, result, seconds) per step."""
    steps = Steps(out=out)
    timings: list[tuple[str, str, float]] = []
    for phase in P.PHASES:
        for step in plan(runner, (phase,)):
            if step.skip:
                out(f"-> {step.name}: skip ({step.skip})")
                timings.append((step.name, "skipped", 0.0))
                continue
            steps.run(
                f"{step.name}: {step.description}", lambda s=step: run_step(runner, s, verbose, out)
            )
            timings.append((step.name, "done", steps.timings[-1][1]))
    return timings


def timings_table(timings: list[tuple[str, str, float]], total: float) -> str:
    lines = [f"{'step':<16}{'result':<10}{'seconds':>8}"]
    lines += [f"{name:<16}{result:<10}{took:>8.1f}" for name, result, took in timings]
    lines.append(f"{'total':<26}{total:>8.1f}")
    return "\n".join(lines)


def engine_stop(runner: Runner, out=_say) -> None:
    """Stop the dockerd `invoke provision` started (by its pidfile), and only that one."""
    stop = P.plan_engine_stop(gather(runner))
    out(stop.message)
    for argv in stop.commands:
        out(f"$ {quote(argv)}")
        runner.run(argv)
