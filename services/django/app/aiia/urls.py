from django.contrib import admin
from django.urls import include, path

from . import health

urlpatterns = [
    path("health/", health.health, name="health"),
    path("api/", include("courses.urls")),
    path("admin/", admin.site.urls),
]
