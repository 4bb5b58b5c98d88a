"""The runner for a host of the stack: local for `ssh: null`, else SSH."""

from __future__ import annotations

from aiia_ops.host.runners import LocalRunner, Runner
from aiia_ops.model import Host


def runner_for(host: Host, host_name: str, **ssh_options) -> Runner:
    """`LocalRunner` for `ssh: null`, else an `SSHRunner` (paramiko is imported only then).

    `ssh_options`: key_filename, known_hosts, accept_new_host_key, connect_timeout."""
    if host.ssh is None:
        return LocalRunner(host=host_name)
    from aiia_ops.host.ssh import runner_for_spec

    return runner_for_spec(host.ssh, host=host_name, **ssh_options)
