"""Fixtures for tests against real daemons on this machine."""

from tests.lab import make_lab  # noqa: F401  (real hosts: namespaces with sshd and dockerd)
from tests.sshd import sshd_host  # noqa: F401  (a real OpenSSH server on 127.0.0.1)
