"""Fixtures: the data-services test kit lives in services/postgres/tests/."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parents[2] / "postgres" / "tests"))
