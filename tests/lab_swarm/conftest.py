"""Fixtures of the swarm tests: the lab's hosts lab6-8 (tests/lab.py)."""

from tests.lab import make_lab  # noqa: F401  (real hosts: namespaces with sshd and dockerd)
