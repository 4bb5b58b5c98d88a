"""Issue 15's level-3 figures, on the lab's five hosts (docs/level3.md):

- throughput and p95 of the `app` requests (API reads that reach an app instance: the
  session cookie bypasses nginx's API cache) through the load balancer with prod's
  upstreams cut to 1, 2 and 4 instances (1 CPU limit each, same figures per instance);
- a rolling prod deploy's wall time per app host, under the same load;
- the failure window when an app host's engine stops under load (first to last failed
  request) and the slowest request around it.

    export AIIA_SSH_KEY=/var/lib/aiia-lab/id_ed25519
    export AIIA_SSH_KNOWN_HOSTS=/var/lib/aiia-lab/known_hosts
    invoke lab.up --hosts 5 --first 1 && invoke setup --stack S --profile 2gb-4cpu
    python benchmarks/level3_bench.py --stack S --profile 2gb-4cpu [--clients 50 --seconds 20]

Load goes only to the load balancer's lab address (10.77.0.11). The lab's five hosts and
the load generator share this machine's 2 cores: read the scaling as what the LB and the
instances do on 2 shared cores, not what 4 servers would.
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from aiia_ops.flows import cluster as cl
from aiia_ops.model import load_stack
from aiia_ops.model.state import local_state_dir
from benchmarks.common import DOCS, ROOT, machine_note, write_section
from tests.lab3.load import Load

LAB_PIDFILE = "/run/aiia-lab/lab5-dockerd.pid"  # app2's engine (the profile's lab5)


def loadavg() -> float:
    return round(os.getloadavg()[0], 1)


def run(lb: str, clients: int, seconds: float) -> dict:
    with Load(lb, "eduaiia.com", clients=clients) as load:
        time.sleep(seconds)
    return {
        "requests": load.total,
        "req_per_s": round(load.throughput(), 1),
        "p95_ms": round(load.p95() * 1000),
        "failed": sum(load.failures().values()),
        "load_average": loadavg(),
    }


def scaling(c: cl.Cluster, clients: int, seconds: float) -> dict:
    c.read_live()
    full = dict(c.live)
    prod = sorted(k for k in full if k[0] == "prod")
    out = {}
    try:
        for n in (1, 2, 4):
            keep = {p for p in prod[:: max(1, len(prod) // n)][:n]}  # across both app hosts
            c.live = {k: v for k, v in full.items() if k[0] != "prod" or k in keep}
            c.point_lb()
            time.sleep(3)  # the old workers finish
            out[n] = {
                "instances": sorted(full[k] for k in keep),
                **run(c.lb.address, clients, seconds),
            }
            print(f"{n} instance(s): {out[n]}", flush=True)
    finally:
        c.live = full
        c.point_lb()
    return out


def rolling(stack: str, profile: str, lb: str, clients: int) -> dict:
    with Load(lb, "eduaiia.com", clients=clients) as load:
        started = time.monotonic()
        proc = subprocess.run(
            [sys.executable, "-m", "invoke", "cluster.deploy", "--stack", stack,
             "--profile", profile, "--env", "prod"],
            cwd=ROOT, capture_output=True, text=True,
        )  # fmt: skip
        wall = time.monotonic() - started
    if proc.returncode != 0:
        raise SystemExit(f"cluster.deploy failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-2000:]}")
    per_host = {h: int(s) for h, s in re.findall(r"^  (\w+): good \((\d+)s\)", proc.stdout, re.M)}
    return {"wall_s": round(wall), "per_host_s": per_host, "load": load.summary(),
            "load_average": loadavg()}  # fmt: skip


def host_dies(lb: str, clients: int) -> dict:
    pid = int(Path(LAB_PIDFILE).read_text())
    with Load(lb, "eduaiia.com", clients=clients) as load:
        time.sleep(3)
        stopped = time.monotonic()
        os.kill(pid, signal.SIGTERM)
        while Path(f"/proc/{pid}").exists() and time.monotonic() - stopped < 60:
            time.sleep(0.2)
        gone = time.monotonic() - stopped
        time.sleep(10)
    subprocess.run([sys.executable, "-m", "invoke", "lab.up", "--hosts", "5", "--first", "1"],
                   cwd=ROOT, capture_output=True, check=True)  # fmt: skip
    return {
        "engine_gone_after_s": round(gone, 1),
        "failure_window_s": round(load.failure_window(), 2),
        "slowest_after_stop_s": round(load.slowest(stopped), 2),
        "load": load.summary(),
        "load_average": loadavg(),
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--stack", required=True)
    ap.add_argument("--profile", default="2gb-4cpu")
    ap.add_argument("--clients", type=int, default=50)
    ap.add_argument("--seconds", type=float, default=20)
    args = ap.parse_args()
    model = load_stack(args.stack, args.profile)
    c = cl.connect(model, local_state_dir(model), create_secrets=False, out=lambda _l: None)
    lb = c.lb.address
    note = machine_note()
    data = {"note": note, "clients": args.clients, "seconds": args.seconds}
    data["scaling"] = scaling(c, args.clients, args.seconds)
    data["rolling"] = rolling(args.stack, args.profile, lb, args.clients)
    print("rolling:", data["rolling"], flush=True)
    data["host_dies"] = host_dies(lb, args.clients)
    print("host dies:", data["host_dies"], flush=True)
    one = data["scaling"][1]["req_per_s"] or 1
    rows = "\n".join(
        f"| {n} | {r['req_per_s']} | {r['p95_ms']} | {r['req_per_s'] / one:.2f}x | {r['failed']} "
        f"| {r['load_average']} |"
        for n, r in data["scaling"].items()
    )
    ro, hd = data["rolling"], data["host_dies"]
    ro_failed = {k: v for k, v in ro["load"]["outcomes"].items() if not k.startswith("2")}
    per_host = ", ".join(f"{h} {s} s" for h, s in ro["per_host_s"].items())
    command = (
        f"python benchmarks/level3_bench.py --stack S --profile 2gb-4cpu "
        f"--clients {args.clients} --seconds {args.seconds:g}"
    )
    md = f"""### Measured ({note})

`{command}` (raw: docs/benchmarks/level3.json).
{args.clients} keep-alive HTTPS clients on this machine to lb1 (10.77.0.11), API reads that
reach an app instance (the session cookie bypasses nginx's API cache). Each prod instance:
2 workers x 4 threads, 1 CPU, 120 MB limit.

| prod instances behind lb1 | req/s | p95 ms | vs 1 | failed | load avg |
|---|---|---|---|---|---|
{rows}

| what | measured |
|---|---|
| rolling prod deploy (same release) | {ro["wall_s"]} s wall; per host: {per_host}; \
{ro["load"]["requests"]} requests, failed: {ro_failed or 0} (load avg {ro["load_average"]}) |
| app2's engine stopped (SIGTERM) | engine gone after {hd["engine_gone_after_s"]} s; \
failure window {hd["failure_window_s"]} s; {hd["load"]["requests"]} requests: \
{hd["load"]["outcomes"]}; slowest after the stop {hd["slowest_after_stop_s"]} s \
(load avg {hd["load_average"]}) |

The five hosts, their engines and the load generator share 2 cores: 4 instances hold 4 CPU
limits on a machine that has 2, so the scaling column shows where this machine stops, not
what four servers would give.
"""
    write_section(DOCS / "level3.md", "level3", md, data)
    print(md)


if __name__ == "__main__":
    main()
