"""Seed the catalogue with many courses, for measuring the list at size (issue 17).

    python manage.py seed_courses 100000            # until 100,000 courses named seed-*
    python manage.py seed_courses 100000 --lessons 2 --batch 2000
    python manage.py seed_courses 0                 # remove every seed-* course again

Idempotent: it counts the courses already carrying the prefix and creates only the rest
(slugs <prefix>000001, ...), in batches, each batch one transaction (bulk INSERTs of the
courses and their lessons). Bulk writes send no signals, so at the end the list cache's
total is dropped (recounted on the next list miss) and its generation replaced.
"""

from __future__ import annotations

import time

from django.core.management.base import BaseCommand, CommandError
from django.db import transaction

from courses import listcache
from courses.models import Course, Lesson
from courses.pagecache import _quietly

MAX_COURSES = 1_000_000


class Command(BaseCommand):
    help = "Create (or with 0, remove) seeded courses: the list measured at size."

    def add_arguments(self, parser):
        parser.add_argument("count", type=int, help="seeded courses wanted in total (0 removes)")
        parser.add_argument("--lessons", type=int, default=2, help="lessons per course")
        parser.add_argument("--batch", type=int, default=2000, help="courses per transaction")
        parser.add_argument("--prefix", default="seed-", help="slug prefix of the seeded courses")

    def handle(self, *args, count, lessons, batch, prefix, **options):
        if not 0 <= count <= MAX_COURSES:
            raise CommandError(f"count must be from 0 to {MAX_COURSES:,}, got {count}")
        if not 0 <= lessons <= 50:
            raise CommandError(f"--lessons must be from 0 to 50, got {lessons}")
        if not 1 <= batch <= 10_000:
            raise CommandError(f"--batch must be from 1 to 10000, got {batch}")
        if not prefix or not all(c.isalnum() or c in "-_" for c in prefix):
            raise CommandError(f"--prefix must be letters, digits, - or _, got {prefix!r}")

        start = time.monotonic()
        mine = Course.objects.filter(slug__startswith=prefix)
        if count == 0:
            removed = 0
            while ids := list(mine.values_list("id", flat=True)[:batch]):
                # Raw deletes: no per-row signals (the cache is reset once at the end).
                with transaction.atomic():
                    Lesson.objects.filter(course_id__in=ids)._raw_delete("default")
                    removed += Course.objects.filter(id__in=ids)._raw_delete("default")
            self._done(f"removed {removed} seeded courses", start)
            return

        have = mine.count()
        made = 0
        for first in range(have + 1, count + 1, batch):
            numbers = range(first, min(first + batch, count + 1))
            with transaction.atomic():
                courses = Course.objects.bulk_create(
                    [
                        Course(
                            title=f"Seeded course {n}",
                            slug=f"{prefix}{n:06d}",
                            summary=f"Course {n} of the seeded catalogue, for measuring the list.",
                        )
                        for n in numbers
                    ]
                )
                Lesson.objects.bulk_create(
                    [
                        Lesson(course=c, position=p, title=f"Lesson {p}", body="Text. " * 30)
                        for c in courses
                        for p in range(1, lessons + 1)
                    ]
                )
            made += len(courses)
            self.stdout.write(f"{have + made} / {count}")
        self._done(f"created {made} courses ({have} were there)", start)

    def _done(self, what: str, start: float) -> None:
        # Bulk writes send no signals: the list's total and pages are recomputed.
        _quietly(listcache.forget_count)
        listcache.invalidate()
        self.stdout.write(f"{what} in {time.monotonic() - start:.1f} s")
