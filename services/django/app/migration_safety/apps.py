from django.apps import AppConfig


class MigrationSafetyConfig(AppConfig):
    name = "migration_safety"
    verbose_name = "Migration safety (the deploy's expand/contract check)"
