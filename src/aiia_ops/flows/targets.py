"""The host an operation acts on: its runner, its state dir, and (for a deploy) its secrets.

`--host` takes a host name of the stack or user@address[:port]; without it, an
environment's first host. A host with `ssh: null` is this machine.
"""

from __future__ import annotations

import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from aiia_ops.errors import OpsError
from aiia_ops.host.runners import LocalRunner, Runner
from aiia_ops.host.secrets import load_secrets
from aiia_ops.model import Host, Stack
from aiia_ops.model.secrets import Secrets
from aiia_ops.model.state import local_state_dir

DEFAULT_REMOTE_STATE = "/var/lib/aiia"


@dataclass
class Target:
    runner: Runner  # real: local or SSH
    state_dir: str  # on that host
    label: str  # how commands are prefixed in a dry run
    entry: Host | None  # its entry in the stack (published ports); None: user@address

    @property
    def is_local(self) -> bool:
        return isinstance(self.runner, LocalRunner)


def target(
    model: Stack, env_name: str, host: str | None = None, accept_new_host_key: bool = False
) -> Target:
    """--host, else the environment's first host."""
    return host_target(model, host or model.environment(env_name).hosts[0], accept_new_host_key)


def host_target(model: Stack, name: str, accept_new_host_key: bool = False) -> Target:
    entry = model.hosts.get(name)
    if entry is not None and entry.ssh is None:
        return Target(LocalRunner(host=name), str(local_state_dir(model, name).root), name, entry)
    from aiia_ops.host.ssh import runner_for_spec

    spec = entry.ssh if entry else name
    state_dir = entry.state_dir if entry else DEFAULT_REMOTE_STATE
    runner = runner_for_spec(spec, host=name, accept_new_host_key=accept_new_host_key)
    return Target(runner, state_dir, name, entry)


def target_secrets(model: Stack, where: Target, create: bool = True) -> Secrets:
    """This machine's secrets for a local host (generated once when missing and `create`);
    the host's own, read over SSH, otherwise. Every value is registered with the runner so
    it never reaches printed output."""
    if where.is_local:
        secrets = load_secrets(local_state_dir(model).root, list(model.environments), create)
    else:
        secrets = remote_secrets(where.runner, where.state_dir, model)
    where.runner.redact(*secrets.values())
    return secrets


def remote_secrets(runner: Runner, state_dir: str, model: Stack) -> Secrets:
    """The host keeps its secrets; read them over the connection (never printed)."""
    tmp = Path(tempfile.mkdtemp(prefix="aiia-secrets-"))
    try:
        (tmp / "secrets").mkdir(mode=0o700)
        for name in ["shared", *model.environments]:
            data = runner.read_file(f"{state_dir}/secrets/{name}.env")
            if data is None:
                raise OpsError(
                    f"no secrets on the host ({state_dir}/secrets/{name}.env); set "
                    "the host up first: invoke setup on it"
                )
            path = tmp / "secrets" / f"{name}.env"
            path.write_bytes(data)
            path.chmod(0o600)
        return load_secrets(tmp, list(model.environments), create=False)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
