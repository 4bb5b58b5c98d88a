"""WSGI entry point: `gunicorn aiia.wsgi`."""

import os

from django.core.wsgi import get_wsgi_application

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "aiia.settings")

application = get_wsgi_application()
