"""Any saved or deleted course or lesson makes the cached course list stale."""

from django.db import transaction
from django.db.models.signals import post_delete, post_save
from django.dispatch import receiver

from . import listcache
from .models import Course, Lesson


@receiver([post_save, post_delete], sender=Course)
@receiver([post_save, post_delete], sender=Lesson)
def invalidate_course_list(sender, **kwargs) -> None:
    # After COMMIT: a reader that sees the new generation also sees the new rows.
    transaction.on_commit(listcache.invalidate)
