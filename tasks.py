"""Invoke entry point: the task collection lives in the package (src/aiia_ops/tasks/)."""

import sys
from pathlib import Path

# Let `invoke` work from a fresh clone before `pip install -e .`.
sys.path.insert(0, str(Path(__file__).parent / "src"))

from aiia_ops.tasks import namespace

ns = namespace
