"""The off-site backup tests: a stack of its own (project aiiapitr, 172.26.0.0/16, ports
127.0.0.1:16080/16443) beside the others on this machine's engine, archiving to a real S3
store (SeaweedFS) on lab9. The PostgreSQL container reaches 10.77.0.19 through Docker's
own outbound rules (masquerade + conntrack): no extra iptables rule is needed."""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest
import yaml

from tests.conftest import run_invoke
from tests.lab import make_lab  # noqa: F401  (real hosts: namespaces with sshd and dockerd)
from tests.stackfiles import isolated_stack, remove_stack

PROJECT = "aiiapitr"
OCTET = 26
PORT_OFFSET = 16000
STORE_HOST = "lab9"
LAB_DIR = "/var/lib/aiia-lab"  # the machine's lab (tests/lab.py LAB_ENV), not the state dir's
TASK_ENV = ("AIIA_STACK", "AIIA_STATE_DIR", "AIIA_CRON_FILE", "AIIA_LAB_DIR")
# The store's data on a filesystem of its own, small enough to fill in a test (a full disk
# on the repository host): tmpfs, 384 MB (SeaweedFS makes 128 MB volumes: room for three).
STORE_DATA = Path(LAB_DIR) / STORE_HOST / "offsite" / "data"
STORE_FS_SIZE = "384m"
PITR = {
    "enabled": True,
    "archive_timeout": "10s",
    "lag_warning": "15s",
    "lag_critical": "30s",
    # verify_tls stays on: the prod fixture puts the store's CA in repo1.ca (trust_store_ca)
    "repo1": {"endpoint": "10.77.0.19", "port": 8443, "bucket": "aiia-backups"},
}  # fmt: skip


@pytest.fixture(scope="package")
def offsite(make_lab):  # noqa: F811
    """lab9 and lab10 up; a stack file and state dir of our own named in the task env."""
    hosts = make_lab(2, first=9)
    saved = {k: os.environ.get(k) for k in TASK_ENV}
    root = Path(tempfile.mkdtemp(prefix="aiia-pitr-"))
    state = root / "state"
    data = isolated_stack(PROJECT, OCTET, PORT_OFFSET, str(state))
    data["backups"]["pitr"] = PITR
    # Archiving on, in the committed stack's memory limits (PostgreSQL 146 MB, pgBackRest's
    # 40 MB inside it: the budget check; docs/allocation.md "Archiving on 512 MB").
    stack_file = root / "stack.yml"
    stack_file.write_text(yaml.safe_dump(data, sort_keys=False))
    os.environ.update(AIIA_STACK=str(stack_file), AIIA_STATE_DIR=str(state),
                      AIIA_CRON_FILE=str(root / "cron.d-aiia"), AIIA_LAB_DIR=LAB_DIR)  # fmt: skip
    remove_stack(PROJECT, f"{PROJECT}_network")
    subprocess.run(["umount", str(STORE_DATA)], capture_output=True)  # an earlier run's
    run_invoke("offsite.down", "--host", STORE_HOST, "--wipe", check=True)
    STORE_DATA.mkdir(parents=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={STORE_FS_SIZE},mode=0700", "tmpfs",
                    str(STORE_DATA)], check=True)  # fmt: skip
    yield {"hosts": hosts, "state": state, "root": root, "store_data": STORE_DATA}
    if os.environ.get("AIIA_E2E_KEEP") != "1":
        run_invoke("offsite.down", "--host", STORE_HOST)
        subprocess.run(["umount", str(STORE_DATA)], check=False)
        run_invoke("offsite.down", "--host", STORE_HOST, "--wipe")
        remove_stack(PROJECT, f"{PROJECT}_network")
        shutil.rmtree(root, ignore_errors=True)
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
