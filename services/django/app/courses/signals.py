"""Saved or deleted courses and lessons make cached answers stale: the list pages (and,
for a new or deleted course, the list's total), and the detail of that course only."""

from functools import partial

from django.db import models, transaction
from django.db.models.signals import post_delete, post_save, pre_save
from django.dispatch import receiver

from . import detailcache, listcache
from .models import Course, Lesson


# All after COMMIT: a reader that sees the new version also sees the new rows.
# One call: the list's count and generation and the course's detail version in one round
# trip (pagecache.after_write). Also called by courses/views.py's one-statement insert.
def after_course_write(delta: int, slug: str, old_slug: str | None, deleted: bool) -> None:
    versions = [detailcache.version_key(slug)]
    forgets = [detailcache.entry(slug)] if deleted else []
    if old_slug is not None and old_slug != slug:
        versions.append(detailcache.version_key(old_slug))
        forgets.append(detailcache.entry(old_slug))
    listcache.invalidate(delta, also=versions, forgets=forgets)


@receiver(post_save, sender=Course)
def course_saved(sender, instance, created, **kwargs) -> None:
    old_slug = getattr(instance, "_slug_before", None)
    transaction.on_commit(
        partial(after_course_write, 1 if created else 0, instance.slug, old_slug, False)
    )


@receiver(pre_save, sender=Course)
def course_renamed(sender, instance, **kwargs) -> None:
    # An edit that changes the slug (the admin) must drop the old slug's detail too.
    if instance.pk is not None and not kwargs.get("raw"):
        before = Course.objects.filter(pk=instance.pk).values_list("slug", flat=True).first()
        if before is not None:
            instance._slug_before = before


@receiver(post_delete, sender=Course)
def course_deleted(sender, instance, **kwargs) -> None:
    transaction.on_commit(partial(after_course_write, -1, instance.slug, None, True))


@receiver([post_save, post_delete], sender=Lesson)
def lesson_changed(sender, instance, **kwargs) -> None:
    origin = kwargs.get("origin")
    if isinstance(origin, Course) or (
        isinstance(origin, models.QuerySet) and origin.model is Course
    ):
        return  # cascaded from a course's deletion, whose own signal covers it
    course = instance._state.fields_cache.get("course")
    slug = course.slug if course is not None else None
    if slug is None:
        slug = Course.objects.filter(pk=instance.course_id).values_list("slug", flat=True).first()
    transaction.on_commit(partial(_after_lesson_write, slug))


def _after_lesson_write(slug: str | None) -> None:
    listcache.invalidate(also=[detailcache.version_key(slug)] if slug is not None else [])
