"""Fixtures: the data services (for test_django_stack.py) come from their test kit in
services/postgres/tests/, as for pgbouncer and redis."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parents[2] / "postgres" / "tests"))

from datasvc_testkit import (  # noqa: F401
    containers,
    docker_engine,
    net_secrets,
    net_stack,
    postgres_server,
    rendered,
    svc_network,
)
