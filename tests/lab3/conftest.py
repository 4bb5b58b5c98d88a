"""Level 3 on the lab's real hosts lab1-5 (docs/lab.md)."""

from tests.lab import make_lab  # noqa: F401  (real hosts: namespaces with sshd and dockerd)
