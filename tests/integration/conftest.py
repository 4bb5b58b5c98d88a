"""Fixtures for tests against real daemons on this machine."""

from tests.sshd import sshd_host  # noqa: F401  (a real OpenSSH server on 127.0.0.1)
