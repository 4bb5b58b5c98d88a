"""A release that drops a column the running release reads: refused unless marked."""

from django.db import migrations


class Migration(migrations.Migration):
    dependencies = [("courses", "0001_initial")]
    operations = [migrations.RemoveField("course", "summary")]
