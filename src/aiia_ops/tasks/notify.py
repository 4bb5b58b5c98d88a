"""invoke notify --text TEXT: one Slack message through the notifier every task uses."""

from __future__ import annotations

from invoke import Exit

from aiia_ops.host import notify as _notify
from aiia_ops.model import load_stack
from aiia_ops.model.state import local_state_dir
from aiia_ops.tasks.common import task


@task(
    help={
        "text": "the message (Slack mrkdwn)",
    }
)
def notify(c, text, stack=None):
    """Send TEXT to Slack. The webhook: AIIA_SLACK_WEBHOOK_URL, else the state dir's
    secrets/shared.env; without one, nothing is sent (and that is not an error)."""
    if not text.strip():
        raise Exit("error: --text is empty; say what happened", code=1)
    state = local_state_dir(load_stack(stack))
    result = _notify.notify(text, state.root)
    if result == "skipped":
        print("slack: skipped (no webhook: set AIIA_SLACK_WEBHOOK_URL)")
    elif result == "sent":
        print("slack: sent")
    else:
        raise Exit(f"error: slack notification {result}; check the webhook URL", code=1)
