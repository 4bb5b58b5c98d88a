"""Fixtures for the postgres image tests; the kit is shared with pgbouncer and redis."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from datasvc_testkit import (  # noqa: F401
    containers,
    docker_engine,
    net_secrets,
    net_stack,
    postgres_server,
    rendered,
    svc_network,
)
