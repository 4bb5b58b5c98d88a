"""Issue #3's figures: image sizes, idle memory per container and for the stack, cold
`invoke setup` wall time, and the app image's rebuild time after a code-only change.

    AIIA_STACK=... AIIA_STATE_DIR=... python benchmarks/stack_bench.py [--cold]

--cold removes the stack named by the stack file (containers, volumes, network) and times
`invoke setup --env=prod` then `--env=staging` from nothing (images already built; the
engine's own cold install is measured by `invoke provision`, docs/provision.md).
Figures go to docs/benchmarks.md and docs/benchmarks/stack.json.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from aiia_ops.host.engine import Engine
from aiia_ops.host.git import image_tag
from aiia_ops.host.runners import LocalRunner
from aiia_ops.model import load_stack
from aiia_ops.model.units import Size
from benchmarks.common import DOCS, ROOT, machine_note, mb, stack_memory, write_section


def timed(argv: list[str]) -> float:
    started = time.monotonic()
    subprocess.run(argv, cwd=ROOT, check=True, stdout=subprocess.DEVNULL)
    return time.monotonic() - started


def rebuild_after_code_change() -> float:
    """Build a copy of services/django with one view changed, on top of a cached build."""
    tmp = Path(tempfile.mkdtemp(prefix="aiia-bench-"))
    try:
        ctx = tmp / "django"
        shutil.copytree(
            ROOT / "services" / "django",
            ctx,
            ignore=shutil.ignore_patterns("__pycache__", "*.sqlite3"),
        )
        subprocess.run(
            ["docker", "build", "-q", "-t", "aiia/django:bench", str(ctx)],
            check=True,
            stdout=subprocess.DEVNULL,
        )
        views = ctx / "app" / "courses" / "views.py"
        views.write_text(views.read_text() + f"\n# benchmark change {time.time()}\n")
        return timed(["docker", "build", "-q", "-t", "aiia/django:bench", str(ctx)])
    finally:
        subprocess.run(["docker", "image", "rm", "aiia/django:bench"], capture_output=True)
        shutil.rmtree(tmp, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--cold", action="store_true")
    parser.add_argument("--settle", type=float, default=60, help="seconds idle before measuring")
    args = parser.parse_args()
    stack = load_stack()
    data: dict = {"when": machine_note()}

    if args.cold:
        subprocess.run(
            [sys.executable, "-c", "from tests.e2e.conftest import reset_stack; reset_stack()"],
            cwd=ROOT,
            check=True,
        )
        data["cold_setup_s"] = {
            env: round(
                timed([sys.executable, "-m", "invoke", "setup", f"--env={env}", "--skip-build"]), 1
            )
            for env in ("prod", "staging")
        }

    images = [f"aiia/{f}:{image_tag(f)}" for f in ("nginx", "postgres", "pgbouncer", "redis",
                                                     "django")] + ["aiia/base:trixie"]  # fmt: skip
    found = Engine(LocalRunner()).image_sizes(images)
    sizes = {image: found.get(image) for image in images}  # None: not built
    if sizes["aiia/base:trixie"] is None:
        raise SystemExit("aiia/base:trixie is not built: run invoke provision")
    data["image_bytes"] = sizes

    time.sleep(args.settle)
    idle = stack_memory(stack.project)
    data["idle_bytes"] = idle
    data["idle_total_bytes"] = sum(idle.values())
    data["rebuild_code_only_s"] = round(rebuild_after_code_change(), 1)

    limits = {c.container: c.memory.limit for c in stack.containers()}
    total_limit = sum((c.memory.limit for c in stack.containers()), Size(0))
    rows = "\n".join(
        f"| {name} | {mb(used)} | {limits.get(name, '-')} |" for name, used in sorted(idle.items())
    )
    images = "\n".join(
        f"| {name} | {mb(size) if size else 'not built'} |" for name, size in sizes.items()
    )
    cold = data.get("cold_setup_s")
    md = f"""## The stack at rest (issue #3)

Measured {data["when"]}, with `python benchmarks/stack_bench.py{" --cold" if cold else ""}`;
the stack under its stack.yml limits, both environments up, {args.settle:.0f} s idle.

| container | idle memory | limit |
|---|---|---|
{rows}
| **whole stack** | **{mb(data["idle_total_bytes"])}** | {total_limit} |

| image | size |
|---|---|
{images}

- Rebuild of the app image after a code-only change: **{data["rebuild_code_only_s"]} s**
  (the dependency layers come from the cache; only the code layer is rebuilt).
""" + (
        f"""- Cold `invoke setup` (images built, no containers or volumes): prod
  **{cold["prod"]} s**, then staging **{cold["staging"]} s**. The engine's own cold install
  (`invoke provision`) is in docs/provision.md.
"""
        if cold
        else ""
    )
    write_section(DOCS / "benchmarks.md", "stack", md, data)
    print(md)


if __name__ == "__main__":
    main()
