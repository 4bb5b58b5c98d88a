"""A sample history for the checker's tests: courses.Course as 0001_initial makes it."""

from django.db import migrations, models


class Migration(migrations.Migration):
    initial = True
    dependencies = []
    operations = [
        migrations.CreateModel(
            name="Course",
            fields=[
                ("id", models.BigAutoField(auto_created=True, primary_key=True, serialize=False)),
                ("title", models.CharField(max_length=200)),
                ("summary", models.TextField(blank=True)),
            ],
        ),
    ]
