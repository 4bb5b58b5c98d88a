"""manage.py migration_safety [--all]: refuse migrations that break the running release.

Run by `invoke deploy` in a one-off container of the new release's image, straight to the
live database, before `migrate`: the migrations not yet recorded in django_migrations are
the release's new ones. `--all` checks every migration of the project's apps without a
database (the CI test phase, `invoke test`). Exit 0: safe; exit 3: refused (one line per
breaking operation, with how to split it); exit 1: the check could not run.
"""

from __future__ import annotations

from django.conf import settings
from django.core.management.base import BaseCommand, CommandError
from django.db import DEFAULT_DB_ALIAS, connections
from django.db.migrations.loader import MigrationLoader

from migration_safety.checker import MARK, MarkError, check, pending

REFUSED = 3


class Command(BaseCommand):
    help = "Refuse pending migrations that break the release still running during a deploy."

    def add_arguments(self, parser):
        parser.add_argument(
            "--all",
            action="store_true",
            help="check every migration of the project's apps (no database needed)",
        )
        parser.add_argument("--database", default=DEFAULT_DB_ALIAS)

    def handle(self, *args, **options):
        everything = options["all"]
        connection = None if everything else connections[options["database"]]
        try:
            loader = MigrationLoader(connection, ignore_no_migrations=True)
        except Exception as exc:  # database down, an inconsistent history ...
            raise CommandError(f"cannot read the migrations: {exc}") from None
        nodes = pending(loader, everything)
        try:
            report = check(loader, nodes, settings.BASE_DIR)
        except MarkError as exc:
            raise CommandError(str(exc)) from None
        scope = "every migration" if everything else "pending migrations"
        for name, mark in report.accepted:
            self.stdout.write(f"migration safety: {name} is breaking but marked safe: {mark}")
        if report.findings:
            for finding in report.findings:
                self.stderr.write(f"migration safety: refused: {finding.message()}")
            self.stderr.write(
                f"migration safety: {len(report.findings)} breaking operation(s) in {scope}; "
                f"nothing was migrated. Mark a migration that is already staged with "
                f'{MARK} = "contract: ..." (see docs/deploy.md, Migration safety)'
            )
            raise SystemExit(REFUSED)
        checked = ", ".join(report.checked) or "none"
        self.stdout.write(f"migration safety: ok ({scope} checked: {checked})")
