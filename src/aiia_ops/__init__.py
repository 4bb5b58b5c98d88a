"""aiia_ops: build, test, deploy, back up, renew TLS for and monitor the AI-IA stack."""

from pathlib import Path

__version__ = "0.1.0"

# The monorepo root: src/aiia_ops/__init__.py -> ../../
REPO_ROOT = Path(__file__).resolve().parents[2]
SERVICES_DIR = REPO_ROOT / "services"
DEFAULT_STACK = REPO_ROOT / "deploy" / "stack.yml"
