"""ASGI entry point: the web server of `make run`, so pages can stream."""

import os

from django.core.asgi import get_asgi_application

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "vmportal.settings")
application = get_asgi_application()
