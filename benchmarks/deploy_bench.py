"""Issue #4's figures: wall time of a code-only staging deploy and of a prod deploy, and
the peak memory of the whole stack during a prod deploy under load.

    AIIA_STACK=... AIIA_STATE_DIR=... python benchmarks/deploy_bench.py [--clients 50]

Needs a stack set up with both environments. Makes a throwaway commit (a one-line
change to a view, with git plumbing: the working tree is untouched), deploys it to
staging, then to prod while N keep-alive HTTPS clients on 127.0.0.1 load prod, sampling
the engine's memory accounting of every container every 0.5 s.
Figures go to docs/benchmarks.md and docs/benchmarks/deploy.json.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from aiia_ops.model import load_stack
from benchmarks.common import DOCS, ROOT, PeakSampler, machine_note, mb, write_section
from tests.e2e.deploys import Load, drop_refs, head_file, make_commit

VIEWS = "services/django/app/courses/views.py"


def deploy(env: str, ref: str) -> float:
    started = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-m", "invoke", "deploy", f"--env={env}", f"--ref={ref}"],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    if proc.returncode != 0:
        raise SystemExit(f"deploy of {env} failed:\n{proc.stdout}\n{proc.stderr}")
    return time.monotonic() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--clients", type=int, default=50)
    args = parser.parse_args()
    stack = load_stack()
    sha = make_commit(
        "bench",
        {VIEWS: head_file(VIEWS) + f"\n# bench {time.time()}\n"},
        "benchmark: a code-only change",
    )[:12]
    try:
        staging_s = deploy("staging", sha)
        prod = stack.environment("prod")
        port = stack.local_host.published(443)
        with (
            PeakSampler(stack.project) as sampler,
            Load(
                prod.domains[0],
                port,
                clients=args.clients,
                paths=("/api/courses/", "/static/admin/css/base.css"),
            ) as load,
        ):
            prod_s = deploy("prod", sha)
    finally:
        drop_refs()
    data = {
        "when": machine_note(),
        "commit": sha,
        "staging_deploy_s": round(staging_s, 1),
        "prod_deploy_under_load_s": round(prod_s, 1),
        "clients": args.clients,
        "requests": load.total,
        "failures": load.failures(),
        "peak_stack_bytes": sampler.peak_total,
        "peak_container_bytes": sampler.peak,
        "samples": sampler.samples,
    }
    rows = "\n".join(f"| {n} | {mb(b)} |" for n, b in sorted(sampler.peak.items()))
    failures = load.failures() or "none"
    md = f"""## Deploys (issue #4)

Measured {data["when"]}, with `python benchmarks/deploy_bench.py --clients {args.clients}`;
the stack under its stack.yml limits; the load generator on the same machine.

- Code-only deploy of staging (image build from the cache, migrations, collectstatic,
  start beside, health, switch, drain): **{data["staging_deploy_s"]} s**.
- Deploy of prod while {args.clients} keep-alive HTTPS clients load it:
  **{data["prod_deploy_under_load_s"]} s**; {load.total} requests, failures: {failures}.
- Peak memory of the whole stack during that prod deploy (two prod containers for a few
  seconds): **{mb(sampler.peak_total)}** of the 512 MB host ({sampler.samples} samples).

| container (peak during the prod deploy) | memory |
|---|---|
{rows}
"""
    write_section(DOCS / "benchmarks.md", "deploy", md, data)
    print(md)


if __name__ == "__main__":
    main()
