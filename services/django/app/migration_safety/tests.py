"""The migration safety check: breaking operations refused, staged ones (marked) accepted."""

from __future__ import annotations

import io

from django.conf import settings
from django.core.management import call_command
from django.core.management.base import CommandError
from django.db import migrations, models
from django.db.migrations.loader import MigrationLoader
from django.test import SimpleTestCase, TestCase, override_settings

from migration_safety.checker import MarkError, check, pending


def release(*operations, mark=None, name="0002_release"):
    """The real courses history (0001_initial) plus one new migration on top of it."""
    loader = MigrationLoader(None, ignore_no_migrations=True)
    attrs = {"dependencies": [("courses", "0001_initial")], "operations": list(operations)}
    if mark is not None:
        attrs["aiia_safe"] = mark
    migration = type("Migration", (migrations.Migration,), attrs)(name, "courses")
    loader.graph.add_node(("courses", name), migration)
    loader.graph.add_dependency(migration, ("courses", name), ("courses", "0001_initial"))
    return check(loader, [("courses", name)], settings.BASE_DIR)


def messages(report) -> list[str]:
    return [f.message() for f in report.findings]


class Refused(SimpleTestCase):
    def assertRefused(self, report, *parts):
        self.assertEqual(len(report.findings), 1, messages(report))
        text = report.findings[0].message()
        for part in parts:
            self.assertIn(part, text)
        self.assertIn("release N", text)  # says how to split it
        self.assertIn("release N+1", text)

    def test_remove_field_is_refused_naming_app_migration_operation_and_column(self):
        report = release(migrations.RemoveField("course", "summary"))
        self.assertRefused(
            report,
            "courses.0002_release: RemoveField course.summary",
            "drops column courses_course.summary",
            'aiia_safe = "contract: ',
        )
        self.assertEqual(report.accepted, [])

    def test_rename_field_and_rename_model_are_refused(self):
        self.assertRefused(
            release(migrations.RenameField("course", "summary", "blurb")),
            "RenameField course.summary",
            "renames column courses_course.summary to blurb",
        )
        self.assertRefused(
            release(migrations.RenameModel("Course", "Class")),
            "RenameModel Course",
            "renames table courses_course to courses_class",
        )
        self.assertRefused(
            release(migrations.AlterModelTable("course", "catalogue")),
            "renames table courses_course to catalogue",
        )

    def test_a_rename_that_keeps_the_database_name_is_accepted(self):
        keep = models.TextField(blank=True, db_column="summary")
        report = release(
            migrations.AlterField("course", "summary", keep),
            migrations.RenameField("course", "summary", "blurb"),
        )
        self.assertEqual(report.findings, [], messages(report))

    def test_delete_model_is_refused(self):
        self.assertRefused(
            release(migrations.DeleteModel("Lesson")),
            "DeleteModel Lesson",
            "drops table courses_lesson",
        )

    def test_add_field_not_null_without_db_default_is_refused_even_with_a_default(self):
        self.assertRefused(
            release(migrations.AddField("course", "rank", models.IntegerField(default=0))),
            "AddField course.rank",
            "NOT NULL without a db_default",
            "db_default",
        )

    def test_add_field_nullable_or_with_db_default_is_accepted(self):
        for field in (models.IntegerField(null=True), models.IntegerField(db_default=0)):
            report = release(migrations.AddField("course", "rank", field))
            self.assertEqual(report.findings, [], messages(report))
            self.assertEqual(report.checked, ["courses.0002_release"])

    def test_alter_field_to_not_null_is_refused_widening_is_accepted(self):
        self.assertRefused(
            release(
                migrations.AddField("course", "rank", models.IntegerField(null=True)),
                migrations.AlterField("course", "rank", models.IntegerField(default=0)),
            ),
            "AlterField course.rank",
            "makes column courses_course.rank NOT NULL",
        )
        wider = release(migrations.AlterField("course", "title", models.CharField(max_length=300)))
        self.assertEqual(wider.findings, [], messages(wider))
        self.assertRefused(
            release(migrations.AlterField("course", "title", models.CharField(max_length=50))),
            "shortens column courses_course.title (200 to 50)",
        )

    def test_run_sql_that_drops_or_renames_is_refused_other_sql_accepted(self):
        self.assertRefused(
            release(migrations.RunSQL("ALTER TABLE courses_course DROP COLUMN summary")),
            "RunSQL",
            "runs DROP SQL",
        )
        self.assertRefused(
            release(migrations.RunSQL([("ALTER TABLE x RENAME TO y", None)])), "runs RENAME SQL"
        )
        report = release(migrations.RunSQL("CREATE INDEX c_t ON courses_course (title)"))
        self.assertEqual(report.findings, [])

    def test_separate_database_and_state_checks_only_the_database_operations(self):
        state_only = migrations.SeparateDatabaseAndState(
            state_operations=[migrations.RemoveField("course", "summary")]
        )
        self.assertEqual(release(state_only).findings, [])
        in_db = migrations.SeparateDatabaseAndState(
            database_operations=[migrations.RemoveField("course", "summary")]
        )
        self.assertRefused(release(in_db), "RemoveField course.summary")

    def test_create_model_and_indexes_are_accepted(self):
        report = release(
            migrations.CreateModel(
                "Tag", [("id", models.BigAutoField(primary_key=True)), ("name", models.TextField())]
            ),
            migrations.AddIndex("course", models.Index(fields=["title"], name="course_title")),
        )
        self.assertEqual(report.findings, [])


class Marked(SimpleTestCase):
    def test_the_same_migration_marked_safe_is_accepted_with_its_reason(self):
        mark = "contract: course.summary unused since release 4f3c2a1"
        report = release(migrations.RemoveField("course", "summary"), mark=mark)
        self.assertEqual(report.findings, [])
        self.assertEqual(report.accepted, [("courses.0002_release", mark)])

    def test_a_mark_without_a_reason_is_an_error(self):
        for bad in ("yes", True, "contract:", ""):
            with self.assertRaises(MarkError) as err:
                release(migrations.RemoveField("course", "summary"), mark=bad)
            self.assertIn("courses.0002_release", str(err.exception))

    def test_django_own_apps_are_not_checked(self):
        loader = MigrationLoader(None, ignore_no_migrations=True)
        nodes = pending(loader, everything=True)
        self.assertIn(("contenttypes", "0002_remove_content_type_name"), nodes)  # a RemoveField
        report = check(loader, nodes, settings.BASE_DIR)
        self.assertEqual(report.findings, [], messages(report))
        self.assertIn("courses.0001_initial", report.checked)
        self.assertNotIn("contenttypes.0002_remove_content_type_name", report.checked)


class Command(TestCase):
    """`manage.py migration_safety` against the test database (every migration applied)."""

    def run_command(self, *args):
        out, err = io.StringIO(), io.StringIO()
        try:
            call_command("migration_safety", *args, stdout=out, stderr=err)
            code = 0
        except SystemExit as exc:
            code = exc.code
        return code, out.getvalue(), err.getvalue()

    def test_nothing_pending_is_ok(self):
        code, out, _ = self.run_command()
        self.assertEqual(code, 0)
        self.assertIn("migration safety: ok (pending migrations checked: none)", out)

    def test_every_migration_of_the_project_passes(self):
        code, out, err = self.run_command("--all")
        self.assertEqual(code, 0, err)
        self.assertIn("courses.0001_initial", out)

    @override_settings(
        MIGRATION_MODULES={"courses": "migration_safety.sample_migrations.drops_summary"}
    )
    def test_a_pending_drop_is_refused_with_exit_3(self):
        code, _, err = self.run_command()
        self.assertEqual(code, 3)
        self.assertIn(
            "refused: courses.0002_drop_summary: RemoveField course.summary drops column "
            "courses_course.summary",
            err,
        )
        self.assertIn("nothing was migrated", err)

    def test_a_bad_mark_is_a_command_error(self):
        from unittest import mock

        with (
            mock.patch(
                "migration_safety.management.commands.migration_safety.check",
                side_effect=MarkError("courses.0002_x: aiia_safe = 'yes' is not a reason"),
            ),
            self.assertRaises(CommandError) as err,
        ):
            call_command("migration_safety")
        self.assertIn("is not a reason", str(err.exception))
