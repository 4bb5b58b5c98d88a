"""The off-site drill on lab18-20: lab18 is the server that is lost, lab19 the bare new host,
lab20 the off-site S3 store (SeaweedFS). The lab's hosts share this machine's filesystem, so
the server runs the project's own tasks "on itself" over SSH (its sshd sets DOCKER_HOST to
its own engine), exactly as a real server runs its cron jobs; `invoke recover` runs here,
on the operator's machine, and reaches lab19 only over SSH."""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import yaml

from aiia_ops import REPO_ROOT
from tests.conftest import run_invoke
from tests.lab import make_lab  # noqa: F401  (real hosts: namespaces with sshd and dockerd)
from tests.stackfiles import isolated_stack

PROJECT = "aiiarec"
OCTET = 25  # each lab host has its own engine: the subnet only has to be the stack's own
LAB_DIR = "/var/lib/aiia-lab"
SERVER, NEW, STORE = "lab18", "lab19", "lab20"
ADDRESS = {"lab18": "10.77.0.28", "lab19": "10.77.0.29", "lab20": "10.77.0.30"}
PASSPHRASE = "correct horse battery staple 14"
TASK_ENV = (
    "AIIA_STACK",
    "AIIA_STATE_DIR",
    "AIIA_CRON_FILE",
    "AIIA_LAB_DIR",
    "AIIA_SSH_KEY",
    "AIIA_SSH_KNOWN_HOSTS",
    "AIIA_EXPORT_PASSPHRASE",
)
PITR = {
    "enabled": True,
    "archive_timeout": "10s",
    "repo1": {
        "endpoint": ADDRESS[STORE],
        "port": 8443,
        "bucket": "aiia-backups",
    },  # verify_tls on: the drill puts the store's CA in repo1.ca (trust_store_ca)
}


def state_of(host: str) -> Path:
    """A host's state dir: inside the lab host's own folder, which `lab.down` removes."""
    return Path(LAB_DIR) / host / "aiia-state"


def stack_data() -> dict:
    data = isolated_stack(PROJECT, OCTET, 0, str(state_of(SERVER)))
    data["backups"]["pitr"] = PITR
    # Archiving on, in the committed stack's memory limits (docs/allocation.md)
    local = data["hosts"]["local"]
    local["publish_address"] = "0.0.0.0"  # inside the lab host's namespace: its address
    data["hosts"][NEW] = {
        **local,
        "ssh": f"root@{ADDRESS[NEW]}:22",
        "state_dir": str(state_of(NEW)),
    }
    return data


def ssh(host: str, line: str, timeout: float = 900, check: bool = True, input: str | None = None):
    proc = subprocess.run(
        [
            "ssh",
            "-i",
            f"{LAB_DIR}/id_ed25519",
            "-o",
            f"UserKnownHostsFile={LAB_DIR}/known_hosts",
            "-o",
            "BatchMode=yes",
            f"root@{ADDRESS[host]}",
            line,
        ],
        capture_output=True,
        text=True,
        timeout=timeout,
        input=input,
    )
    if check and proc.returncode != 0:
        raise AssertionError(
            f"on {host}: {line[-300:]}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
        )
    return proc


def on_server(*args: str, timeout: float = 900, check: bool = True, env: dict | None = None):
    """`invoke ARGS` run on lab18 itself (over its sshd: its engine, its state dir)."""
    values = {
        "AIIA_STACK": os.environ["AIIA_STACK"],
        "AIIA_STATE_DIR": str(state_of(SERVER)),
        "AIIA_CRON_FILE": str(state_of(SERVER) / "cron.d-aiia"),
        "PYTHONPATH": str(REPO_ROOT / "src"),
        **(env or {}),
    }
    exports = " ".join(f"{k}={shlex.quote(v)}" for k, v in values.items())
    line = f"cd {shlex.quote(str(REPO_ROOT))} && env {exports} {sys.executable} -m invoke " + (
        " ".join(shlex.quote(a) for a in args)
    )
    return ssh(SERVER, line, timeout=timeout, check=check)


@pytest.fixture(scope="package")
def drill(make_lab):  # noqa: F811
    """lab18-20 up and empty; a stack file of our own; the store on lab20 (fresh)."""
    hosts = {h.name: h for h in make_lab(3, first=18)}
    for name in (SERVER, NEW):
        with hosts[name].runner() as r:
            r.run(
                [
                    "sh",
                    "-c",
                    "docker ps -aq | xargs -r docker rm -f; "
                    "docker volume ls -q | xargs -r docker volume rm; true",
                ],
                check=False,
            )
        shutil.rmtree(state_of(name), ignore_errors=True)
    saved = {k: os.environ.get(k) for k in TASK_ENV}
    root = Path(tempfile.mkdtemp(prefix="aiia-recover-"))
    stack_file = root / "stack.yml"
    stack_file.write_text(yaml.safe_dump(stack_data(), sort_keys=False))
    lab = hosts[SERVER]
    os.environ.update(
        AIIA_STACK=str(stack_file),
        AIIA_STATE_DIR=str(root / "store-state"),  # the store's keys: the operator's
        AIIA_CRON_FILE=str(root / "cron.d-aiia"),
        AIIA_LAB_DIR=LAB_DIR,
        AIIA_SSH_KEY=str(lab.key_path),
        AIIA_SSH_KNOWN_HOSTS=str(lab.known_hosts_path),
    )
    os.environ.pop("AIIA_EXPORT_PASSPHRASE", None)
    run_invoke("offsite.down", "--host", STORE, "--wipe")
    yield {"hosts": hosts, "root": root, "stack_file": stack_file}
    if os.environ.get("AIIA_E2E_KEEP") != "1":
        run_invoke("offsite.down", "--host", STORE, "--wipe")
        shutil.rmtree(root, ignore_errors=True)
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
