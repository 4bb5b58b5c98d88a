"""invoke lab.up | lab.down | lab.status | lab.load: the test lab (flows/lab.py, docs/lab.md)."""

from __future__ import annotations

import json
import time

from invoke import Collection

from aiia_ops.flows import lab as flow
from aiia_ops.flows.output import table
from aiia_ops.host.runners import LocalRunner, PrintingRunner
from aiia_ops.tasks.common import task

DRY = "print the plan's exact commands (facts are read, nothing is changed)"


def _runner(dry_run: bool):
    return PrintingRunner(reader=LocalRunner()) if dry_run else LocalRunner()


def _print_hosts(hosts: list[dict]) -> None:
    rows = [
        [h["name"], h["address"], h["ssh"], h["docker_host"], h["engine"] or "-",
         "up" if h["up"] else "DOWN"]
        for h in hosts
    ]  # fmt: skip
    print(table(["host", "address", "ssh", "docker", "engine", "state"], rows))


@task(
    help={
        "hosts": "how many hosts (lab1..labN, 10.77.0.11...)",
        "first": "the first host's number (--first 6 --hosts 3: lab6..lab8; others kept)",
        "dry_run": DRY,
    }
)
def up(c, hosts=3, first=1, dry_run=False):
    """Bring up (or converge) N lab hosts: namespaces on labbr0, each with sshd and dockerd."""
    started = time.monotonic()
    described = flow.up(_runner(dry_run), hosts, first=first)
    if described:
        _print_hosts(described)
        lab = flow.current(LocalRunner())
        print(f"key: {lab.client_key}  known_hosts: {lab.known_hosts}")
        print(f"lab.up took {time.monotonic() - started:.1f}s")


@task(help={"hosts": "lab6,lab7: only these hosts (default: the whole lab)", "dry_run": DRY})
def down(c, hosts="", dry_run=False):
    """Remove the lab: its processes, namespaces, veths, bridge, iptables rule and files."""
    names = [h.strip() for h in hosts.split(",") if h.strip()] or None
    removed = flow.down(_runner(dry_run), names=names)
    print("would remove:" if dry_run else "removed:")
    for line in removed:
        print(f"  {line}")


@task(help={"json": "machine-readable output"})
def status(c, json_=False):
    """Each lab host: address, sshd, engine, whether it answers."""
    data = flow.status(LocalRunner())
    if json_:
        print(json.dumps(data, indent=2))
        return
    if not data["hosts"]:
        print("no lab is up (`invoke lab.up --hosts N`)")
        return
    print(f"lab dir {data['dir']}, bridge {data['bridge']}, forward rule {data['forward_rule']}")
    _print_hosts(data["hosts"])


@task(help={"image": "an image of this machine's engine", "hosts": "lab1,lab2 (default: all)"})
def load(c, image, hosts=""):
    """Ship an image to lab engines: docker save | docker -H unix://... load."""
    names = [h.strip() for h in hosts.split(",") if h.strip()] or None
    for r in flow.load_image(LocalRunner(), image, names):
        print(f"{r.host}: {r.result}" + (f" in {r.seconds:.1f}s" if r.result == "loaded" else ""))


namespace = Collection("lab", up, down, status, load)
