from django.db import models


class Course(models.Model):
    title = models.CharField(max_length=200)
    slug = models.SlugField(max_length=200, unique=True)
    summary = models.TextField(blank=True)
    created_at = models.DateTimeField(auto_now_add=True, db_index=True)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        ordering = ("-created_at", "-id")
        # The list's order: a page is an index range scan (backwards), not a sort of the
        # whole table.
        indexes = (models.Index(fields=("created_at", "id"), name="course_list_order"),)

    def __str__(self) -> str:
        return self.title

    def as_dict(self, *, lessons: bool = False) -> dict:
        data = {
            "id": self.id,
            "slug": self.slug,
            "title": self.title,
            "summary": self.summary,
            "created_at": self.created_at.isoformat(),
            "updated_at": self.updated_at.isoformat(),
        }
        if hasattr(self, "lesson_count"):
            data["lesson_count"] = self.lesson_count
        if lessons:
            data["lessons"] = [lesson.as_dict() for lesson in self.lessons.all()]
        return data


class Lesson(models.Model):
    course = models.ForeignKey(Course, on_delete=models.CASCADE, related_name="lessons")
    position = models.PositiveIntegerField()
    title = models.CharField(max_length=200)
    body = models.TextField(blank=True)

    class Meta:
        # course_id, not course: ordering by the relation JOINs courses (and orders by
        # the course's own ordering) on every lesson query.
        ordering = ("course_id", "position")
        constraints = (
            models.UniqueConstraint(fields=("course", "position"), name="lesson_position_unique"),
        )

    def __str__(self) -> str:
        return f"{self.course.slug} #{self.position}: {self.title}"

    def as_dict(self) -> dict:
        return {"position": self.position, "title": self.title, "body": self.body}
