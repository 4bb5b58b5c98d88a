"""Slack notifications through an incoming webhook; silently skipped when none is set.

The webhook URL is a secret: AIIA_SLACK_WEBHOOK_URL in the environment (CI secret), or
SLACK_WEBHOOK_URL in <state_dir>/secrets/shared.env. It is never printed.
"""

from __future__ import annotations

import json
import os
import urllib.error
import urllib.request
from pathlib import Path


def webhook_url(state_dir: Path | None = None) -> str | None:
    url = os.environ.get("AIIA_SLACK_WEBHOOK_URL")
    if url:
        return url
    if state_dir:
        shared = Path(state_dir) / "secrets" / "shared.env"
        if shared.exists():
            for line in shared.read_text().splitlines():
                if line.startswith("SLACK_WEBHOOK_URL="):
                    return line.split("=", 1)[1].strip() or None
    return None


def notify(text: str, state_dir: Path | None = None, timeout: float = 10) -> str:
    """Send `text`; returns 'sent', 'skipped' (no webhook) or 'failed: <why>' (never raises:
    a notification must not fail a deploy or a monitor run)."""
    url = webhook_url(state_dir)
    if not url:
        return "skipped"
    body = json.dumps({"text": text}).encode()
    request = urllib.request.Request(
        url, data=body, method="POST", headers={"Content-Type": "application/json"}
    )
    try:
        with urllib.request.urlopen(request, timeout=timeout) as resp:
            return "sent" if 200 <= resp.status < 300 else f"failed: HTTP {resp.status}"
    except (urllib.error.URLError, OSError) as exc:
        return f"failed: {exc.__class__.__name__}"
