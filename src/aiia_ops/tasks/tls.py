"""invoke ssl-renew | ssl-status: the stack's ACME certificates (docs/tls.md).

`ssl-renew` is what the host's daily cron job runs, as is: non-interactive, one run at a
time (the `renew` lock; a crashed run's lock is taken over), quiet exit 0 when nothing is
due, exit 1 with the ACME server's own error when something failed (the certificates in
place stay, nginx keeps serving them), an audit line and a Slack message when anything
changed or failed. The procedure is flows/tls.py.
"""

from __future__ import annotations

import json

from aiia_ops.commands import tls
from aiia_ops.flows import tls as flow
from aiia_ops.flows.output import table
from aiia_ops.tasks.common import load, task


@task(
    help={
        "force": "renew every certificate now, due or not",
        "dry_run": "read what is installed and print what is due and the exact commands; "
        "contact no ACME server, change nothing",
        "directory": "ACME directory URL for this run (default: the stack's tls.acme.directory)",
        "ca_bundle": "PEM file of CAs to trust for the ACME server "
        f"(default: ${tls.CA_BUNDLE_ENV})",
    }
)
def ssl_renew(c, force=False, dry_run=False, directory=None, ca_bundle=None, stack=None):
    """Renew the certificates that are due (<= tls.acme.renew_before left), then reload nginx."""
    model, state = load(stack)
    flow.ssl_renew(
        model,
        state,
        directory=directory or model.tls.acme.directory,
        bundle=flow.ca_bundle(ca_bundle),
        force=force,
        dry_run=dry_run,
    )


@task(
    help={
        "json": "print JSON for machines (the monitor reads the same data from "
        "aiia_ops.flows.tls.certificate_status)",
        "served": "also ask nginx which certificate it presents for each name (default on)",
    }
)
def ssl_status(c, json_=False, served=True, stack=None):
    """Per domain: issuer, expiry date and days left of its certificate."""
    model, state = load(stack)
    rows = flow.certificate_status(model, str(state.root), served=served)
    if json_:
        print(json.dumps([r.as_dict() for r in rows], indent=2))
        return
    print(table(tls.STATUS_HEADERS, tls.status_table_rows(rows)))
